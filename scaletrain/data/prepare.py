"""Text -> tokenized, packed WebDataset shards, one folder per domain.

    scaletrain prepare --domain arxiv --input papers/ more.jsonl --output data/pretraining \\
        [--tokenizer tok.json] [--workers 2] [--val-fraction 0.01]

Documents are tokenized in parallel (order kept), joined with EOS and cut into tar members of
``--chunk-tokens`` tokens (raw little-endian uint16/uint32 arrays, key ``NNNNN_CCCCCC``, extension
``u16``/``u32``); a shard holds up to ``--shard-tokens`` tokens. Tars are written with webdataset's
TarWriter in USTAR format with mtime 0: one 512-byte header per member and the same bytes for the
same input. ``manifest.json`` lists the shards, their members' data offsets and token counts, and
the tokenizer with its special tokens (``manifest.py`` is the contract). ``--add-bos`` puts the
tokenizer's BOS before every document (recorded, so an export adds it exactly as training saw it).
The domain folder appears only when complete (written under a temporary name, then renamed); an
existing one is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import webdataset as wds
import xxhash

from scaletrain.faults import kill_between_renames

from .manifest import MANIFEST, TOKENIZER_FILE, Manifest, Shard, Split
from .text import Document, InputError, ReadStats, iter_documents
from .tokenizer import load_tokenizer, token_dtype

_worker_tok = None


def _init_worker(path: str | None, eos: str | None, bos: str | None) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the process pool
    _worker_tok = load_tokenizer(path, eos, bos)


def _encode(texts: list[str], val_fraction: float) -> list[tuple[bool, np.ndarray]]:
    return list(zip((_is_val(t, val_fraction) for t in texts), _worker_tok.encode_batch(texts)))


def _is_val(text: str, fraction: float) -> bool:
    """Content-based hold-out: the same document always lands on the same side."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


class ShardWriter:
    """Packs a token stream into tar shards of fixed-size members; records their layout."""

    def __init__(self, folder: Path, dtype: np.dtype, chunk_tokens: int, shard_tokens: int) -> None:
        self.folder, self.dtype = folder, dtype
        self.ext = "u16" if dtype == np.uint16 else "u32"
        self.chunk_tokens = chunk_tokens
        self.chunks_per_shard = max(1, shard_tokens // chunk_tokens)
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[Shard] = []
        self._tar: wds.TarWriter | None = None
        self._chunks_in_shard = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        while self.buffered >= self.chunk_tokens:
            flat = np.concatenate(self.buffer)
            self._write_chunk(flat[: self.chunk_tokens])
            rest = flat[self.chunk_tokens:]
            self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def _write_chunk(self, chunk: np.ndarray) -> None:
        if self._tar is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"shard-{len(self.shards):05d}.tar"
            self._tar = wds.TarWriter(str(self.folder / name), mtime=0, user="scaletrain", group="scaletrain",
                                      encoder=False)
            self.shards.append(Shard(file=name, tokens=0, bytes=0, members=[]))
        key = f"{len(self.shards) - 1:05d}_{self._chunks_in_shard:06d}"
        self._tar.write({"__key__": key, self.ext: chunk.astype(self.dtype.newbyteorder("<")).tobytes()})
        self._chunks_in_shard += 1
        self.tokens += len(chunk)
        if self._chunks_in_shard == self.chunks_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self._tar.close()
        self._tar = None
        self._chunks_in_shard = 0
        info = self.shards[-1]
        path = self.folder / info.file
        # index the tar with the stdlib reader: data offsets for random access and a check of what we wrote
        with tarfile.open(path) as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
        itemsize = self.dtype.itemsize
        with open(path, "rb") as f:  # each member's checksum, verified by the reader on first use
            digests = []
            for m in members:
                f.seek(m.offset_data)
                digests.append(xxhash.xxh3_64_hexdigest(f.read(m.size)))
        info.members = [[m.name, m.offset_data, m.size // itemsize, d] for m, d in zip(members, digests)]
        info.tokens = sum(m.size for m in members) // itemsize
        info.bytes = path.stat().st_size

    def finish(self) -> list[Shard]:
        if self.buffered:
            self._write_chunk(np.concatenate(self.buffer))
            self.buffer, self.buffered = [], 0
        if self._tar is not None:
            self._close_shard()
        return self.shards


def _batches(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _recover_domain(root: Path, domain: str) -> list[str]:
    """Finish or undo an ``--overwrite`` that a crash interrupted between its two renames: a complete new
    preparation (it has a manifest) takes the missing domain folder's place, else the previous one is put back;
    leftover old copies are removed. Returns what it did."""
    out, done = root / domain, []
    for old in sorted(root.glob(f".{domain}.old-*")) if root.is_dir() else []:
        if not out.exists():
            new = next((t for t in sorted(root.glob(f".{domain}.tmp-*")) if (t / MANIFEST).is_file()), None)
            if new is not None:
                new.rename(out)
                done.append(f"{out}: committed the new preparation (a crash fell between its renames)")
            else:
                old.rename(out)
                done.append(f"{out}: restored the previous preparation (its replacement was incomplete)")
                continue
        shutil.rmtree(old, ignore_errors=True)
        done.append(f"removed {old.name}, the copy an interrupted --overwrite replaced")
    return done


def prepare_domain(domain: str, inputs: Sequence[str], output: str, tokenizer: str | None = None,
                   eos_token: str | None = None, workers: int = 1, val_fraction: float = 0.0,
                   shard_tokens: int = 2**26, chunk_tokens: int = 2**18, skip_bad_lines: bool = False,
                   overwrite: bool = False, quiet: bool = False, add_bos: bool = False,
                   bos_token: str | None = None) -> Manifest:
    """Prepare one domain; returns its manifest."""
    if not domain or "/" in domain or domain.startswith("."):
        raise InputError(f"--domain {domain!r}: use a plain folder name such as 'arxiv'")
    if not 0 <= val_fraction < 1:
        raise InputError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if chunk_tokens <= 0 or shard_tokens < chunk_tokens:
        raise InputError(f"--chunk-tokens {chunk_tokens} / --shard-tokens {shard_tokens}: need 0 < chunk <= shard")
    out = Path(output) / domain
    for line in _recover_domain(Path(output), domain):
        print(f"scaletrain prepare: {line}", file=sys.stderr)
    if out.exists() and any(out.iterdir()) and not overwrite:
        state = "a complete preparation" if (out / MANIFEST).exists() else "files but no manifest (incomplete)"
        raise InputError(f"--output: {out} already holds {state}; pass --overwrite to replace it "
                         f"(it is kept until the new one is complete)")
    tok = load_tokenizer(tokenizer, eos_token, bos_token)
    tok_info = tok.info(add_bos)
    dtype = token_dtype(tok.vocab_size)
    tmp = Path(output) / f".{domain}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for stale in Path(output).glob(f".{domain}.tmp-*") if Path(output).exists() else []:
        shutil.rmtree(stale, ignore_errors=True)  # leftovers of an interrupted run
    train = ShardWriter(tmp, dtype, chunk_tokens, shard_tokens)
    val = ShardWriter(tmp / "val", dtype, chunk_tokens, shard_tokens)
    stats = ReadStats()
    eos = np.array([tok.eos_id], dtype=np.uint32)
    bos = np.array([tok.bos_id] if add_bos else [], dtype=np.uint32)
    n_docs = n_val = 0
    t0 = last = time.time()
    # byte-level encoding is a memcpy: shipping its arrays between processes costs more than it saves
    # (measured 30M tokens/s in one process vs 10M with 2 workers), so it stays in-process
    if tokenizer is None and workers > 1 and not quiet:
        print(f"scaletrain prepare: --workers {workers} not used: the byte-level tokenizer is a copy of the bytes and "
              f"runs fastest in one process; workers help a Hugging Face --tokenizer", file=sys.stderr)
    workers = 1 if tokenizer is None else max(1, workers)
    pool = mp.get_context("fork").Pool(workers, _init_worker, (tokenizer, eos_token, bos_token)) if workers > 1 \
        else None
    if pool is None:
        _init_worker(tokenizer, eos_token, bos_token)
    try:
        texts = ([d.text for d in b] for b in _batches(iter_documents(inputs, skip_bad_lines, stats), 64))
        encode = functools.partial(_encode, val_fraction=val_fraction)
        encoded = pool.imap(encode, texts, chunksize=2) if pool else map(encode, texts)
        for batch in encoded:  # in input order, whatever the number of workers
            for is_val, ids in batch:
                target = val if is_val else train
                target.add(np.concatenate([bos, ids, eos]))
                n_docs += 1
                n_val += is_val
            if not quiet and time.time() - last > 2:
                last = time.time()
                done = train.tokens + train.buffered + val.tokens + val.buffered
                print(f"  {domain}: {n_docs:,} documents, {done:,} tokens, {done / (last - t0):,.0f} tokens/s",
                      file=sys.stderr, flush=True)
        if n_docs == 0:
            raise InputError(f"--domain {domain}: the inputs {list(inputs)} hold no documents")
        shards, val_shards = train.finish(), val.finish()
        if not shards:
            raise InputError(f"--domain {domain}: every document went to validation; lower --val-fraction")
        elapsed = time.time() - t0
        manifest = Manifest(domain=domain, dtype=dtype.name, chunk_tokens=chunk_tokens, tokenizer=tok_info,
                            train=Split(n_docs - n_val, train.tokens, shards), val=Split(n_val, val.tokens, val_shards),
                            inputs=[str(i) for i in inputs], skipped_bad_lines=stats.bad_lines,
                            empty_documents=stats.empty, val_fraction=val_fraction)
        if tok.path:
            shutil.copyfile(tok.path, tmp / TOKENIZER_FILE)
        manifest.write(tmp)  # last: a folder with a manifest is complete (see _recover_domain)
        # commit: the old folder (if any) goes only once the new one is complete
        old = None
        if out.exists():
            old = Path(output) / f".{domain}.old-{os.getpid()}"
            out.rename(old)
            kill_between_renames()
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
        if not quiet:
            total = train.tokens + val.tokens
            print(f"{domain}: {n_docs:,} documents ({n_val:,} held out), {train.tokens:,} train + {val.tokens:,} "
                  f"validation tokens in {len(shards)} + {len(val_shards)} shards, {elapsed:.1f}s "
                  f"({total / max(elapsed, 1e-9) / workers:,.0f} tokens/s per worker)"
                  + (f", {stats.bad_lines} bad lines skipped" if stats.bad_lines else ""), file=sys.stderr)
        for name, why in stats.skipped_files if not quiet else ():
            print(f"  skipped {name}: {why}", file=sys.stderr)
        return manifest
    finally:
        if pool is not None:
            pool.terminate()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", required=True, help="domain name, e.g. arxiv (one folder under --output)")
    p.add_argument("--input", nargs="+", required=True, help="JSONL/txt/tex files or folders")
    p.add_argument("--output", required=True, help="data folder, e.g. data/pretraining")
    p.add_argument("--tokenizer", help="a local Hugging Face tokenizer.json (default: byte-level)")
    p.add_argument("--eos-token", help="end-of-text token of --tokenizer (default: found by name)")
    p.add_argument("--add-bos", action="store_true", help="put the tokenizer's begin-of-text token before every "
                                                           "document (recorded in the manifest and the export)")
    p.add_argument("--bos-token", help="begin-of-text token of --tokenizer (default: found by name)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes for a Hugging Face --tokenizer (default: every core); the byte-level "
                        "tokenizer runs in one process")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of documents held out for validation")
    p.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per tar shard")
    p.add_argument("--chunk-tokens", type=int, default=2**18, help="tokens per tar member")
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed JSONL lines")
    p.add_argument("--overwrite", action="store_true", help="replace an existing domain folder")


def run_prepare(args: argparse.Namespace) -> dict:
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1) if args.tokenizer else 1
    return prepare_domain(args.domain, args.input, args.output, args.tokenizer, args.eos_token, workers,
                          args.val_fraction, args.shard_tokens, args.chunk_tokens, args.skip_bad_lines,
                          args.overwrite, add_bos=args.add_bos, bos_token=args.bos_token)


def main(argv: Sequence[str] | None = None) -> None:
    from scaletrain.errors import run_entry

    p = argparse.ArgumentParser(prog="scaletrain prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prepare_args(p)
    args = p.parse_args(argv)
    run_entry(lambda: run_prepare(args))


if __name__ == "__main__":
    main()
