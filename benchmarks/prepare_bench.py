"""Prepare at corpus scale: tokens/s per worker and peak memory on compressed JSONL (.zst, .gz) and Parquet.

    python benchmarks/prepare_bench.py [--compressed-gb 2.0] [--small-gb 0.2] [--vocab 8000]

Writes a corpus of about ``--compressed-gb`` on disk (40% .jsonl.zst, 40% .jsonl.gz, 20% .parquet, files of
~64 MB; Zipf-distributed words) into a temp folder that is deleted after, trains a byte-level BPE on a slice of
it, then runs, each in a fresh process so peak RSS is its own:

- ``baseline``: streams the same files (the same readers) and only tokenizes (no dedup, no shards), one process;
- ``prepare`` with 1 and 2 workers (``--workers``; peak RSS of the parent and the largest worker);
- ``prepare`` with 1 worker on the first ``--small-gb`` of the corpus: peak RSS must not grow with corpus size.

Goals (issue 9): RSS of the full run within 10% of the small run; prepare >= 0.8x the baseline's tokens/s;
2 workers >= 1.7x one. Writes benchmarks/results/prepare_bench_<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILE_BYTES = 64 << 20


def _words(rng: np.random.Generator, n: int = 20000) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1 / np.arange(1, 27) ** 0.9
    lengths = rng.integers(2, 10, size=n)
    return np.array(["".join(rng.choice(letters, size=k, p=p / p.sum())) for k in lengths])


def _documents(rng: np.random.Generator, vocab: np.ndarray, n_docs: int) -> list[str]:
    zipf = 1 / np.arange(1, len(vocab) + 1) ** 1.1
    ids = rng.choice(len(vocab), size=n_docs * 400, p=zipf / zipf.sum())
    lengths = rng.integers(100, 700, size=n_docs)
    out, at = [], 0
    for k in lengths:
        out.append(" ".join(vocab[ids[at % len(ids): at % len(ids) + k]]) + ".")
        at += k
    return out


def write_corpus(folder: Path, compressed_bytes: int, seed: int = 0) -> list[Path]:
    """Files until ``compressed_bytes`` are on disk; returns them in order."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = np.random.default_rng(seed)
    vocab = _words(rng)
    file_bytes = min(FILE_BYTES, max(1 << 20, compressed_bytes // 20))
    files, total, i = [], 0, 0
    while total < compressed_bytes:
        kind = ("zst", "gz", "zst", "gz", "parquet")[i % 5]
        path = folder / f"part-{i:05d}.{'parquet' if kind == 'parquet' else 'jsonl.' + kind}"
        size = 0
        if kind == "parquet":
            texts: list[str] = []
            while size < file_bytes * 3:  # Parquet (snappy) compresses these about 3x
                batch = _documents(rng, vocab, 2000)
                texts += batch
                size += sum(map(len, batch))
            pq.write_table(pa.table({"text": texts}), path, row_group_size=20000)
        else:
            raw = open(path, "wb")
            f = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) if kind == "gz" else \
                zstandard.ZstdCompressor(level=3).stream_writer(raw)
            while raw.tell() < file_bytes:
                f.write("".join(json.dumps({"text": t}) + "\n" for t in _documents(rng, vocab, 2000)).encode())
                f.flush()
            f.close()
            raw.close() if not raw.closed else None
        files.append(path)
        total += path.stat().st_size
        i += 1
    return files


def _rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    """One measured run; prints a JSON line."""
    files = json.loads(Path(args.files).read_text())
    t0 = time.perf_counter()
    if args.child == "baseline":
        from scaletrain.data.text import iter_documents
        from scaletrain.data.tokenizer import load_tokenizer

        tok, tokens, batch = load_tokenizer(args.tokenizer), 0, []
        for doc in iter_documents(files):
            batch.append(doc.text)
            if len(batch) == 512:
                tokens += sum(len(i) for i in tok.encode_batch(batch))
                batch = []
        tokens += sum(len(i) for i in tok.encode_batch(batch))
        workers = 1
    else:
        from scaletrain.data.prepare import prepare_domain

        m = prepare_domain("bench", files, args.out, tokenizer=args.tokenizer, workers=args.workers, quiet=True,
                           overwrite=True)
        tokens, workers = m.train.tokens - m.train.documents, args.workers  # ids only, as the baseline counts
    elapsed = time.perf_counter() - t0
    print(json.dumps({"run": args.child, "workers": workers, "tokens": tokens, "seconds": elapsed,
                      "tokens_per_s": tokens / elapsed, "tokens_per_s_per_worker": tokens / elapsed / workers,
                      "rss_parent_mib": _rss_mib(resource.RUSAGE_SELF),
                      "rss_largest_child_mib": _rss_mib(resource.RUSAGE_CHILDREN)}))


def run(kind: str, files: list[Path], tok: str, out: Path, work: Path, workers: int = 1) -> dict:
    listing = work / f"files-{kind}-{len(files)}.json"
    listing.write_text(json.dumps([str(f) for f in files]))
    cmd = [sys.executable, __file__, "--child", kind, "--files", str(listing), "--tokenizer", tok, "--out", str(out),
           "--workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {kind:9s} workers {result['workers']}  {result['tokens']:>13,} tokens  {result['seconds']:7.1f}s  "
          f"{result['tokens_per_s_per_worker']:>11,.0f} tokens/s/worker  RSS parent "
          f"{result['rss_parent_mib']:.0f} MiB, largest child {result['rss_largest_child_mib']:.0f} MiB", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressed-gb", type=float, default=2.0)
    p.add_argument("--small-gb", type=float, default=0.2)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--workdir", help="where the corpus goes (default: a temp folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    from scaletrain.data.tokenizer import train_bpe

    work = Path(tempfile.mkdtemp(prefix="prepare_bench-", dir=args.workdir))
    try:
        t0 = time.time()
        files = write_corpus(work, int(args.compressed_gb * 1e9))
        size = sum(f.stat().st_size for f in files)
        print(f"corpus: {len(files)} files, {size / 1e9:.2f} GB compressed, written in {time.time() - t0:.0f}s",
              flush=True)
        small, acc = [], 0
        for f in files:
            if acc >= args.small_gb * 1e9:
                break
            small.append(f)
            acc += f.stat().st_size
        tok, vocab = train_bpe([str(files[0])], args.vocab, str(work / "tok.json"))
        out = work / "out"
        results = {"baseline": run("baseline", files, tok, out, work),
                   "prepare_1": run("prepare", files, tok, out, work, 1),
                   "prepare_2": run("prepare", files, tok, out, work, 2),
                   "prepare_small_1": run("prepare", small, tok, out, work, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r = results
    ratios = {"prepare_vs_baseline": r["prepare_1"]["tokens_per_s"] / r["baseline"]["tokens_per_s"],
              "two_workers_vs_one": r["prepare_2"]["tokens_per_s"] / r["prepare_1"]["tokens_per_s"],
              "rss_full_vs_small": r["prepare_1"]["rss_parent_mib"] / r["prepare_small_1"]["rss_parent_mib"],
              "rss_2_workers_largest_child_mib": r["prepare_2"]["rss_largest_child_mib"]}
    print(f"prepare / tokenize-only baseline: {ratios['prepare_vs_baseline']:.2f}x (goal >= 0.8)\n"
          f"2 workers / 1 worker: {ratios['two_workers_vs_one']:.2f}x (goal >= 1.7; {os.cpu_count()} cores here)\n"
          f"peak RSS, {size / 1e9:.2f} GB run / {acc / 1e9:.2f} GB run: {ratios['rss_full_vs_small']:.3f} "
          f"(goal <= 1.10)")
    dest = ROOT / "benchmarks" / "results" / f"prepare_bench_{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "vocab": vocab,
                                "compressed_bytes": size, "small_compressed_bytes": acc, "runs": results,
                                "ratios": ratios}, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
