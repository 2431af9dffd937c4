"""One domain's prepared shards as a token stream with random access and epochs.

The manifest records each tar member's data offset, so a range of the stream is read with
``np.memmap`` slices of the tar files, no parsing: resuming at any position costs nothing and
every rank can read any row (webdataset's sequential reader keeps no position to resume from;
``benchmarks/loader_throughput.py`` measures both). Each epoch walks the shards in a seeded
permutation; members keep their order inside a shard. The first time a member is read, its tar
header, its checksum (manifest format 3) and its token ids (below the tokenizer's vocab) are checked,
so a corrupt, zeroed or overwritten member is reported by shard and member, never trained on (or, with
ids past the vocab, turned into an index error far away).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import xxhash

from .manifest import MANIFEST, ShardError, load_manifest

__all__ = ["DomainStream", "ShardError", "load_manifest"]


def fingerprint(manifest, split: str = "train") -> str:
    """What identifies a domain's data for a resume: its tokenizer and every shard's name, size and member
    checksums (format 3+; older manifests: the token counts)."""
    import hashlib
    import json

    shards = [[s.file, s.tokens, s.bytes, [m[3] if len(m) > 3 else m[2] for m in s.members]]
              for s in manifest.split(split).shards]
    blob = json.dumps([manifest.tokenizer.identity, manifest.dtype, shards], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class DomainStream:
    """The token stream of one domain split (``train`` or ``val``), endless over epochs."""

    verify_members = True  # checksum and id-range check on first read (benchmarks turn it off to measure it)

    def __init__(self, domain_dir: str | Path, split: str = "train", seed: int = 0, domain_index: int = 0) -> None:
        self.dir = Path(domain_dir)
        self.manifest = load_manifest(self.dir)
        self.folder = self.dir if split == "train" else self.dir / "val"
        self.shards = self.manifest.split(split).shards
        self.split = split
        if not self.shards:
            raise ShardError(f"{self.folder}: the {split} split has no shards"
                             + (" (prepared with --val-fraction 0)" if split == "val" else ""))
        self.dtype = np.dtype(self.manifest.dtype).newbyteorder("<")
        self.fingerprint = fingerprint(self.manifest, split)
        self.vocab_size = self.manifest.tokenizer.vocab_size
        self.seed, self.domain_index = seed, domain_index
        self.shard_tokens = np.array([s.tokens for s in self.shards], dtype=np.int64)
        self.total = int(self.shard_tokens.sum())
        # per shard: member token offsets (cumulative) for a binary search
        self.member_starts = [np.concatenate([[0], np.cumsum([m[2] for m in s.members])]) for s in self.shards]
        self._maps: dict[int, np.memmap] = {}
        self._checked: set[tuple[int, int]] = set()
        for s in self.shards:
            p = self.folder / s.file
            if not p.is_file():
                raise ShardError(f"shard {p} listed in {self.dir / MANIFEST} is missing")
            size = p.stat().st_size
            if size != s.bytes:
                raise ShardError(f"shard {p} is {size} bytes but its manifest says {s.bytes}: truncated or "
                                 f"replaced; prepare the domain again")

    @property
    def eos_id(self) -> int:
        return self.manifest.tokenizer.eos_id

    def reorder(self, seed: int, domain_index: int) -> None:
        """Shuffle by another seed and key from now on (a resumed run's: those its position was read with)."""
        if (seed, domain_index) != (self.seed, self.domain_index):
            self.seed, self.domain_index = seed, domain_index
            self._epoch_order.cache_clear()

    @lru_cache(maxsize=64)  # noqa: B019 - one stream object per domain and process
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard permutation, cumulative token starts in that order) for ``epoch``."""
        rng = np.random.default_rng([self.seed, self.domain_index, epoch, 0x5EED])
        perm = rng.permutation(len(self.shards))
        starts = np.concatenate([[0], np.cumsum(self.shard_tokens[perm])])
        return perm, starts

    def _map(self, shard: int) -> np.ndarray:
        """The shard file as a flat token array (plain ndarray over the mapping: slicing a np.memmap
        subclass costs several microseconds a call). Member data sits at 512-byte offsets."""
        m = self._maps.get(shard)
        if m is None:
            raw = np.memmap(self.folder / self.shards[shard].file, dtype=np.uint8, mode="r").view(np.ndarray)
            m = self._maps[shard] = raw[: len(raw) // self.dtype.itemsize * self.dtype.itemsize].view(self.dtype)
        return m

    def _check_member(self, shard: int, member: int) -> None:
        name, offset, n = self.shards[shard].members[member][:3]
        m = self._map(shard).view(np.uint8)
        header = bytes(m[offset - 512: offset])
        stored = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            size = -1
        where = f"shard {self.folder / self.shards[shard].file}: member {name}"
        if stored != name or size != n * self.dtype.itemsize:
            raise ShardError(f"{where} is corrupt (tar header says {stored!r} of {size} bytes, manifest "
                             f"{n * self.dtype.itemsize}); prepare the domain again")
        if not self.verify_members:
            self._checked.add((shard, member))
            return
        data = m[offset: offset + n * self.dtype.itemsize]
        digest = self.shards[shard].members[member][3:4]
        if digest and xxhash.xxh3_64_hexdigest(data) != digest[0]:
            raise ShardError(f"{where} does not match its checksum in {self.dir / MANIFEST} (its bytes changed after "
                             f"prepare: damaged, or the domain prepared again since this run read its manifest); "
                             f"restore the shard or prepare the domain again")
        top = int(data.view(self.dtype).max()) if n else 0
        if top >= self.vocab_size:
            raise ShardError(f"{where} holds token id {top}, past the vocabulary of {self.vocab_size} "
                             f"({self.manifest.tokenizer.name}); the shard is corrupt: prepare the domain again")
        self._checked.add((shard, member))

    def _read_shard(self, shard: int, start: int, length: int) -> np.ndarray:
        """``length`` tokens from token ``start`` of one shard (may span members)."""
        out = []
        starts = self.member_starts[shard]
        members = self.shards[shard].members
        i = int(np.searchsorted(starts, start, side="right") - 1)
        while length > 0:
            if (shard, i) not in self._checked:
                self._check_member(shard, i)
            offset, n = members[i][1], members[i][2]
            lo = int(start - starts[i])
            take = min(n - lo, length)
            t0 = offset // self.dtype.itemsize + lo
            out.append(self._map(shard)[t0: t0 + take])
            start += take
            length -= take
            i += 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def read(self, pos: int, length: int) -> np.ndarray:
        """Tokens ``[pos, pos + length)`` of the endless stream (epoch after epoch), in the shard dtype
        (a view into the mapped file when the range sits in one member)."""
        parts = []
        while length > 0:
            epoch, off = divmod(pos, self.total)
            perm, starts = self._epoch_order(epoch)
            k = int(np.searchsorted(starts, off, side="right") - 1)
            shard = int(perm[k])
            within = off - int(starts[k])
            take = min(length, int(self.shard_tokens[shard]) - within)
            parts.append(self._read_shard(shard, within, take))
            pos += take
            length -= take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def next_document(self, pos: int, max_len: int) -> tuple[np.ndarray, int]:
        """The document starting at ``pos`` (through its EOS, cut to ``max_len``) and the next start."""
        window = max(256, max_len)
        scanned = 0
        while True:
            chunk = self.read(pos + scanned, window)
            hits = np.flatnonzero(chunk == self.eos_id)
            if len(hits):
                end = pos + scanned + int(hits[0]) + 1
                break
            scanned += window
            if scanned > 64 * self.total:
                raise ShardError(f"{self.folder}: no end-of-text token ({self.eos_id}) in the stream")
        doc = self.read(pos, min(end - pos, max_len))
        return doc, end
