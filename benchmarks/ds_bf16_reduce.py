"""What reducing and accumulating bf16 gradients in fp32 buys DeepSpeed: the error of one step's gradient.

    python benchmarks/ds_bf16_reduce.py [--config zero2_bf16] [--accum 32] [--model-size tiny] [--seq 128]

On 2 ranks (torchrun, started by this script), the same weights and the same ``--accum`` micro-batches
go through: DeepSpeed in fp32 (the reference), and DeepSpeed in bf16 with the shipped config
(``communication_data_type`` and ``data_types.grad_accum_dtype`` fp32) and without those two keys
(DeepSpeed's default: both bf16). The bf16 runs compute forward and backward identically, so the
difference between their errors is what the reduction and accumulation dtype costs. Prints the relative
L2 error of the full gradient against the reference and the median time of an optimizer step; writes
JSON to benchmarks/results/<device>/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import child_env, free_port  # noqa: E402


def worker(a) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from scaletrain.cli import parse_config
    from scaletrain.data.synthetic import SyntheticLoader
    from scaletrain.engine import get_engine_class
    from scaletrain.trainer import build_model

    cls = get_engine_class("deepspeed")
    env = cls.init_distributed()
    configs = json.loads(Path(a.worker).read_text())
    grads, times = {}, {}
    for name, (path, precision) in configs.items():
        cfg = parse_config(["--model-size", a.model_size, "--max-seq-length", str(a.seq), "--micro-batch-size", "1",
                            "--gradient-accumulation-steps", str(a.accum), "--mixed-precision", precision,
                            "--max-steps", "100", "--warmup-steps", "1", "--ds_config", path, "--seed", "0"])
        cfg = cls.resolve_config(cfg, env.world_size, env.device.type).freeze()
        engine = cls(build_model(cfg, device=env.device), cfg, env)
        loader = SyntheticLoader(engine.module.module.config.vocab_size, a.seq, 1, a.accum, env.rank, env.world_size, 0)
        batches = [(x.to(env.device), y.to(env.device), n) for x, y, n in (next(loader) for _ in range(a.accum))]
        engine.accumulate(batches)
        grads[name] = torch.cat([g.flatten().double() for g in engine.full_gradients().values()])
        engine.optimizer_step()
        ts = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            engine.train_step(batches)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
        del engine
    if env.rank == 0:
        ref = grads["fp32"]
        rows = [{"run": n, "rel_l2_error": float((g - ref).norm() / ref.norm()), "median_step_s": times[n]}
                for n, g in grads.items()]
        Path(a.out).write_text(json.dumps(rows))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="zero2_bf16")
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--accum", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    p.add_argument("--output", default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    work = Path(tempfile.mkdtemp(prefix="ds_bf16_"))
    shipped = json.loads((ROOT / "ds_configs" / f"{a.config}.json").read_text())
    bare = {k: v for k, v in shipped.items() if k not in ("communication_data_type", "data_types")}
    configs = {}
    for name, ds, prec in (("fp32", dict(bare, bf16={"enabled": "auto"}), "fp32"),
                           ("bf16, fp32 reduce+accumulate (shipped)", shipped, "bf16"),
                           ("bf16, bf16 reduce+accumulate", bare, "bf16")):
        path = work / f"{len(configs)}.json"
        path.write_text(json.dumps(ds))
        configs[name] = (str(path), prec)
    (work / "configs.json").write_text(json.dumps(configs))
    env = child_env()
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), __file__, "--worker",
           str(work / "configs.json"), "--out", str(work / "rows.json"), "--config", a.config, "--model-size",
           a.model_size, "--accum", str(a.accum), "--seq", str(a.seq), "--steps", str(a.steps)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    rows = json.loads((work / "rows.json").read_text())
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(f"{a.config}, {a.model_size}, 2 ranks, {a.accum} micro-steps of 1 x {a.seq} tokens, device {device}: "
          f"one step's gradient vs DeepSpeed fp32")
    print(f"{'run':<42}{'rel L2 error':>14}{'step s':>9}")
    for r in rows:
        print(f"{r['run']:<42}{r['rel_l2_error']:>14.3e}{r['median_step_s']:>9.3f}")
    out = Path(a.output or ROOT / "benchmarks" / "results" / ("cpu-2core" if device.startswith("cpu") else
                                                                device.replace(" ", "_")))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ds_bf16_reduce_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(a), "device": device, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
