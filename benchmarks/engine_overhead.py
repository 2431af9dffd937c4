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
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaletrain.cli import parse_config  # noqa: E402
from scaletrain.data.synthetic import SyntheticLoader  # noqa: E402
from scaletrain.engine import get_engine_class  # noqa: E402
from scaletrain.engine.base import param_groups  # noqa: E402
from scaletrain.lr import lr_factor_fn  # noqa: E402
from scaletrain.trainer import build_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Plain:
    """The baseline: what a hand-written single-device loop does per optimizer step."""

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.model = build_model(cfg).to(device)
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.learning_rate,
                                     betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, **fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor_fn(cfg))
        self.dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
        self.device = device

    def train_step(self, micro_batches):
        for x, y in micro_batches:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                loss = self.model(x, labels=y)
            (loss / len(micro_batches)).backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        if torch.isfinite(norm):  # the same host sync the engines make
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)


def build(kind: str, argv: list[str], env):
    if kind == "plain":
        return Plain(parse_config(argv + ["--engine", "fsdp"]), env.device)
    extra = {"fsdp": ["--engine", "fsdp"]}
    if kind.startswith("zero"):
        # the shipped ZeRO config with its precision left to --mixed-precision
        ds = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / f"{kind}_bf16.json").read_text())
        ds["bf16"] = {"enabled": "auto"}
        path = Path(tempfile.mkdtemp()) / f"{kind}.json"
        path.write_text(json.dumps(ds))
        extra[kind] = ["--ds_config", str(path)]
    cfg = parse_config(argv + extra[kind])
    return get_engine_class(cfg.resolved_engine)(build_model(cfg), cfg, env)


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
    argv = ["--model-size", a.model_size, "--batch-size", str(a.batch_size), "--max-seq-length", str(a.seq),
            "--gradient-accumulation-steps", str(a.accum), "--mixed-precision", precision,
            "--max-steps", "100000", "--warmup-steps", "10"]
    if a.num_layers:
        argv += ["--num-layers", str(a.num_layers)]
    env = get_engine_class("deepspeed").init_distributed()  # one world-of-one group shared by all
    cfg = parse_config(argv)
    vocab = build_model(cfg).config.vocab_size
    loader = SyntheticLoader(vocab, a.seq, a.batch_size, a.accum, 0, 1, 0)
    # fixed batches already on the device: the benchmark times the engines, not the data source
    batches = [[tuple(t.to(env.device) for t in next(loader)) for _ in range(a.accum)] for _ in range(4)]
    runners = {k: build(k, argv, env) for k in a.engines}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(a.rounds):
        for kind, runner in runners.items():
            for i in range(a.warmup if r == 0 else 1):
                runner.train_step(batches[i % len(batches)])
            _sync(env.device)
            for i in range(a.steps):
                t0 = time.perf_counter()
                runner.train_step(batches[i % len(batches)])
                _sync(env.device)
                times[kind].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"]) if "plain" in times else None
    tokens = a.batch_size * a.accum * a.seq
    device = torch.cuda.get_device_name() if env.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
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
