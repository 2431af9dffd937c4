"""The global row stream of mixed, packed (or padded) rows, which every rank and DataLoader worker walks.

The global row order is defined without ranks or workers: optimizer step ``k`` (counted from
the loader's start) takes global rows ``[row0 + k*G, row0 + (k+1)*G)`` with
``G = micro_batch_size * gradient_accumulation_steps * world``. Micro-step ``g`` of rank ``r``
takes the step's rows ``(g*world + r)*micro_batch_size + b``.

Mixing weights are shares of trained target tokens in both modes. Packed: every row holds
``max_seq_length + 1`` tokens, so row ``j`` comes from domain ``mixer(seed, j)`` (a seeded
weighted draw) and row shares are token shares. Padded (``--no-packing``, one document per row):
rows differ in length, so row ``j`` comes from the domain furthest below its share of the target
tokens trained so far (``argmin tokens_d / weight_d``, ties to the first), which keeps token
shares at the weights whatever the domains' document lengths.

Every micro-batch is ``(input_ids, labels, step_tokens)``: ``step_tokens`` is the number of target
tokens (labels other than ``IGNORE_INDEX``) of the whole optimizer step over all micro-batches
and ranks, which every rank knows without communication because every rank (and DataLoader
worker) walks the whole global row sequence to keep the read positions; it reads only its own
rows. Worker ``w`` of ``W`` yields micro-steps ``w, w+W, ...``, the order in which the
DataLoader hands them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from scaletrain.model import IGNORE_INDEX

from .manifest import check_same_tokenizing
from .mixer import RowMixer
from .shards import DomainStream

Batch = tuple[torch.Tensor, torch.Tensor, int]  # (input_ids, labels, step_tokens)


@dataclass(frozen=True)
class StreamSpec:
    data_dir: str
    sources: tuple[str, ...]
    weights: tuple[float, ...]
    max_seq_length: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    rank: int
    world_size: int
    seed: int
    packing: bool = True
    split: str = "train"
    # each source's shuffle key (its shards' order per epoch): its index in the run's first --data-sources, kept
    # when a later phase adds, drops or reorders domains (None: the index in ``sources``)
    order: tuple[int, ...] | None = None

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def open_streams(spec: StreamSpec) -> list[DomainStream]:
    streams = [DomainStream(Path(spec.data_dir) / name, spec.split, spec.seed, key) for name, key in
               zip(spec.sources, spec.order or range(len(spec.sources)))]
    check_same_tokenizing({n: s.manifest.tokenizer for n, s in zip(spec.sources, streams)})
    return streams


class Walker:
    """Walks global rows step by step from a state; returns this rank's rows per micro-step."""

    def __init__(self, spec: StreamSpec, streams: list[DomainStream], global_row: int, pos: list[int],
                 tokens: list[int]) -> None:
        self.spec, self.streams = spec, streams
        self.mixer = RowMixer(list(spec.weights), spec.seed)
        self.row, self.pos, self.tokens = global_row, list(pos), list(tokens)
        # padded rows, this walk only: tokens read per domain, and those cut off documents longer than a row
        self.read_tokens, self.cut_tokens = [0] * len(streams), [0] * len(streams)
        w = np.asarray(spec.weights, dtype=np.float64)
        self._inv_w = np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), np.inf)  # padded mode: tokens_d / w_d

    def step(self, materialise: set[int] | None) -> tuple[dict[int, list[np.ndarray] | np.ndarray] | None, int]:
        """Advance one optimizer step. Returns this rank's rows for each micro-step ``g`` in
        ``materialise`` (packed: one (micro_batch_size, max_seq_length + 1) array per micro-step;
        padded: a list of documents) and the step's target tokens over all ranks; read positions
        advance for every row of the step either way."""
        spec = self.spec
        G, L, W, B = spec.global_batch, spec.max_seq_length + 1, spec.world_size, spec.micro_batch_size
        row0 = self.row
        self.row += G
        # index within the step of micro-step g, rank r, row b: (g * W + r) * B + b
        owner = np.full(G, -1, dtype=np.int64)  # -> micro-step g for this rank's wanted rows
        for g in materialise or ():
            owner[(g * W + spec.rank) * B: (g * W + spec.rank + 1) * B] = g
        if spec.packing:
            dom = self.mixer.domains(row0, G)
            out = {g: np.empty((B, L), dtype=self.streams[0].dtype) for g in materialise or ()}
            for d, stream in enumerate(self.streams):
                idx = np.flatnonzero(dom == d)
                if materialise:
                    sel = owner[idx] >= 0
                    if sel.any():
                        w_idx = idx[sel]
                        w_starts = self.pos[d] + np.flatnonzero(sel).astype(np.int64) * L
                        lo, span = int(w_starts[0]), int(w_starts[-1]) + L - int(w_starts[0])
                        if span == len(w_idx) * L:  # consecutive rows: one read, no copy
                            rows = stream.read(lo, span).reshape(-1, L)
                        elif span <= 4 * len(w_idx) * L:  # one read, then gather this rank's rows
                            rows = stream.read(lo, span)[(w_starts - lo)[:, None] + np.arange(L)]
                        else:
                            rows = np.stack([stream.read(p, L) for p in w_starts.tolist()])
                        b_of = w_idx % B
                        if len(out) == 1:  # the common case: one micro-step of this step is ours
                            next(iter(out.values()))[b_of] = rows
                        else:
                            g_of = owner[w_idx]
                            for g in out:
                                m = g_of == g
                                out[g][b_of[m]] = rows[m]
                self.pos[d] += len(idx) * L
                self.tokens[d] += len(idx) * (L - 1)
            return (out if materialise else None), G * (L - 1)
        docs: dict[int, list[np.ndarray]] = {g: [None] * B for g in materialise or ()}
        step_tokens = 0
        tokens = np.asarray(self.tokens, dtype=np.float64)
        for i in range(G):  # document by document: the next domain and positions depend on lengths
            d = int(np.argmin(tokens * self._inv_w))
            doc, nxt = self.streams[d].next_document(self.pos[d], L)
            if owner[i] >= 0:
                docs[int(owner[i])][i % B] = doc
            self.read_tokens[d] += nxt - self.pos[d]
            self.cut_tokens[d] += nxt - self.pos[d] - len(doc)
            self.pos[d] = nxt
            self.tokens[d] += len(doc) - 1
            tokens[d] += len(doc) - 1
            step_tokens += len(doc) - 1
        return (docs if materialise else None), step_tokens


def collate(rows: np.ndarray | list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``T+1`` tokens -> (input_ids, labels) of shape (B, T); shorter rows are padded on the
    right with ``pad_id`` in the inputs and ``IGNORE_INDEX`` in the labels."""
    if isinstance(rows, np.ndarray):  # packed: each of x and y converted straight from the rows
        return torch.from_numpy(rows[:, :-1].astype(np.int64)), torch.from_numpy(rows[:, 1:].astype(np.int64))
    T = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        t = torch.from_numpy(r.astype(np.int64))
        n = len(r) - 1
        x[i, :n] = t[:-1]
        y[i, :n] = t[1:]
    return x, y


class RowsDataset(IterableDataset):
    def __init__(self, spec: StreamSpec, start: tuple[int, list[int], list[int]], pad_id: int) -> None:
        self.spec, self.start, self.pad_id = spec, start, pad_id

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        walker = Walker(self.spec, open_streams(self.spec), *self.start)
        gas = self.spec.gradient_accumulation_steps
        m = 0  # micro-step counter since the start
        while True:
            mine = {g for g in range(gas) if (m + g) % W == w}
            rows, step_tokens = walker.step(mine)
            for g in sorted(mine):
                yield (*collate(rows[g], self.pad_id), step_tokens)
            m += gas
