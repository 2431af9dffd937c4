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
from scaletrain.spikes import SpikeGuard


class TrainingDiverged(ScaletrainError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken, skipped ones included
    tokens_seen: int = 0  # target tokens trained (padding not counted)
    best_val_loss: float = math.inf
    skipped_steps: int = 0  # steps the optimizer did not take: non-finite gradients, or a loss spike
    nonfinite_in_a_row: int = 0
    spike_steps: int = 0  # of the skipped steps, those skipped as loss or gradient-norm spikes
    spikes_in_a_row: int = 0
    spikes: SpikeGuard | None = None  # the window of recent losses and gradient norms, with --spike-sigma

    @property
    def optimizer_steps(self) -> int:
        """Steps the optimizer actually applied (the schedule and Adam's step count follow these)."""
        return self.step - self.skipped_steps

    def record_step(self, skipped: bool, tokens: int, lr: float, max_nonfinite: int, spike: str | None = None,
                    max_spikes: int = 0) -> None:
        """Count one optimizer step; too many non-finite ones, or spikes (``spike``: why the step was skipped as
        one), in a row stop the run."""
        self.step += 1
        self.tokens_seen += tokens
        if spike is not None:
            self.skipped_steps += 1
            self.spike_steps += 1
            self.spikes_in_a_row += 1
            if max_spikes and self.spikes_in_a_row >= max_spikes:
                raise TrainingDiverged(
                    f"{self.spikes_in_a_row} optimizer steps in a row were skipped as spikes (last at step "
                    f"{self.step}: {spike}); stopping. The loss has left its recent range for good: resume from an "
                    f"earlier checkpoint with a lower --learning-rate, look at the data of these steps, or raise "
                    f"--spike-sigma (limit: --max-spike-steps={max_spikes})")
            return
        self.spikes_in_a_row = 0
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
                "skipped_steps": self.skipped_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "spike_steps": self.spike_steps, "spikes_in_a_row": self.spikes_in_a_row,
                "spikes": self.spikes.state_dict() if self.spikes else {}, "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.best_val_loss = float(state["best_val_loss"])
        self.skipped_steps = int(state["skipped_steps"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.spike_steps = int(state.get("spike_steps", 0))  # checkpoints from before spike skipping have none
        self.spikes_in_a_row = int(state.get("spikes_in_a_row", 0))
        if self.spikes is not None:
            self.spikes.load_state_dict(state.get("spikes") or {})
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
