"""Loss spikes: skip an optimizer step whose loss or gradient norm stands far above the recent steps.

After OLMo-core's skip-step optimizers (a rolling window of the last steps' losses and gradient norms, a step
skipped when either exceeds the window's mean by ``sigma`` standard deviations). A skipped step changes nothing
the run carries: parameters, optimizer moments and step counts, and the schedule stay where they were; the data
moves on (the offending rows are not read again). Every rank decides from the same all-reduced loss and global
gradient norm, so every rank skips the same steps. Skipped steps do not enter the window, so a lasting change of
level keeps being skipped until ``--max-spike-steps`` in a row stop the run with a message.

The window is part of the run's state (``TrainState``): a resumed run decides as the uninterrupted one would.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

MIN_HISTORY = 20  # steps in the window before any step is judged (fewer: a mean and deviation mean little)


class SpikeGuard:
    def __init__(self, sigma: float, window: int) -> None:
        self.sigma, self.window = sigma, window
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)

    @property
    def min_history(self) -> int:
        return min(self.window, MIN_HISTORY)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Why this step is a spike (loss and gradient norm of the whole step, before clipping), or None."""
        if len(self.losses) < self.min_history:
            return None
        for what, value, past in (("loss", loss, self.losses), ("gradient norm", grad_norm, self.norms)):
            mean = math.fsum(past) / len(past)
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in past) / len(past))
            if value > mean + self.sigma * std and value > mean:
                z = (value - mean) / std if std > 0 else math.inf
                return (f"{what} {value:.4g} is {z:.1f} standard deviations above the mean {mean:.4g} of the last "
                        f"{len(past)} steps (--spike-sigma {self.sigma:g})")
        return None

    def record(self, loss: float, grad_norm: float) -> None:
        """A step that was taken enters the window."""
        self.losses.append(float(loss))
        self.norms.append(float(grad_norm))

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.norms.clear()
        for loss, norm in zip(state.get("losses", []), state.get("norms", [])):
            self.record(loss, norm)
