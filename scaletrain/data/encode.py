"""Tasks -> token pieces, on ``--workers`` processes, in task order; and the exact-duplicate filter.

Each worker reads, cleans and tokenizes whole tasks (``sources.Task``: a file, a byte range of a JSONL file, some
row groups of a Parquet file) and sends their documents back in pieces of a few MB. A free worker claims the next
unclaimed task (a shared counter; ``owner[i]`` records who took task ``i``). The parent takes the pieces task by
task in order, task ``i`` from its owner's queue: a worker claims in increasing order and the parent has consumed
its earlier tasks, so the head of that queue is task ``i``. The documents thus reach the shard writer in the same
order for any number of workers (hence byte-identical shards).

A worker never waits for the parent. While the parent is still on an earlier task (say a 40 MB .json.gz, fifty
pieces), the others run ahead: each keeps at most ``QUEUE_PIECES`` pieces in memory in flight and writes the rest
to files in the spill folder, which the parent reads back (and deletes) when their turn comes. Blocking on a full
queue instead measured 1.23x-1.44x for two workers on 8 MB files where two independent tokenizers get 1.81x
(``benchmarks/prepare_bench.py``): each worker stalled behind the other's task. What runs ahead is bounded by
tasks, not bytes: no worker claims a task more than ``LOOKAHEAD_TASKS`` per worker past the one the parent is on,
so the spill folder holds at most the pieces of that many tasks. Memory: ``workers x QUEUE_PIECES`` pieces. One
worker reads in-process, through the same code.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import xxhash

from .reader import Reader, ReadOptions, ReadStats
from .sources import Task
from .tokenizer import load_tokenizer

PIECE_DOCS, PIECE_CHARS, QUEUE_PIECES, LOOKAHEAD_TASKS = 512, 4 << 20, 4, 4


@dataclass
class Piece:
    """Documents of one task, tokenized: per document its content hash, split and length; tokens concatenated."""

    hashes: np.ndarray  # (n,) uint64, xxh3-64 of the UTF-8 text
    val: np.ndarray  # (n,) bool
    lengths: np.ndarray  # (n,) int64
    tokens: np.ndarray  # (sum lengths,) in the shards' dtype
    special: np.ndarray  # (n,) int32: the first special token's string the text spells out (its index), or -1


def is_val(text: str, fraction: float) -> bool:
    """Content-based hold-out: the same document always lands on the same side."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


@dataclass
class SpillStats:
    """Pieces that waited on disk because their worker ran ahead of the parent."""

    pieces: int = 0
    bytes: int = 0


def _spill(piece: Piece, folder: Path, name: str) -> Path:
    """Five .npy arrays back to back in one file (no zip, no CRC: the file lives seconds, on local disk)."""
    path = folder / f"{name}.npy"
    with open(path, "wb") as f:
        for a in (piece.hashes, piece.val, piece.lengths, piece.tokens, piece.special):
            np.save(f, a, allow_pickle=False)
    return path


def _unspill(path: Path) -> Piece:
    with open(path, "rb") as f:
        piece = Piece(*(np.load(f, allow_pickle=False) for _ in range(5)))
    path.unlink()
    return piece


@dataclass(frozen=True)
class EncodeSpec:
    opts: ReadOptions
    tokenizer: str | None
    eos_token: str | None
    bos_token: str | None
    val_fraction: float
    dtype: str
    parse_special: bool = False


def _piece(texts: list[str], tok, spec: EncodeSpec, all_val: bool = False) -> Piece:
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
    tokens = np.concatenate(ids).astype(spec.dtype) if ids else np.zeros(0, spec.dtype)
    hashes = np.fromiter((xxhash.xxh3_64_intdigest(t.encode("utf-8")) for t in texts), np.uint64, len(texts))
    val = np.ones(len(texts), dtype=bool) if all_val else \
        np.fromiter((is_val(t, spec.val_fraction) for t in texts), dtype=bool, count=len(texts))
    special = np.fromiter((tok.special_in(t) for t in texts), dtype=np.int32, count=len(texts))
    return Piece(hashes, val, lengths, tokens, special)


def encode_task(task: Task, reader: Reader, tok, spec: EncodeSpec) -> Iterator[Piece]:
    texts: list[str] = []
    chars = 0
    for doc in reader.read(task):
        texts.append(doc.text)
        chars += len(doc.text)
        if len(texts) >= PIECE_DOCS or chars >= PIECE_CHARS:
            yield _piece(texts, tok, spec, task.val)
            texts, chars = [], 0
    if texts:
        yield _piece(texts, tok, spec, task.val)


def _claim(claim, head, n_tasks: int, lookahead: int) -> int | None:
    """The next task, once it is within ``lookahead`` of the one the parent is on; None when all are taken."""
    while True:
        with claim.get_lock():
            i = claim.value
            if i >= n_tasks:
                return None
            if i <= head.value + lookahead:
                claim.value = i + 1
                return i
        time.sleep(0.005)


def _worker(w: int, tasks: list[Task], q, slots, spill_dir: Path, spec: EncodeSpec, claim, head, owner,
            lookahead: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    try:
        tok = load_tokenizer(spec.tokenizer, spec.eos_token, spec.bos_token, spec.parse_special)
        n = 0
        while (i := _claim(claim, head, len(tasks), lookahead)) is not None:
            owner[i] = w
            stats = ReadStats()
            reader = Reader(spec.opts, stats)
            for piece in encode_task(tasks[i], reader, tok, spec):
                if slots.acquire(block=False):  # room in memory: the parent releases the slot when it takes it
                    q.put(("piece", piece))
                else:
                    n += 1
                    q.put(("spill", str(_spill(piece, spill_dir, f"w{w}-{n}"))))
            q.put(("done", stats))
    except BaseException as e:  # noqa: BLE001 - every failure goes to the parent, which names it
        try:
            pickle.dumps(e)
            q.put(("error", e))
        except Exception:
            q.put(("error", RuntimeError(f"prepare worker {w}: {traceback.format_exc()}")))


def _get(q, proc, w: int):
    while True:
        try:
            return q.get(timeout=2)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"prepare worker {w} died (exit code {proc.exitcode}); if it was killed for "
                                   f"memory, lower --workers or --max-document-bytes") from None


def _owner(owner, i: int, procs) -> int:
    """The worker that claimed task ``i`` (claimed in order, so it is being taken or soon will be)."""
    waited = 0.0
    while owner[i] < 0:
        time.sleep(0.001)
        waited += 0.001
        if waited > 2 and not any(p.is_alive() for p in procs):
            codes = [p.exitcode for p in procs]
            raise RuntimeError(f"every prepare worker has exited (exit codes {codes}) before task {i} was taken")
    return owner[i]


def encoded_pieces(tasks: list[Task], spec: EncodeSpec, workers: int, stats: ReadStats, spill_dir: Path,
                   spilled: SpillStats | None = None) -> Iterator[Piece]:
    """The pieces of every task, in task order; each task's read counts are added to ``stats``. ``spill_dir``:
    where pieces that ran ahead wait (created, and removed at the end); ``spilled`` counts them."""
    if workers <= 1 or len(tasks) <= 1:
        tok = load_tokenizer(spec.tokenizer, spec.eos_token, spec.bos_token, spec.parse_special)
        for task in tasks:
            task_stats = ReadStats()
            yield from encode_task(task, Reader(spec.opts, task_stats), tok, spec)
            stats.add(task_stats)
        return
    workers = min(workers, len(tasks))
    spilled = spilled if spilled is not None else SpillStats()
    spill_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")
    queues = [ctx.Queue() for _ in range(workers)]  # unbounded: what a worker sends past its slots is a file name
    slots = [ctx.BoundedSemaphore(QUEUE_PIECES) for _ in range(workers)]
    claim, head = ctx.Value("q", 0), ctx.Value("q", 0, lock=False)
    owner = ctx.Array("i", [-1] * len(tasks), lock=False)
    lookahead = LOOKAHEAD_TASKS * workers
    procs = [ctx.Process(target=_worker, args=(w, tasks, queues[w], slots[w], spill_dir, spec, claim, head, owner,
                                               lookahead), daemon=True) for w in range(workers)]
    for p in procs:
        p.start()
    try:
        for i in range(len(tasks)):
            head.value = i
            w = _owner(owner, i, procs)
            while True:
                kind, payload = _get(queues[w], procs[w], w)
                if kind == "piece":
                    slots[w].release()
                    yield payload
                elif kind == "spill":
                    spilled.pieces += 1
                    spilled.bytes += os.path.getsize(payload)
                    yield _unspill(Path(payload))
                elif kind == "done":
                    stats.add(payload)
                    break
                else:
                    raise payload
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        shutil.rmtree(spill_dir, ignore_errors=True)


class SeenHashes:
    """Exact-duplicate filter over 64-bit content hashes: an open-addressing table in one numpy array (16 bytes
    per document at the 0.5 load it keeps, against about 70 for a Python set of ints). With 64-bit hashes two
    different documents collide with probability n^2 / 2^65: under 1e-4 for 50M documents."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.table = np.zeros(capacity, dtype=np.uint64)  # 0 = empty slot
        self.n = 0

    def add(self, hashes: np.ndarray) -> np.ndarray:
        """Insert ``hashes``; returns a mask of those seen for the first time (the first of equal ones in the
        batch counts as first)."""
        h = np.where(hashes == 0, np.uint64(1), hashes).astype(np.uint64)
        first = np.zeros(len(h), dtype=bool)
        if not len(h):
            return first
        _, idx = np.unique(h, return_index=True)
        idx.sort()
        while (self.n + len(idx)) * 2 > len(self.table):
            self._grow()
        new = self._insert(h[idx])
        first[idx[new]] = True
        self.n += int(new.sum())
        return first

    def _insert(self, h: np.ndarray) -> np.ndarray:
        """Linear probing, vectorised; ``h`` holds distinct non-zero values."""
        mask = np.uint64(len(self.table) - 1)
        slot = h & mask
        new = np.zeros(len(h), dtype=bool)
        pending = np.arange(len(h))
        while pending.size:
            cur = self.table[slot[pending]]
            found = cur == h[pending]
            empty = cur == 0
            claim = pending[empty]
            self.table[slot[claim]] = h[claim]  # several may claim one slot: one value stays
            won = self.table[slot[claim]] == h[claim]
            new[claim[won]] = True
            pending = np.concatenate([pending[~found & ~empty], claim[~won]])
            slot[pending] = (slot[pending] + np.uint64(1)) & mask
        return new

    def _grow(self) -> None:
        old = self.table[self.table != 0]
        self.table = np.zeros(len(self.table) * 2, dtype=np.uint64)
        self._insert(old)
