"""The demo: write the embedded sample corpus, prepare shards per domain, show the mixing,
and pre-train for a few steps through the default engine (FSDP2, a world of one).

    python launch/demo.py [--data-dir data/sample] [--steps 20] [--prepare-only]
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from scaletrain.cli import parse_config
from scaletrain.data.loader import ShardLoader, StreamSpec
from scaletrain.data.prepare import MANIFEST, prepare_domain
from scaletrain.data.sample import create_sample_pretraining_data

SOURCES, WEIGHTS = ["arxiv", "general"], [0.3, 0.7]


def prepare_sample(data_dir: Path) -> Path:
    """Sample corpus -> shards (skipped when already prepared); returns the shards folder."""
    shards = data_dir / "pretraining"
    if all((shards / d / MANIFEST).exists() for d in SOURCES):
        print(f"sample shards already in {shards}")
        return shards
    raw = create_sample_pretraining_data(data_dir)
    for d in SOURCES:
        prepare_domain(d, [str(raw[d])], str(shards), workers=os.cpu_count() or 1, val_fraction=0.02,
                       shard_tokens=2**18, chunk_tokens=2**16, overwrite=True)
    return shards


def show_mixing(shards: Path, rows: int = 4000, seq: int = 256) -> None:
    spec = StreamSpec(str(shards), tuple(SOURCES), tuple(WEIGHTS), seq, 8, 1, 0, 1, 0)
    loader = ShardLoader(spec)
    for _ in range(rows // 8):
        next(loader)
    pos = np.array(list(loader.state_dict()["domain_pos"].values()), dtype=np.float64)
    shares = pos / pos.sum()
    print(f"mixing over {rows} packed rows of {seq + 1} tokens: " +
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
                        "--save-interval", "0", "--run-name", "demo", *rest])
    result = train(cfg)
    print(f"demo done: {result.steps} steps, {result.tokens_seen:,} tokens, last loss {result.last_loss:.3f}")
    sys.stdout.flush()
    os._exit(0)  # see launch/pretrain.py


if __name__ == "__main__":
    main()
