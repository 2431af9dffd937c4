"""Packs a token stream into WebDataset tar shards of fixed-size members and records their layout (the writer
side of ``manifest.py``)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
import xxhash

from .manifest import Shard


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
