"""Loss-spike skipping in real runs: 2 ranks, one of them fed a poisoned step; every rank skips it, the run's state
records it, and a resumed run decides as the uninterrupted one (the window is in the checkpoint)."""

import pytest
import torch

from .conftest import launch, read_metrics

BASE = ["--data-kind", "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--max-steps", "28",
        "--batch-size", "2", "--learning-rate", "2e-3", "--log-interval", "1", "--eval-interval", "0",
        "--no-use-tensorboard", "--mixed-precision", "fp32", "--spike-sigma", "6", "--z-loss", "1e-4"]
POISON = {"SCALETRAIN_FAULT": "spike:23@1"}  # step 23's forward on rank 1 only


@pytest.mark.parametrize("engine, launcher", [(["--engine", "fsdp"], "torchrun"),
                                              (["--engine", "deepspeed"], "deepspeed")])
def test_a_poisoned_step_is_skipped_on_every_rank_and_resumes_alike(tmp_path, engine, launcher):
    args = BASE + engine + ["--save-interval", "24"]
    straight = launch(launcher, args, tmp_path, run_name="straight", extra_env=POISON)
    assert "scaletrain: step 23 skipped: loss " in straight.stdout, straight.stdout[-3000:]
    metrics = {m["step"]: m for m in read_metrics(tmp_path, "straight")}
    assert metrics[22]["spike_steps"] == 0 and metrics[23]["spike_steps"] == 1 and metrics[28]["spike_steps"] == 1
    assert metrics[23]["skipped_steps"] == 1 and metrics[23]["loss"] > 5 * metrics[22]["loss"]
    assert all(0 < m["z_loss"] < 1 for m in metrics.values())  # z-loss logged apart from the loss
    for rank in (0, 1):  # both ranks counted it, and hold the same window
        state = torch.load(tmp_path / "checkpoints" / "final" / f"train_state_rank{rank}.pt", weights_only=True)
        assert (state["train"]["skipped_steps"], state["train"]["spike_steps"]) == (1, 1)
        assert len(state["train"]["spikes"]["losses"]) == 27
    if launcher != "torchrun":
        return
    step24 = str(tmp_path / "checkpoints" / "step_000024")
    launch(launcher, BASE + engine + ["--resume", step24, "--checkpoint-dir", str(tmp_path / "again")], tmp_path,
           run_name="resumed")
    after = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path, "resumed")]
    assert after == [(s, metrics[s]["loss"], metrics[s]["grad_norm"]) for s in range(25, 29)]
