"""Loader throughput: packed, mixed micro-batches from the shards against a numpy memmap reader of
random batches over the same tokens, and webdataset's own sequential tar reader, in one run.
Also prepare throughput (tokens/s per worker) for the byte tokenizer and a trained BPE.

    python benchmarks/loader_throughput.py [--scale 1.0] [--batch 8] [--seq 2048] [--batches 300]

Rounds interleave the readers so machine noise hits all alike; medians are reported.
Goal: our loader >= 1.0x the memmap reader. Writes benchmarks/results/loader_throughput_<time>.json.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaletrain.data.loader import ShardLoader, StreamSpec  # noqa: E402
from scaletrain.data.prepare import prepare_domain  # noqa: E402
from scaletrain.data.sample import create_sample_pretraining_data  # noqa: E402
from scaletrain.data.shards import DomainStream  # noqa: E402
from scaletrain.data.tokenizer import train_bpe  # noqa: E402

SOURCES = ("arxiv", "general")


def memmap_reader(flat: np.memmap, batch: int, seq: int, seed: int):
    """The baseline: random (seq+1)-token windows of one flat token file."""
    rng = np.random.default_rng(seed)
    hi = len(flat) - seq - 1
    while True:
        offs = rng.integers(0, hi, size=batch)
        t = torch.from_numpy(np.stack([flat[o: o + seq + 1] for o in offs]).astype(np.int64))
        yield t[:, :-1].contiguous(), t[:, 1:].contiguous()


def wds_reader(urls: list[str], batch: int, seq: int):
    """webdataset's sequential reader, members concatenated and cut into packed rows (no mixing)."""
    import webdataset as wds

    L = seq + 1
    while True:
        buf = np.empty(0, dtype=np.int64)
        for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None):
            buf = np.concatenate([buf, np.frombuffer(sample["u16"], dtype="<u2").astype(np.int64)])
            while len(buf) >= batch * L:
                t = torch.from_numpy(buf[: batch * L].reshape(batch, L))
                buf = buf[batch * L:]
                yield t[:, :-1].contiguous(), t[:, 1:].contiguous()


def timed(it, n: int) -> float:
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(n):
        x = next(it)[0]
        tokens += x.numel()
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="sample corpus size (1.0: about 7M tokens)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loader_bench_"))
    raw = create_sample_pretraining_data(work, scale=a.scale)

    # ---- prepare throughput ----
    prep_rows = []
    tok, _ = train_bpe([str(raw["general"])], 8000, str(work / "bpe.json"))
    for name, tk in (("byte", None), ("bpe-8k", tok)):
        for workers in (1, 2):
            out = work / f"prep_{name}_{workers}"
            t0 = time.perf_counter()
            ms = [prepare_domain(d, [str(raw[d])], str(out), tokenizer=tk, workers=workers, quiet=True)
                  for d in SOURCES]
            dt = time.perf_counter() - t0
            tokens = sum(m.train.tokens + m.val.tokens for m in ms)
            prep_rows.append({"tokenizer": name, "workers": workers, "tokens": tokens, "seconds": dt,
                              "tokens_per_s": tokens / dt, "tokens_per_s_per_worker": tokens / dt / workers})
    data = work / "prep_byte_1"

    # ---- readers over the same tokens ----
    streams = [DomainStream(data / d) for d in SOURCES]
    flat_path = work / "flat.bin"
    with open(flat_path, "wb") as f:
        for s in streams:
            f.write(s.read(0, s.total).astype(np.uint16).tobytes())
    flat = np.memmap(flat_path, dtype=np.uint16, mode="r")
    urls = [str(data / d / sh.file) for d, s in zip(SOURCES, streams) for sh in s.shards]
    spec = StreamSpec(str(data), SOURCES, (0.3, 0.7), a.seq, a.batch, 1, 0, 1, 0)
    readers = {"scaletrain (mixed, packed)": iter(ShardLoader(spec)),
               "numpy memmap, random batches": memmap_reader(flat, a.batch, a.seq, 0),
               "webdataset sequential": wds_reader(urls, a.batch, a.seq)}
    results: dict[str, list[float]] = {k: [] for k in readers}
    for _ in range(a.rounds):
        for k, it in readers.items():
            timed(it, 5)  # warm
            results[k].append(timed(it, a.batches))
    # member verification (checksum + id range) happens on a member's first read: measure fresh loaders, whose
    # every member is new, with and without it, alternating
    first: dict[bool, list[float]] = {True: [], False: []}
    for verify in (True, False) * a.rounds:
        DomainStream.verify_members = verify
        first[verify].append(timed(iter(ShardLoader(spec)), a.batches))
    DomainStream.verify_members = True
    base = statistics.median(results["numpy memmap, random batches"])
    print(f"\nloader throughput, one process, batches of {a.batch} x {a.seq}, {len(flat):,} tokens, "
          f"median of {a.rounds} rounds x {a.batches} batches, {os.cpu_count()} cores")
    print(f"{'reader':<32}{'tokens/s':>16}{'vs memmap':>11}")
    rows = []
    for k, v in results.items():
        med = statistics.median(v)
        rows.append({"reader": k, "tokens_per_s": med, "ratio_vs_memmap": med / base})
        print(f"{k:<32}{med:>16,.0f}{med / base:>10.2f}x")
    fv, fu = statistics.median(first[True]), statistics.median(first[False])
    rows.append({"reader": "scaletrain first pass, verified", "tokens_per_s": fv, "ratio_vs_memmap": fv / base})
    rows.append({"reader": "scaletrain first pass, unverified", "tokens_per_s": fu, "ratio_vs_memmap": fu / base})
    print(f"first pass over fresh loaders (every member checked on first read): verified {fv:,.0f} tokens/s "
          f"({fv / base:.2f}x memmap), unverified {fu:,.0f} ({fu / base:.2f}x): verification costs "
          f"{1 - fv / fu:.1%} of the first pass")
    print(f"\nprepare throughput ({prep_rows[0]['tokens']:,} tokens, sample corpus at scale {a.scale})")
    print(f"{'tokenizer':<10}{'workers':>8}{'tokens/s':>14}{'per worker':>14}")
    for r in prep_rows:
        print(f"{r['tokenizer']:<10}{r['workers']:>8}{r['tokens_per_s']:>14,.0f}{r['tokens_per_s_per_worker']:>14,.0f}")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"loader_throughput_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(a), "readers": rows, "prepare": prep_rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
