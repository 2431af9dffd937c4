"""How often a torchrun restart after a crash comes back, with and without our join per attempt.

    python benchmarks/elastic_restarts.py [--tries 6] [--engine fsdp] [--rendezvous master_port standalone]

Each try is a 2-rank run on CPU (gloo) of the tiny preset on synthetic data, under ``torchrun --max-restarts 1
... --save-interval 2 --resume auto``, whose rank 1 kills itself before step 5 (``SCALETRAIN_FAULT=crash:5@1``, the
first attempt only). A try comes back when torchrun exits 0 with the run's ``final`` checkpoint written; one that
has not ended after ``--timeout`` seconds is killed and counted as hung (gloo would wait 30 minutes). Each
rendezvous (``--master_port``: torch's static one; ``--standalone``: the c10d one) is tried with the process group
joined as scaletrain joins it (a store prefix per attempt, ``scaletrain/engine/dist.py::init_world``) and as
torch's ``env://`` joins it (``SCALETRAIN_FAULT=plain_join``), alternating, in one command. Writes
benchmarks/results/cpu-<N>core/elastic_restarts_<time>.json and .txt."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_env, free_port  # noqa: E402

TRAIN = ["--data-kind", "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--max-steps", "6",
         "--batch-size", "2", "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0",
         "--no-use-tensorboard", "--mixed-precision", "fp32", "--save-interval", "2", "--resume", "auto"]


def one_try(engine: str, rendezvous: str, join: str, tmp: Path, timeout: float) -> dict:
    rdzv = ["--standalone"] if rendezvous == "standalone" else ["--master_port", str(free_port())]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--max-restarts", "1", "--nproc_per_node", "2", *rdzv,
           str(ROOT / "launch" / "pretrain.py"), *TRAIN, "--engine", engine, "--checkpoint-dir", str(tmp / "ck"),
           "--run-dir", str(tmp / "runs"), "--run-name", "r"]
    env = child_env(SCALETRAIN_FAULT="crash:5@1" + (",plain_join" if join == "torch env://" else ""))
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a restart that waits on the crashed attempt's ranks: gloo's 30 minutes
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    back = proc.returncode == 0 and (tmp / "ck" / "final" / "COMPLETE.json").is_file()
    return {"engine": engine, "rendezvous": rendezvous, "join": join, "came_back": back, "rc": proc.returncode,
            "refused": "Connection refused" in err, "hung": proc.returncode == -signal.SIGKILL,
            "resumed": "resumed from" in out, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tries", type=int, default=6, help="restarts per rendezvous and join (default 6)")
    p.add_argument("--engine", default="fsdp", choices=["fsdp", "deepspeed"])
    p.add_argument("--timeout", type=float, default=90, help="seconds a try may take before it counts as hung "
                                                               "(default 90; one comes back in about 10)")
    p.add_argument("--rendezvous", nargs="+", default=["master_port", "standalone"],
                   choices=["master_port", "standalone"])
    a = p.parse_args()
    rows = []
    for rendezvous in a.rendezvous:
        for _ in range(a.tries):
            for join in ("per attempt", "torch env://"):  # alternating: the machine's noise falls on both
                with tempfile.TemporaryDirectory() as d:
                    row = one_try(a.engine, rendezvous, join, Path(d), a.timeout)
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = [f"torchrun --max-restarts 1, rank 1 killed before step 5, engine {a.engine}, {a.tries} tries each:"]
    for rendezvous in a.rendezvous:
        for join in ("per attempt", "torch env://"):
            got = [r for r in rows if r["rendezvous"] == rendezvous and r["join"] == join]
            lines.append(f"  --{rendezvous:<12} join {join:<13} came back {sum(r['came_back'] for r in got)} of "
                         f"{len(got)} (Connection refused in {sum(r['refused'] for r in got)}, hung past "
                         f"{a.timeout:g} s in {sum(r['hung'] for r in got)})")
    print("\n".join(lines))
    out = ROOT / "benchmarks" / "results" / f"cpu-{os.cpu_count()}core"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"elastic_restarts_{stamp}.json").write_text(json.dumps({"engine": a.engine, "rows": rows}, indent=2))
    (out / f"elastic_restarts_{stamp}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
