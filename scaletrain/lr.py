"""Linear warmup, then cosine decay to ``min_learning_rate`` at ``max_steps``."""

from __future__ import annotations

import math


def lr_at(step: int, *, learning_rate: float, min_learning_rate: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the step about to be taken).

    Warmup reaches ``learning_rate`` at ``step == warmup_steps - 1``; the cosine runs from
    ``learning_rate`` at ``warmup_steps`` to ``min_learning_rate`` at ``max_steps``.
    """
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_learning_rate + 0.5 * (learning_rate - min_learning_rate) * (1 + math.cos(math.pi * progress))


def lr_factor_fn(cfg) -> callable:
    """Multiplier of the peak LR per step, the form ``torch.optim.lr_scheduler.LambdaLR`` takes."""
    def factor(step: int) -> float:
        return lr_at(step, learning_rate=cfg.learning_rate, min_learning_rate=cfg.min_learning_rate,
                     warmup_steps=cfg.warmup, max_steps=cfg.max_steps) / cfg.learning_rate
    return factor
