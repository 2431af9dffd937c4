"""Mixed, packed (or padded) micro-batches from prepared shards, resumable on any world size.

Each domain's read position advances row by row (``max_seq_length + 1`` tokens when packing, one
document when padding). The state is ``(global_row, read position and target tokens per domain)``
at a step boundary: no rank, worker or shard count in it, so a run resumes on 1, 2 or 4 ranks,
with any ``num_workers``, continuing the same stream, nothing repeated and nothing skipped.

A resumed run may mix other domains (a next phase): each domain keeps the shuffle key and seed its position was
read with, a new one starts at its beginning, one left out keeps its place in the state for a later phase.
The row stream itself (order, mixing, packing, padding) is ``rows.py``.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from scaletrain.errors import ScaletrainError

from .manifest import ShardError, TokenizerInfo, load_manifest
from .rows import Batch, RowsDataset, StreamSpec, Walker, collate, open_streams
from .shards import DomainStream

__all__ = ["Batch", "LoaderStateError", "ShardLoader", "StreamSpec", "build_loader", "collate", "model_vocab_size"]


class LoaderStateError(ScaletrainError):
    """A data-loader state (from a checkpoint) that does not fit this run."""


# what schedulers send before they kill (the trainer saves and stops on each): Slurm sends them to every process
# of the job, DataLoader workers included, and torch's own handler in a worker dies of a SIGTERM from anyone but its
# parent; the main process then raised DataLoader's "worker ... is killed by signal: Terminated" before it could save.
# SIGINT too: Ctrl-C reaches the workers of a plain `python` run, and a worker ended by it left the main process to
# fail on "DataLoader worker ... exited unexpectedly" instead of saving
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT}


def _start_workers(loader: DataLoader):
    """``iter(loader)`` with the stop signals held while its workers start: they are born with them blocked (a
    signal in that moment waits, in the main process for its handler), and each worker decides what to do with
    them before it lets them in (``_leave_stop_signals``)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _leave_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: the stop signals are the main process's, which ends the workers once it has saved.
    SIGUSR1, SIGHUP and SIGINT are ignored. SIGTERM stays blocked and a thread takes it: from the main process
    (DataLoader's ``terminate`` of a worker that did not stop when told) it ends the worker, as torch's own handler
    does, and from anyone else it is dropped (ignoring it altogether left such workers running, and the main process
    waiting for them at exit)."""
    for sig in _STOP_SIGNALS - {signal.SIGTERM}:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS - {signal.SIGTERM})
    threading.Thread(target=_take_sigterm, args=(os.getppid(),), name="scaletrain-sigterm", daemon=True).start()


def _take_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def _worker_message(e: BaseException) -> str:
    """The message a DataLoader worker's exception had: DataLoader raises it again here as ``Caught X in
    DataLoader worker process N.`` followed by the worker's traceback, which ends ``module.X: message``."""
    text = str(e)
    at = text.rfind(f"{type(e).__name__}: ")
    return text[at + len(type(e).__name__) + 2:].strip() if at >= 0 else text


class ShardLoader:
    """Iterator of micro-batches ``(input_ids, labels, step_tokens)`` with ``state_dict``/``load_state_dict``."""

    def __init__(self, spec: StreamSpec, num_workers: int = 0, pin_memory: bool = False,
                 allow_data_change: bool = False) -> None:
        self.spec = spec
        self.allow_data_change = allow_data_change
        self.streams = open_streams(spec)  # validates every shard up front, in the main process
        self.pad_id = self.tokenizer.pad_id
        self.num_workers, self.pin_memory = num_workers, pin_memory and torch.cuda.is_available()
        self._origin = (0, [0] * len(spec.sources), [0] * len(spec.sources))
        self._start = self._origin
        self._carried: dict[str, dict[str, Any]] = {}  # the checkpoint's domains this run does not mix
        self._reset()

    @property
    def tokenizer(self) -> TokenizerInfo:
        return self.streams[0].manifest.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def global_batch(self) -> int:
        return self.spec.global_batch

    def _reset(self) -> None:
        self.consumed = 0
        self._it = None
        self._snapshot = Walker(self.spec, self.streams, *self._start)

    def rewind(self) -> None:
        """Back to where this loader started (the validation set: the same rows at every evaluation)."""
        self._start = self._origin
        self._reset()

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            ds = RowsDataset(self.spec, self._start, self.pad_id)
            self._it = _start_workers(DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                 pin_memory=self.pin_memory, persistent_workers=False,
                                                 worker_init_fn=_leave_stop_signals)) if self.num_workers else iter(ds)
        try:
            batch = next(self._it)
        except (ScaletrainError, OSError) as e:  # raised again in this process with the worker's traceback as text
            if "Original Traceback" not in str(e):
                raise
            raise type(e)(_worker_message(e)) from None
        self.consumed += 1
        return batch

    def unread(self, n: int) -> None:
        """Forget the last ``n`` micro-batches handed out (a step that is not taken: a stop before it); the
        position saved next is then the step boundary before them. The iterator is not to be used again."""
        self.consumed -= n

    def _at_step_boundary(self):
        """The bookkeeping walker advanced (without reading rows) to the current optimizer-step boundary."""
        gas = self.spec.gradient_accumulation_steps
        if self.consumed % gas:
            raise RuntimeError(f"data state asked mid-step ({self.consumed} micro-batches, accumulation {gas})")
        steps_done = self.consumed // gas
        walked = (self._snapshot.row - self._start[0]) // self.spec.global_batch
        for _ in range(steps_done - walked):
            self._snapshot.step(None)
        return self._snapshot

    def state_dict(self) -> dict[str, Any]:
        """Position at the current optimizer-step boundary (call between steps)."""
        self._at_step_boundary()
        state = {"global_row": self._snapshot.row, "packing": self.spec.packing,
                 "domain_pos": dict(zip(self.spec.sources, self._snapshot.pos)),
                 "domain_tokens": dict(zip(self.spec.sources, self._snapshot.tokens)),
                 "domain_fingerprint": {s: st.fingerprint for s, st in zip(self.spec.sources, self.streams)},
                 "domain_size": {s: st.total for s, st in zip(self.spec.sources, self.streams)},
                 "mix": _mix(self.spec.sources, self.spec.weights),
                 "domain_order": {s: st.domain_index for s, st in zip(self.spec.sources, self.streams)},
                 "seed": self.spec.seed}
        for key, carried in self._carried.items():  # a domain left out of this phase keeps its place for a later one
            state[key] = {**carried, **state[key]}
        return state

    def epochs(self) -> dict[str, float]:
        """Epochs of each domain read so far (at a step boundary): tokens read over the domain's tokens. The
        same on every rank (each walks all rows)."""
        pos = self._at_step_boundary().pos  # every step: no state dict (fingerprints, sizes) built for it
        return {s: p / st.total for s, p, st in zip(self.spec.sources, pos, self.streams)}

    def cut_warning(self) -> str | None:
        """Padded rows (--no-packing) cut each document to one row: what that dropped since this loader started,
        when it is 1% or more of some domain's tokens read (the rest of a long document is never trained)."""
        w = self._at_step_boundary()
        shares = {s: c / r for s, c, r in zip(self.spec.sources, w.cut_tokens, w.read_tokens) if r}
        if self.spec.packing or not shares or max(shares.values()) < 0.01:
            return None
        steps = (w.row - self._start[0]) // self.spec.global_batch
        said = " and ".join(f"{100 * c:.1f}% {'of the tokens read ' * (i == 0)}from {s}"
                            for i, (s, c) in enumerate(shares.items()))
        return (f"--no-packing cuts each document to one row of --max-seq-length + 1 = {self.spec.max_seq_length + 1} "
                f"tokens: in the first {steps} step{'s' * (steps != 1)}, {said} were cut off and not trained on. "
                f"Packing (the default) trains every token; or raise --max-seq-length")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self._load_state(state)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a damaged or foreign state: never a traceback
            raise LoaderStateError(f"the checkpoint's data-loader state is malformed ({type(e).__name__}: {e})") from e

    def _load_state(self, state: dict[str, Any]) -> None:
        packing, positions = state.get("packing", True), dict(state["domain_pos"])
        row = int(state["global_row"])
        if packing != self.spec.packing:
            raise LoaderStateError(f"the checkpoint's data state was written with packing={packing}; this run has "
                                   f"packing={self.spec.packing} (--no-packing must match the run being resumed)")
        new = [s for s in self.spec.sources if s not in positions]
        if new and self.spec.rank == 0:
            print(f"scaletrain: --data-sources {' '.join(new)}: not read by the run before this checkpoint (it read "
                  f"{' '.join(positions)}); read from its start", flush=True)
        # a domain's shards are shuffled by its key: checkpoints before keys were saved used the index in their
        # --data-sources, which is the order of their positions
        order = dict(state.get("domain_order") or {s: i for i, s in enumerate(positions)})
        for s in new:
            order[s] = max(order.values(), default=-1) + 1
        self._carried = {key: {s: v for s, v in (state.get(key) or {}).items() if s not in self.spec.sources}
                         for key in ("domain_pos", "domain_tokens", "domain_fingerprint", "domain_size")}
        self._carried["domain_order"] = {s: k for s, k in order.items() if s not in self.spec.sources}
        positions = {**dict.fromkeys(new, 0), **positions}
        seed = int(state.get("seed", self.spec.seed))  # checkpoints before it was saved: this run's
        if seed != self.spec.seed and self.spec.rank == 0:
            print(f"scaletrain: --seed {self.spec.seed}: the data goes on in the order of the checkpoint's seed, "
                  f"{seed} (the read positions are positions in that order)", flush=True)
        self.spec = replace(self.spec, seed=seed, order=tuple(int(order[s]) for s in self.spec.sources))
        for stream, key in zip(self.streams, self.spec.order):
            stream.reorder(seed, key)
        for s, stream in zip(self.spec.sources, self.streams):
            then = (state.get("domain_fingerprint") or {}).get(s)
            if then is None or then == stream.fingerprint:  # checkpoints before fingerprints: nothing to compare
                continue
            size = (state.get("domain_size") or {}).get(s)
            change = (f"{stream.total:,} tokens in {len(stream.shards)} shards now"
                      + (f", {size:,} tokens when the checkpoint was written" if size is not None else ""))
            if not self.allow_data_change:
                raise LoaderStateError(
                    f"--data-sources {s}: {stream.dir} is not the data this checkpoint was reading (prepared again "
                    f"or changed: {change}); its read position means nothing in the new data. Prepare it as it "
                    f"was, or pass --allow-data-change to continue on purpose, reading {s} from its start")
            print(f"scaletrain: --allow-data-change: {s} changed ({change}); reading it from its start",
                  flush=True)
            positions[s] = 0
        L = self.spec.max_seq_length + 1
        # checkpoints written before domain_tokens existed: packed rows give it exactly
        tokens = state.get("domain_tokens") or {s: int(p) // L * (L - 1) for s, p in positions.items()}
        mix = _mix(self.spec.sources, self.spec.weights)
        if not self.spec.packing and (new or state.get("mix", mix) != mix):
            # padded rows go to the domain furthest below its share of the tokens counted: counted since the
            # start, a new mix would feed one domain alone until the whole run's shares met it
            tokens = {}
            if self.spec.rank == 0:
                print("scaletrain: the mix changed since the checkpoint: padded rows keep the new weights' token "
                      "shares from this step on", flush=True)
        self._start = (row, [int(positions[s]) for s in self.spec.sources],
                       [int(tokens.get(s, 0)) for s in self.spec.sources])
        self._reset()


def _mix(sources, weights) -> dict[str, float]:
    """Each mixed domain's share of the target tokens (the weights normalised, rounded for comparing)."""
    total = float(sum(weights))
    return {s: round(w / total, 9) for s, w in zip(sources, weights) if w > 0}


def model_vocab_size(tokenizer_vocab: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer: rounded up to a multiple of 64 for fast matmuls."""
    return -(-tokenizer_vocab // multiple) * multiple


def check_tokenizer(path: str, streams: list[DomainStream]) -> None:
    """``--tokenizer`` must be the one the shards were prepared with."""
    from .tokenizer import HFTokenizer

    tok = HFTokenizer(path)
    for s in streams:
        t = s.manifest.tokenizer
        if t.identity != tok.identity or t.vocab_size != tok.vocab_size:
            raise ShardError(f"--tokenizer {path} (vocab {tok.vocab_size}, {tok.identity[:19]}...) is not the one "
                             f"{s.dir} was prepared with ({t.name}, vocab {t.vocab_size}, {t.identity[:19]}...); "
                             f"prepare again or pass the matching tokenizer")


def sources_without_val(cfg) -> list[str]:
    """The mixed data sources (weight > 0) that hold no validation shards (prepared without --val-fraction)."""
    if cfg.data_kind == "synthetic":
        return []
    return [s for s, w in zip(cfg.data_sources, cfg.data_mix_weights)
            if w > 0 and not load_manifest(Path(cfg.data_dir) / s).val.shards]


VAL_SEED = 1_000_003


def build_loader(cfg, rank: int, world_size: int, split: str = "train", vocab_size: int | None = None):
    """The configured source for one rank: a ShardLoader over prepared shards, or the synthetic one.

    ``split='val'`` gives the held-out loaders, one per domain that has validation shards (None when none has)."""
    from .synthetic import SyntheticLoader

    gas = cfg.gradient_accumulation_steps  # validation reads global batches too: the same rows on any world size
    # the held-out rows are the data's, not the run's: the same for every --seed (runs of a seed sweep, a resume with
    # another seed), so that their validation losses compare
    if cfg.data_kind == "synthetic":
        seed = cfg.seed if split == "train" else VAL_SEED  # held-out rows: another stream
        return SyntheticLoader(vocab_size, cfg.max_seq_length, cfg.micro_batch_size, gas, rank, world_size, seed)
    spec = StreamSpec(cfg.data_dir, tuple(cfg.data_sources), tuple(cfg.data_mix_weights), cfg.max_seq_length,
                      cfg.micro_batch_size, gas, rank, world_size, cfg.seed, cfg.packing, split)
    if split == "val":
        # one held-out stream per domain with weight > 0 and validation shards: val_loss/<domain> for each, val_loss
        # their weighted mean (the trainer says which domains it leaves out)
        missing = set(sources_without_val(cfg))
        return {s: ShardLoader(replace(spec, sources=(s,), weights=(1.0,), seed=VAL_SEED))
                for s, w in zip(cfg.data_sources, cfg.data_mix_weights) if w > 0 and s not in missing} or None
    loader = ShardLoader(spec, cfg.num_workers, cfg.pin_memory, cfg.allow_data_change)
    if cfg.tokenizer:
        check_tokenizer(cfg.tokenizer, loader.streams)
    return loader
