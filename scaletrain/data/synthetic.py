"""A deterministic, learnable synthetic token source (``--data synthetic``).

Row ``i`` of the global stream is a seeded Markov chain (see ``SyntheticTokens``): a model
can learn it, so the loss falls, and any row can be regenerated from ``(seed, i)`` alone. Used before real
shards exist and by the benchmarks.

Global order (independent of world size): optimizer step ``s`` consumes rows
``[s*G, (s+1)*G)`` with ``G = micro_batch_size * gradient_accumulation_steps * world``; micro-step
``g`` of rank ``r`` takes rows ``s*G + (g*world + r)*micro_batch_size + b``. Micro-batches are
``(input_ids, labels, step_tokens)`` like the shard loader's (every row is full: ``G * T``).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch


class SyntheticTokens:
    """Row ``i``: a Markov chain over the vocab. Each token is, with probability ``follow``,
    the fixed successor ``(5 * prev + 1) % V`` of the one before, else a draw from a Zipf
    distribution over the vocab. A model first learns the skewed unigram (a fast drop from
    ln V), then the successor table, so the loss keeps falling for many steps."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, follow: float = 0.6) -> None:
        self.vocab_size, self.seq_len, self.seed, self.follow = vocab_size, seq_len, seed, follow
        ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
        p = ranks ** -1.1
        self.cdf = np.cumsum(p / p.sum())

    def row(self, i: int) -> np.ndarray:
        """``seq_len + 1`` token ids of global row ``i``."""
        rng = np.random.default_rng([self.seed, i])
        n = self.seq_len + 1
        draws = np.minimum(np.searchsorted(self.cdf, rng.random(n)), self.vocab_size - 1)
        follow = rng.random(n) < self.follow
        toks = np.empty(n, dtype=np.int64)
        prev = int(draws[0])
        toks[0] = prev
        for t in range(1, n):
            prev = (5 * prev + 1) % self.vocab_size if follow[t] else int(draws[t])
            toks[t] = prev
        return toks


class SyntheticLoader:
    """Micro-batches ``(input_ids, labels, step_tokens)`` of shape (micro_batch_size, max_seq_length) for
    one rank, resumable."""

    def __init__(self, vocab_size: int, max_seq_length: int, micro_batch_size: int, gradient_accumulation_steps: int,
                 rank: int, world_size: int, seed: int) -> None:
        self.tokens = SyntheticTokens(vocab_size, max_seq_length, seed)
        self.vocab_size, self.max_seq_length = vocab_size, max_seq_length
        self.micro_batch_size, self.gradient_accumulation_steps = micro_batch_size, gradient_accumulation_steps
        self.rank, self.world_size = rank, world_size
        self.micro_steps = 0  # micro-batches this rank has yielded
        self._origin = 0

    tokenizer = None  # no tokenizer: the ids are the data

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    def row_indices(self, micro_step: int) -> list[int]:
        s, g = divmod(micro_step, self.gradient_accumulation_steps)
        base = s * self.global_batch + (g * self.world_size + self.rank) * self.micro_batch_size
        return list(range(base, base + self.micro_batch_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        rows = np.stack([self.tokens.row(i) for i in self.row_indices(self.micro_steps)])
        self.micro_steps += 1
        t = torch.from_numpy(rows)  # (B, T+1)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous(), self.global_batch * self.max_seq_length

    def unread(self, n: int) -> None:
        """Forget the last ``n`` micro-batches handed out (a step that is not taken)."""
        self.micro_steps -= n

    def rewind(self) -> None:
        self.micro_steps = self._origin

    def state_dict(self) -> dict[str, Any]:
        # position as global rows consumed, so a resume with another world size continues the stream
        # (checkpoints are taken at optimizer-step boundaries)
        return {"rows_consumed": (self.micro_steps // self.gradient_accumulation_steps) * self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from .loader import LoaderStateError

        rows = state.get("rows_consumed") if isinstance(state, dict) else None
        if not isinstance(rows, int):
            raise LoaderStateError(f"the checkpoint's data state {state!r} is not a synthetic-data state "
                                   f"(resume with the --data-kind it was written with)")
        if rows % self.global_batch:
            raise LoaderStateError(f"the checkpoint consumed {rows} rows, not a multiple of this run's global batch "
                                   f"{self.global_batch}; keep the global batch size when resuming")
        self.micro_steps = rows // self.global_batch * self.gradient_accumulation_steps
