"""The run's own state: one object that the loop updates and every checkpoint saves.

Everything a resumed run needs besides the engine's sharded state and the data position:
the step, the target tokens trained, the best validation loss so far, the skipped and
non-finite step counters, and (per rank) the RNG states. ``state_dict`` holds plain values
and tensors only, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from scaletrain.errors import ScaletrainError


class TrainingDiverged(ScaletrainError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken, skipped ones included
    tokens_seen: int = 0  # target tokens trained (padding not counted)
    best_val_loss: float = math.inf
    skipped_steps: int = 0  # steps whose gradients were non-finite (the optimizer did not step)
    nonfinite_in_a_row: int = 0

    @property
    def optimizer_steps(self) -> int:
        """Steps the optimizer actually applied (the schedule and Adam's step count follow these)."""
        return self.step - self.skipped_steps

    def record_step(self, skipped: bool, tokens: int, lr: float, max_nonfinite: int) -> None:
        """Count one optimizer step; too many non-finite ones in a row stop the run."""
        self.step += 1
        self.tokens_seen += tokens
        if not skipped:
            self.nonfinite_in_a_row = 0
            return
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= max_nonfinite:
            raise TrainingDiverged(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm (last "
                f"at step {self.step}, lr {lr:.3g}); stopping. Lower --learning-rate, use bf16 instead of fp16, or "
                f"resume from an earlier checkpoint (limit: --max-nonfinite-steps={max_nonfinite})")

    def record_val_loss(self, val_loss: float) -> bool:
        """Returns whether ``val_loss`` is the best so far (and keeps it)."""
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"step": self.step, "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss,
                "skipped_steps": self.skipped_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row, "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.best_val_loss = float(state["best_val_loss"])
        self.skipped_steps = int(state["skipped_steps"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
