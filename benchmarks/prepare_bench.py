"""Prepare at corpus scale: peak memory flat in corpus size, tokens/s per worker against a tokenize-only baseline.

    python benchmarks/prepare_bench.py [--compressed-gb 2.0] [--small-gb 0.3] [--throughput-gb 0.1] [--vocab 8000]

Writes a corpus of ``--compressed-gb`` on disk (40% .jsonl.zst, 40% .jsonl.gz, 20% .parquet, files of ~64 MB;
Zipf-distributed random words, which compress 2.7x with gzip -1 and 3.4x with zstd -3, near web text) into a temp
folder that is deleted after.
Each run is a fresh process, so its peak RSS is its own (parent, and the largest worker):

- memory: ``prepare --no-dedup`` of the whole corpus and of its first ``--small-gb``, one worker, with the
  byte-level tokenizer (reading, decompression and shard writing at full size, without hours of BPE): the whole
  run's peak RSS must stay within 10% of the small run's. Then the whole corpus with exact-duplicate removal, on
  one and two workers: the content-hash table grows with the documents (16 bytes each, ~3x while it grows), and
  the difference to the first run is that cost;
- throughput: on another ``--throughput-gb`` in 8 MB files (a compressed file is one task, so two workers need
  several) with a BPE trained on it, a ``baseline`` that streams the
  same files with the same readers and only tokenizes (no dedup, no shards), and ``prepare`` with 1 and 2 workers.

Goals (issue 9): peak RSS whole / small <= 1.10; prepare >= 0.8x the baseline's tokens/s; 2 workers >= 1.7x one
(two workers share a 2-core machine with the parent that dedups and writes shards: 3% of a worker's CPU time).
Writes benchmarks/results/cpu-<N>core/prepare_bench_<time>.json.
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


class _Text:
    """Random words (Zipf over a 20k-word vocabulary of Zipf-lettered words) as bytes, vectorised."""

    def __init__(self, rng: np.random.Generator, n_words: int = 20000) -> None:
        letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
        p = 1 / np.arange(1, 27) ** 0.9
        lengths = rng.integers(2, 10, size=n_words)
        width = int(lengths.max()) + 1
        table = np.full((n_words, width), 0, dtype=np.uint8)  # 0 = padding, dropped
        for i, k in enumerate(lengths):
            table[i, :k] = rng.choice(letters, size=k, p=p / p.sum())
            table[i, k] = ord(" ")
        self.table, self.rng = table, rng
        zipf = 1 / np.arange(1, n_words + 1) ** 1.1
        self.p = zipf / zipf.sum()

    def documents(self, n_docs: int) -> list[bytes]:
        lengths = self.rng.integers(100, 700, size=n_docs)
        ids = self.rng.choice(len(self.table), size=int(lengths.sum()), p=self.p)
        flat = self.table[ids].ravel()
        word_ends = np.cumsum(lengths)
        # byte offset where each document ends: count kept bytes per word, then cumulate at document ends
        per_word = (self.table[ids] != 0).sum(axis=1)
        ends = np.cumsum(per_word)[word_ends - 1]
        data = flat[flat != 0].tobytes()
        starts = np.concatenate([[0], ends[:-1]])
        return [data[a:b - 1] + b"." for a, b in zip(starts.tolist(), ends.tolist())]


def write_corpus(folder: Path, compressed_bytes: int, seed: int = 0, file_bytes: int = FILE_BYTES) -> list[Path]:
    """Files of about ``file_bytes`` until ``compressed_bytes`` are on disk; returns them in order."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    gen = _Text(np.random.default_rng(seed))
    folder.mkdir(parents=True, exist_ok=True)
    file_bytes = min(file_bytes, max(1 << 20, compressed_bytes // 20))
    files, total, i = [], 0, 0
    while total < compressed_bytes:
        kind = ("zst", "gz", "zst", "gz", "parquet")[i % 5]
        path = folder / f"part-{i:05d}.{'parquet' if kind == 'parquet' else 'jsonl.' + kind}"
        if kind == "parquet":
            texts: list[str] = []
            size = 0
            while size < file_bytes * 2.5:  # Parquet (snappy) compresses these about 2.5x
                batch = gen.documents(4000)
                texts += [t.decode() for t in batch]
                size += sum(map(len, batch))
            pq.write_table(pa.table({"text": texts}), path, row_group_size=20000)
        else:
            with open(path, "wb") as raw:
                f = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) if kind == "gz" else \
                    zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
                while raw.tell() < file_bytes:  # the letters need no JSON escaping
                    f.write(b"".join(b'{"text": "' + t + b'"}\n' for t in gen.documents(4000)))
                    f.flush()
                f.close()
        files.append(path)
        total += path.stat().st_size
        i += 1
    return files


def _peak_rss_mib() -> float:
    """This process's own peak RSS: VmHWM (getrusage's ru_maxrss survives exec, so a child started from a big
    parent would report the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _children_rss_mib() -> float:
    """The largest peak RSS of the workers (forked from this process: pages shared with it count in both)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """One measured run; prints a JSON line."""
    files = json.loads(Path(args.files).read_text())
    if args.child == "baseline":
        from scaletrain.data.text import iter_documents
        from scaletrain.data.tokenizer import load_tokenizer
    else:
        from scaletrain.data.prepare import prepare_domain
    t0 = time.perf_counter()  # imports aside (prepare's pulls in webdataset and torch: a constant, not throughput)
    if args.child == "baseline":
        tok, tokens, batch = load_tokenizer(args.tokenizer or None), 0, []
        for doc in iter_documents(files):
            batch.append(doc.text)
            if len(batch) == 512:
                tokens += sum(len(i) for i in tok.encode_batch(batch))
                batch = []
        tokens += sum(len(i) for i in tok.encode_batch(batch))
        workers = 1
    else:
        m = prepare_domain("bench", files, args.out, tokenizer=args.tokenizer or None, workers=args.workers,
                           quiet=True, overwrite=True, dedup=args.child == "prepare")
        tokens, workers = m.train.tokens - m.train.documents, args.workers  # ids only, as the baseline counts
    elapsed = time.perf_counter() - t0
    print(json.dumps({"run": args.child, "workers": workers, "tokens": tokens, "seconds": elapsed,
                      "tokens_per_s": tokens / elapsed, "tokens_per_s_per_worker": tokens / elapsed / workers,
                      "rss_parent_mib": _peak_rss_mib(),
                      "rss_largest_child_mib": _children_rss_mib() if workers > 1 else 0.0}))


def run(kind: str, files: list[Path], tok: str | None, out: Path, work: Path, workers: int = 1) -> dict:
    """``kind``: baseline, prepare, or prepare-nodedup."""
    listing = work / f"files-{kind}-{len(files)}.json"
    listing.write_text(json.dumps([str(f) for f in files]))
    cmd = [sys.executable, __file__, "--child", kind, "--files", str(listing), "--tokenizer", tok or "",
           "--out", str(out), "--workers", str(workers)]
    # one core per worker: the Hugging Face tokenizer's own threads (on by default in one process) would make
    # "1 worker" two cores here, and prepare's workers turn them off
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {kind:9s} {'BPE' if tok else 'byte'} workers {result['workers']}  {result['tokens']:>13,} tokens  "
          f"{result['seconds']:7.1f}s  {result['tokens_per_s_per_worker']:>11,.0f} tokens/s/worker  RSS parent "
          f"{result['rss_parent_mib']:.0f} MiB, largest child {result['rss_largest_child_mib']:.0f} MiB", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressed-gb", type=float, default=2.0)
    p.add_argument("--small-gb", type=float, default=0.3, help="at least the first five files, so that the small "
                                                               "run reads every kind (Parquet is the fifth)")
    p.add_argument("--throughput-gb", type=float, default=0.1)
    p.add_argument("--parts", nargs="+", default=["memory", "throughput"], choices=["memory", "throughput"])
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
        # the big corpus only for the memory runs (``--parts throughput`` alone writes 0.1 GB)
        files = write_corpus(work / "big", int(args.compressed_gb * 1e9 if "memory" in args.parts else 1))
        size = sum(f.stat().st_size for f in files)
        print(f"corpus: {len(files)} files, {size / 1e9:.2f} GB compressed, written in {time.time() - t0:.0f}s",
              flush=True)
        def head(gb: float) -> tuple[list[Path], int]:
            chosen, acc = [], 0
            for f in files:
                if acc >= gb * 1e9:
                    break
                chosen.append(f)
                acc += f.stat().st_size
            return chosen, acc

        small, small_size = head(args.small_gb)
        # throughput: its own corpus of 8 MB files, so two workers have tasks to share (a compressed file is one)
        fast = write_corpus(work / "fast", int(args.throughput_gb * 1e9), seed=1, file_bytes=8 << 20)
        fast_size = sum(f.stat().st_size for f in fast)
        tok, vocab = train_bpe([str(fast[0])], args.vocab, str(work / "tok.json"))
        out = work / "out"
        print(f"memory: byte-level tokenizer, {size / 1e9:.2f} GB vs {small_size / 1e9:.2f} GB", flush=True)
        results = {}
        if "memory" in args.parts:
            results.update({"memory_full_1": run("prepare-nodedup", files, None, out, work, 1),
                            "memory_small_1": run("prepare-nodedup", small, None, out, work, 1),
                            "dedup_full_1": run("prepare", files, None, out, work, 1),
                            "dedup_full_2": run("prepare", files, None, out, work, 2)})
        if "throughput" in args.parts:
            print(f"throughput: BPE (vocab {vocab}), {len(fast)} files, {fast_size / 1e9:.2f} GB", flush=True)
            results.update({"baseline": run("baseline", fast, tok, out, work),
                            "prepare_1": run("prepare", fast, tok, out, work, 1),
                            "prepare_2": run("prepare", fast, tok, out, work, 2)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r, ratios = results, {}
    if "throughput" in args.parts:
        ratios.update({"prepare_vs_baseline": r["prepare_1"]["tokens_per_s"] / r["baseline"]["tokens_per_s"],
                       "two_workers_vs_one": r["prepare_2"]["tokens_per_s"] / r["prepare_1"]["tokens_per_s"]})
        print(f"prepare / tokenize-only baseline: {ratios['prepare_vs_baseline']:.2f}x (goal >= 0.8)\n"
              f"2 workers / 1 worker: {ratios['two_workers_vs_one']:.2f}x (goal >= 1.7; {os.cpu_count()} cores here)")
    if "memory" in args.parts:
        full, small_run = r["memory_full_1"]["rss_parent_mib"], r["memory_small_1"]["rss_parent_mib"]
        ratios.update({"rss_full_vs_small": full / small_run,
                       "dedup_table_mib": r["dedup_full_1"]["rss_parent_mib"] - r["memory_full_1"]["rss_parent_mib"]})
        print(f"peak RSS without dedup, {size / 1e9:.2f} GB run / {small_size / 1e9:.2f} GB run: "
              f"{ratios['rss_full_vs_small']:.3f} (goal <= 1.10)\n"
              f"exact-duplicate table: +{ratios['dedup_table_mib']:.0f} MiB of peak RSS at {size / 1e9:.2f} GB")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = ROOT / "benchmarks" / "results" / f"cpu-{os.cpu_count()}core" / f"prepare_bench_{stamp}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "vocab": vocab,
                                "compressed_bytes": size, "small_compressed_bytes": small_size,
                                "throughput_compressed_bytes": fast_size, "runs": results,
                                "ratios": ratios}, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
