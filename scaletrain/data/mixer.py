"""Seeded weighted choice of a domain for every global row.

Row ``j``'s domain depends only on (seed, j), drawn in blocks so any range is cheap to
compute: every rank and worker can walk the global row sequence (and so know each domain's
read position) while materialising only its own rows. With packed rows of equal length,
row shares are token shares.
"""

from __future__ import annotations

import numpy as np

BLOCK = 4096


class RowMixer:
    def __init__(self, weights: list[float], seed: int) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"mixing weights must be finite, >= 0 and not all zero, got {list(weights)}")
        self.cdf = np.cumsum(w / w.sum())
        self.cdf[-1] = 1.0
        self.seed = seed
        self._cache: tuple[int, np.ndarray] | None = None

    def _block(self, b: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != b:
            u = np.random.default_rng([self.seed, 0x6D6978, b]).random(BLOCK)
            self._cache = (b, np.searchsorted(self.cdf, u, side="right").astype(np.int64))
        return self._cache[1]

    def domains(self, start: int, n: int) -> np.ndarray:
        """Domain index of global rows ``[start, start + n)``."""
        out = np.empty(n, dtype=np.int64)
        i = 0
        while i < n:
            b, off = divmod(start + i, BLOCK)
            take = min(BLOCK - off, n - i)
            out[i: i + take] = self._block(b)[off: off + take]
            i += take
        return out
