"""The demo: write the embedded sample corpus, prepare shards per domain, show the mixing,
and pre-train for a few steps through the default engine (FSDP2, a world of one).

    python launch/demo.py [--data-dir data/sample] [--steps 20] [--prepare-only]
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from scaletrain.cli import parse_config
from scaletrain.data.loader import ShardLoader, StreamSpec
from scaletrain.data.sample import SAMPLE_SOURCES, SAMPLE_WEIGHTS, prepare_sample
from scaletrain.errors import INTERRUPTED, leave

SOURCES, WEIGHTS = list(SAMPLE_SOURCES), list(SAMPLE_WEIGHTS)


def show_mixing(shards: Path, rows: int = 4000, seq: int = 256) -> None:
    spec = StreamSpec(str(shards), tuple(SOURCES), tuple(WEIGHTS), seq, 8, 1, 0, 1, 0)
    loader = ShardLoader(spec)
    for _ in range(rows // 8):
        next(loader)
    tokens = np.array(list(loader.state_dict()["domain_tokens"].values()), dtype=np.float64)
    shares = tokens / tokens.sum()
    print(f"mixing over {rows} packed rows of {seq + 1} tokens: token share " +
          ", ".join(f"{d} {s:.1%} (weight {w:.0%})" for d, s, w in zip(SOURCES, shares, WEIGHTS)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/sample")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prepare-only", action="store_true")
    a, rest = p.parse_known_args()
    shards = prepare_sample(Path(a.data_dir))
    show_mixing(shards)
    if a.prepare_only:
        return
    from scaletrain.trainer import train

    cfg = parse_config(["--data-dir", str(shards), "--data-sources", *SOURCES, "--data-mix-weights",
                        *map(str, WEIGHTS), "--model-size", "tiny", "--max-seq-length", "256", "--batch-size", "8",
                        "--max-steps", str(a.steps), "--warmup-steps", str(max(1, a.steps // 10)),
                        "--learning-rate", "3e-3", "--log-interval", "5", "--eval-interval", str(a.steps),
                        "--checkpoint-dir", "checkpoints/demo", "--run-name", "demo",
                        "--overwrite-checkpoints",  # each demo starts over, in its own folder
                        # fp32 on a CPU: the same losses on any CPU (one without native bf16 emulates it, 6.8x
                        # slower a step where measured)
                        "--mixed-precision", "bf16" if torch.cuda.is_available() else "fp32", *rest])
    demo_logs = Path(cfg.run_dir) / "demo"
    if cfg.run_name == "demo" and demo_logs.is_dir():
        # the demo starts over each time, its logs too (a run of another name that starts over sets them aside)
        import shutil

        shutil.rmtree(demo_logs)
    result = train(cfg)
    if result.interrupted:  # Ctrl-C: the trainer said where it saved
        leave(INTERRUPTED)
    if result.steps < cfg.max_steps:  # a signal, --stop-at-step: the trainer said why and where it saved
        return
    print(f"demo done: {result.steps} steps, {result.tokens_seen:,} tokens, last loss {result.last_loss:.3f}")


if __name__ == "__main__":
    from scaletrain.errors import run_entry

    run_entry(main, hard_exit=True)
