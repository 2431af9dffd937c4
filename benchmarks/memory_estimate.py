"""Predicted against measured peak memory per device: ``scaletrain estimate``'s figure beside what a real run of
the same flags used, for FSDP2 and ZeRO-2/3 at world 1 and 2 (tiny and small by default), in one run.

    python benchmarks/memory_estimate.py [--models tiny small] [--engines fsdp zero2 zero3] [--worlds 1 2]
                                         [--checkpointing off on] [--precision bf16] [--micro-batch-size 8]
                                         [--seq 256] [--steps 3] [--output DIR]

A model may be cut to fewer layers as NAME@LAYERS (``large@4``: the large widths with 4 of its 32 layers, to fit
one GPU).

Measured on CPU as resident memory (RSS) above the start, per rank, the highest rank reported: each case is a
fresh process (torchrun for world 2) that loads torch and the engine and runs one small forward and backward to
load its kernels, then resets its peak RSS (``/proc/self/clear_refs``), trains ``--steps`` steps of synthetic
data and reads its peak (``VmHWM``) after each step, before the final checkpoint is written. glibc is told to
give every block of 64 KiB or more its own mapping (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor leaves the
resident set at once, as it leaves ``torch.cuda.memory_allocated`` on a GPU; on a GPU the worker reads
``torch.cuda.max_memory_allocated`` instead. The estimate is the same function every run prints at its start
(``scaletrain/estimate.py``), called with the resolved config of that run, with ``resident=True`` on CPU
(buffers count the part that is written, as RSS does). Goal on CPU: within 15%.
Writes benchmarks/results/<device>/memory_estimate_<time>.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_env, engine_argv, free_port, own_mappings, rss_mib  # noqa: E402


def _warm_up(cfg, cls) -> None:
    """One training step of a throwaway engine (the same engine and settings, the tiny model, a row of 32 tokens):
    the kernels, thread pools, autograd engine and the engine's one-time set-up (measured: DeepSpeed's first
    ``initialize`` in a process leaves ~50 MiB of Python objects and code that a second one does not add) are in
    place before the start is taken, so what is measured is the run's tensors."""
    import gc

    import torch

    from scaletrain.model.weights import RandomWeights
    from scaletrain.run import model_config_for

    env = cls.init_distributed()
    small = cfg.replace(model_size="tiny", num_layers=None, micro_batch_size=1, max_seq_length=32,
                        gradient_accumulation_steps=1, global_batch_size=None)
    small = cls.resolve_config(small, env.world_size, env.device.type).replace(warmup_steps=1)
    mc = model_config_for(small, None)
    engine = cls(cls.build_model(mc, small, env), small, env, weights=RandomWeights(0))
    x = torch.randint(0, mc.vocab_size, (1, 32), device=env.device)
    engine.train_step([(x, x, x.numel())])
    del engine  # not closed: that would end the process group the run goes on with
    gc.collect()


class Peaks:
    """Peak memory above the start: whole run, at the first step's start (the engine built), and each step."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device) / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.start = rss_mib("VmRSS")
        self.steps: list[float] = []
        self.built: float | None = None

    def now(self) -> float:
        import torch

        return (torch.cuda.memory_allocated(self.device) / 2**20 if self.cuda else rss_mib("VmRSS")) - self.start

    def peak(self) -> float:
        import torch

        return (torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else rss_mib("VmHWM")) \
            - self.start


def worker(a: argparse.Namespace) -> None:
    import torch

    import scaletrain.trainer as trainer
    from scaletrain.cli import parse_config
    from scaletrain.engine import get_engine_class

    cfg = parse_config(a.args)
    cls = get_engine_class(cfg.resolved_engine)
    _warm_up(cfg, cls)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    peaks = Peaks(device)
    estimate: dict = {}

    real_step, real_after = cls.train_step, trainer.CheckpointManager.after_step

    def train_step(self, batches):
        if peaks.built is None:
            peaks.built = peaks.now()
            estimate.update(self.memory_estimate(self._estimate_model_config).to_dict())
        return real_step(self, batches)

    def after_step(self, *args, **kwargs):
        peaks.steps.append(peaks.peak())  # before any checkpoint of this step is written
        return real_after(self, *args, **kwargs)

    cls.train_step = train_step
    trainer.CheckpointManager.after_step = after_step
    real_engine_init = cls.__init__

    def engine_init(self, model, cfg, env, **kwargs):
        self._estimate_model_config = model.config
        real_engine_init(self, model, cfg, env, **kwargs)
        own_mappings()  # the ZeRO-3 build sets glibc's threshold to 32 MiB afterwards (engine/deepspeed.py)

    cls.__init__ = engine_init
    trainer.train(cfg)
    rank = int(os.environ.get("RANK", 0))
    out = {"rank": rank, "start_mib": peaks.start, "built_mib": peaks.built, "step_peaks_mib": peaks.steps,
           "measured_mib": max(peaks.steps), "estimate": estimate,
           "measure": "torch.cuda.max_memory_allocated" if peaks.cuda else "peak RSS (VmHWM) above the start"}
    Path(a.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(out))


# rows per case: on CPU a few seconds a step; tiny's rows are enough that its activations, not the few MiB a
# process's own objects take (the loader, gloo, Python), are what is measured
SHAPES = {"tiny": (16, 256)}


def shape(model: str, a: argparse.Namespace) -> tuple[int, int]:
    mb, seq = SHAPES.get(model, (4, 128))
    return a.micro_batch_size or mb, a.seq or seq


def run_case(model: str, engine: str, world: int, ac: bool, a: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{model.replace('@', '_')}_{engine}_{world}{'_ac' if ac else ''}"
    name, _, layers = model.partition("@")
    mb, seq = shape(name, a)
    args = ["--data-kind", "synthetic", "--model-size", name, "--mixed-precision", a.precision,
            "--max-seq-length", str(seq), "--micro-batch-size", str(mb),
            "--max-steps", str(a.steps), "--eval-interval", "0", "--log-interval", "1", "--no-use-tensorboard",
            "--no-save-best", "--run-dir", str(tmp / "runs"), "--run-name", out.name,
            *(["--num-layers", layers] if layers else []), *(["--gradient-checkpointing"] if ac else []),
            *engine_argv(engine, str(tmp))]
    me = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--", *args]
    cmd = ([sys.executable, *me] if world == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
            str(free_port()), *me])
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536")  # a freed tensor leaves the resident set (see the doc)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(tmp / "runs" / out.name, ignore_errors=True)  # its final checkpoint: GiBs per case
    top = max(ranks, key=lambda r: r["measured_mib"])
    est = top["estimate"]
    predicted = est["peak_bytes"] / 2**20
    return {"model": model, "engine": engine + (" +AC" if ac else ""), "world": world, "rows": f"{mb}x{seq}",
            "predicted_mib": predicted,
            "measured_mib": top["measured_mib"], "ratio": predicted / top["measured_mib"],
            "built_mib": top["built_mib"], "step_peaks_mib": top["step_peaks_mib"], "estimate": est,
            "seconds": time.perf_counter() - t0, "measure": top["measure"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "small"])
    p.add_argument("--engines", nargs="+", default=["fsdp", "zero2", "zero3"])
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--precision", default=None,
                   help="default: bf16 on a GPU, fp32 on CPU (bf16 matmuls crawl on CPUs without AMX)")
    p.add_argument("--micro-batch-size", type=int, help="default: 16 for tiny, 4 otherwise")
    p.add_argument("--seq", type=int, help="default: 256 for tiny, 128 otherwise")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--checkpointing", nargs="+", default=["off"], choices=["off", "on"],
                   help="activation checkpointing off and/or on (default: off)")
    p.add_argument("--output", help="results folder (default: benchmarks/results/<device>)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if a.precision is None:
        import torch

        a.precision = "bf16" if torch.cuda.is_available() else "fp32"
    tmp = Path(tempfile.mkdtemp(prefix="memory_estimate_"))
    rows = []
    head = (f"{'model':8} {'rows':>7} {'engine':10} {'world':>5} {'predicted':>10} {'measured':>10} {'ratio':>6}   "
            f"(MiB per device; {a.precision}; rows: micro-batch x sequence)")
    print(head, flush=True)
    for model in a.models:
        for engine, ac in [(e, c == "on") for e in a.engines for c in a.checkpointing]:
            for world in a.worlds:
                r = run_case(model, engine, world, ac, a, tmp)
                rows.append(r)
                print(f"{model:8} {r['rows']:>7} {r['engine']:10} {world:5d} {r['predicted_mib']:10,.0f} "
                      f"{r['measured_mib']:10,.0f} {r['ratio']:6.2f}   steps "
                      f"{' '.join(f'{s:,.0f}' for s in r['step_peaks_mib'])}; "
                      f"{r['seconds']:.0f} s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    summary = f"largest error {worst:.1%} (goal on CPU: 15%); measure: {rows[0]['measure']}"
    print(summary)
    import torch

    where = (torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available()
             else f"cpu-{os.cpu_count()}core")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = Path(a.output or ROOT / "benchmarks" / "results" / where) / f"memory_estimate_{stamp}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, "summary": summary}, indent=1))
    lines = [head] + [f"{r['model']:8} {r['rows']:>7} {r['engine']:10} {r['world']:5d} {r['predicted_mib']:10,.0f} "
                      f"{r['measured_mib']:10,.0f} {r['ratio']:6.2f}" for r in rows] + [summary]
    dest.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
