"""Engine overhead: optimizer steps under FSDP2, ZeRO-2 and ZeRO-3 at world size 1 against a
plain PyTorch loop (same model, data, AdamW groups and clipping) in the same process.

    python benchmarks/engine_overhead.py [--model-size tiny] [--batch-size 8] [--seq 256] [--steps 10]

Rounds interleave the configurations so machine noise hits all of them alike; the
median step time per configuration is reported, and its ratio to the plain loop.
Goals: FSDP <= 1.05x, ZeRO-2 <= 1.15x. Writes benchmarks/results/engine_overhead_<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_runner, device_name, sync  # noqa: E402

from scaletrain.cli import parse_config  # noqa: E402
from scaletrain.data.synthetic import SyntheticLoader  # noqa: E402
from scaletrain.engine import get_engine_class  # noqa: E402
from scaletrain.model import get_model_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="measured steps per configuration per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default=None, help="fp32 on CPU, bf16 on CUDA by default")
    p.add_argument("--engines", nargs="+", default=["plain", "fsdp", "zero2", "zero3"])
    p.add_argument("--output", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args()
    precision = a.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    argv = ["--model-size", a.model_size, "--micro-batch-size", str(a.batch_size), "--max-seq-length", str(a.seq),
            "--gradient-accumulation-steps", str(a.accum), "--mixed-precision", precision,
            "--max-steps", "100000", "--warmup-steps", "10"]
    if a.num_layers:
        argv += ["--num-layers", str(a.num_layers)]
    env = get_engine_class("deepspeed").init_distributed()  # one world-of-one group shared by all
    cfg = parse_config(argv)
    vocab = get_model_config(cfg.model_size).vocab_size
    loader = SyntheticLoader(vocab, a.seq, a.batch_size, a.accum, 0, 1, 0)
    # fixed batches already on the device: the benchmark times the engines, not the data source
    batches = [[(x.to(env.device), y.to(env.device), n) for x, y, n in (next(loader) for _ in range(a.accum))]
               for _ in range(4)]
    runners = {k: build_runner(k, argv, env)[0] for k in a.engines}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(a.rounds):
        for kind, runner in runners.items():
            for i in range(a.warmup if r == 0 else 1):
                runner.train_step(batches[i % len(batches)])
            sync(env.device)
            for i in range(a.steps):
                t0 = time.perf_counter()
                runner.train_step(batches[i % len(batches)])
                sync(env.device)
                times[kind].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"]) if "plain" in times else None
    tokens = a.batch_size * a.accum * a.seq
    device = device_name(env.device)
    print(f"\nengine overhead, world size 1, {a.model_size}, {precision}, {a.batch_size}x{a.accum}x{a.seq} "
          f"tokens/step, device {device}; median of {len(next(iter(times.values())))} steps")
    print(f"{'engine':<8}{'step ms':>10}{'tokens/s':>12}{'vs plain':>10}")
    rows = []
    for kind, ts in times.items():
        med = statistics.median(ts)
        ratio = med / base if base else float("nan")
        rows.append({"engine": kind, "median_step_s": med, "tokens_per_s": tokens / med, "ratio_vs_plain": ratio})
        print(f"{kind:<8}{med * 1e3:>10.1f}{tokens / med:>12,.0f}{ratio:>9.3f}x")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine_overhead_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(a), "precision": precision, "device": device, "rows": rows}, indent=2))
    print(f"wrote {path}")
    sys.stdout.flush()
    os._exit(0)  # see launch/pretrain.py: skip teardown with live gloo threads


if __name__ == "__main__":
    main()
