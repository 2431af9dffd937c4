"""What each launcher does with the signals schedulers send, and how long from the signal to the last exit.

    python benchmarks/signals.py [--model-size small] [--cases python:TERM torchrun:TERM ...]

Each case starts a 2-rank run on CPU (gloo; one rank for ``python``) of the given preset on synthetic data (fp32,
rows of 128 tokens, micro-batch 1), waits for 3 logged steps, sends the signal to the process that was started
(never to the workers), and records: the launcher's exit code, whether a complete ``step_N`` checkpoint holds every
rank's state, and the seconds from the signal to the exit of the last process of the run (the launcher, its
workers). ``sbatch-fsdp`` and ``sbatch-deepspeed`` run the templates in ``launch/slurm/`` with the stand-in
srun/scontrol/sbatch of ``tests/slurm/`` and send USR1 to the batch shell (``#SBATCH --signal=B:USR1@...``); their
time is to the requeue decision (the batch script's first exit), and ``requeued`` says whether the job asked to be
started again. Writes benchmarks/results/cpu-<N>core/signals_<time>.json and .txt."""

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

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_env, free_port  # noqa: E402

CASES = ["python:TERM", "python:USR1", "torchrun:TERM", "torchrun:USR1", "torchrun-usr1:USR1", "deepspeed:TERM",
         "deepspeed:USR1", "sbatch-fsdp:USR1", "sbatch-deepspeed:USR1"]
BIN = Path(sys.executable).parent


def _command(launcher: str, train: list[str], tmp: Path) -> tuple[list[str], dict]:
    env = child_env(PYTHONUNBUFFERED="1")
    script = str(ROOT / "launch" / "pretrain.py")
    if launcher == "python":
        return [sys.executable, script, "--engine", "fsdp", *train], env
    if launcher.startswith("torchrun"):
        extra = ["--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"] if launcher == "torchrun-usr1" else []
        return [str(BIN / "torchrun"), *extra, "--nproc_per_node", "2", "--master_port", str(free_port()), script,
                "--engine", "fsdp", *train], env
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), script, "--engine",
                "deepspeed", *train], env
    template = launcher.split("-", 1)[1]
    ds = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    ds["bf16"] = {"enabled": "auto"}  # fp32 here: bf16 matmuls are slow on a CPU
    (tmp / "zero2.json").write_text(json.dumps(ds))
    (tmp / "standin").mkdir(exist_ok=True)
    flags = [a for a in train if a not in ("--checkpoint-dir", str(tmp / "ck"), "--run-name", "t")]
    env.update(PATH=f"{ROOT / 'tests' / 'slurm'}{os.pathsep}{env['PATH']}", SLURM_NNODES="1",
               SLURM_STANDIN_DIR=str(tmp / "standin"), PYTHON=sys.executable, RUN_NAME="t",
               CHECKPOINT_DIR=str(tmp / "ck"), RDZV_PORT=str(free_port()), GPUS_PER_NODE="2",
               DS_CONFIG=str(tmp / "zero2.json"), TRAIN_ARGS=" ".join(flags))
    return ["sbatch", f"launch/slurm/{template}.sbatch"], env


def run_case(case: str, model_size: str) -> dict:
    launcher, sig = case.split(":")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        train = ["--data-kind", "synthetic", "--model-size", model_size, "--max-seq-length", "128",
                 "--mixed-precision", "fp32",
                 "--micro-batch-size", "1", "--max-steps", "100000", "--log-interval", "1", "--eval-interval", "0",
                 "--no-use-tensorboard", "--checkpoint-dir", str(tmp / "ck"), "--run-dir", str(tmp / "runs"),
                 "--run-name", "t"]
        cmd, env = _command(launcher, train, tmp)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        metrics = tmp / "runs" / "t" / "metrics.jsonl"
        t0 = time.time()
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            if proc.poll() is not None or time.time() - t0 > 900:
                raise RuntimeError(f"{case}: the run ended or stalled before 3 steps:\n{proc.stdout.read()[-3000:]}")
            time.sleep(0.5)
        family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        target = proc.pid
        if launcher.startswith("sbatch"):
            target = int((tmp / "standin" / "batch.pid").read_text())
        t_sig = time.time()
        os.kill(target, getattr(signal, "SIG" + sig))
        if launcher.startswith("sbatch"):  # to the requeue decision: the batch script's first exit
            while psutil.pid_exists(target) and psutil.Process(target).status() != psutil.STATUS_ZOMBIE:
                time.sleep(0.1)
            seconds = time.time() - t_sig
            time.sleep(5)  # the requeued start begins; then the stand-in job is stopped (it would train on)
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=60)
        else:
            out, _ = proc.communicate(timeout=900)
            while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in family):
                time.sleep(0.1)
            seconds = time.time() - t_sig
        steps = sorted(p for p in (tmp / "ck").glob("step_*") if (p / "COMPLETE.json").exists())
        ranks = len(list(steps[-1].glob("train_state_rank*.pt"))) if steps else 0
        return {"case": case, "launcher": launcher, "signal": sig, "exit_code": proc.returncode,
                "checkpoint": steps[-1].name if steps else None, "ranks_saved": ranks,
                "requeued": "requeueing job" in out if launcher.startswith("sbatch") else None,
                "seconds_to_exit": round(seconds, 1), "tail": out[-600:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="small")
    p.add_argument("--cases", nargs="+", default=CASES, help=f"launcher:SIGNAL items (default: {' '.join(CASES)})")
    a = p.parse_args()
    rows, lines = [], [f"{a.model_size} preset, {os.cpu_count()} CPU cores, signal sent {time.strftime('%F %T')}"]
    for case in a.cases:
        row = run_case(case, a.model_size)
        rows.append(row)
        lines.append(f"{row['case']:<24} exit {row['exit_code']!s:>4}  checkpoint {row['checkpoint']!s:<12} ranks "
                     f"{row['ranks_saved']}  requeued {row['requeued']!s:<5}  {row['seconds_to_exit']:6.1f} s")
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / f"cpu-{os.cpu_count()}core"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"signals_{stamp}.json").write_text(json.dumps({"model_size": a.model_size, "rows": rows}, indent=2))
    (out / f"signals_{stamp}.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'signals_{stamp}.json'}")


if __name__ == "__main__":
    main()
