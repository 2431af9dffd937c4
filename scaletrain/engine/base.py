"""The Engine interface both back ends honour.

The public methods (``train_step``, ``save``, ``load``) do the guarding and bookkeeping;
a back end fills in ``_setup``, ``_forward_backward``, ``_optimizer_step``, ``current_lr``
and ``_save``/``_load``. Nothing outside ``scaletrain/engine`` branches on the back end.
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from scaletrain.config import PreTrainingConfig


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class StepOutput:
    loss: torch.Tensor  # this rank's mean loss over the micro-batches, on device, not synced
    grad_norm: torch.Tensor  # global norm before clipping (nan/inf when the step was skipped)
    lr: float  # learning rate the step used
    skipped: bool  # optimizer step skipped (non-finite gradients)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_dist_env() -> None:
    """Let a plain ``python launch/pretrain.py`` run as a world of one, without a launcher."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def local_device() -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def dist_env(device: torch.device) -> DistEnv:
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=device)


def reapply_schedule(optimizer, scheduler) -> None:
    """After loading: the learning rate of the restored step from this run's schedule (a restored
    optimizer carries the lr of the run that saved it, which differs when --max-steps changed)."""
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not norms or the embedding table (GPT-3 / Llama practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Engine(ABC):
    """Wraps a model for distributed training: micro-steps with accumulation, a clipped
    optimizer step on the warmup+cosine schedule, and sharded save/load."""

    name: str = ""

    @classmethod
    @abstractmethod
    def init_distributed(cls) -> DistEnv:
        """Start the process group (with this back end's preferred call) and pick the device."""

    def __init__(self, model: nn.Module, cfg: PreTrainingConfig, env: DistEnv,
                 resume_meta: dict[str, Any] | None = None) -> None:
        self.cfg, self.env = cfg, env
        self.resume_meta = resume_meta  # COMPLETE.json of the checkpoint this run will load, if any
        self.steps_taken = 0  # optimizer steps attempted, skipped ones included
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        model.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.compile:
            for block in model.layers:
                block.compile()
        self._setup(model)

    # ---- back-end hooks --------------------------------------------------------------------
    @abstractmethod
    def _setup(self, model: nn.Module) -> None:
        """Shard the model, build the optimizer and LR scheduler."""

    @abstractmethod
    def _forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, last: bool) -> torch.Tensor:
        """Loss of one micro-batch (detached); gradients accumulate, synced only when ``last``."""

    @abstractmethod
    def _optimizer_step(self) -> tuple[torch.Tensor, bool]:
        """Clip, step and zero gradients; returns (grad norm before clipping, skipped)."""

    @abstractmethod
    def current_lr(self) -> float:
        """Learning rate the next optimizer step will use."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The wrapped model, callable for evaluation."""

    @abstractmethod
    def _save(self, path: str, client_state: dict[str, Any]) -> None: ...

    @abstractmethod
    def _load(self, path: str) -> dict[str, Any]: ...

    # ---- public API ------------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> StepOutput:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches of (input_ids, labels)."""
        if len(micro_batches) != self.cfg.gradient_accumulation_steps:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches, expected "
                             f"--gradient-accumulation-steps={self.cfg.gradient_accumulation_steps}")
        self.module.train()
        lr = self.current_lr()
        losses = []
        for i, (input_ids, labels) in enumerate(micro_batches):
            losses.append(self._forward_backward(input_ids, labels, last=i == len(micro_batches) - 1))
        grad_norm, skipped = self._optimizer_step()
        self.steps_taken += 1
        if skipped:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                    f"norm (last at step {self.steps_taken}, lr {lr:.3g}); stopping. Lower --learning-rate, "
                    f"use bf16 instead of fp16, or resume from an earlier checkpoint "
                    f"(limit: --max-nonfinite-steps={self.cfg.max_nonfinite_steps})")
        else:
            self.nonfinite_in_a_row = 0
        return StepOutput(loss=torch.stack(losses).mean(), grad_norm=grad_norm, lr=lr, skipped=skipped)

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(input_ids, labels=labels).detach().float()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over data-parallel ranks (a collective: call on every rank)."""
        t = t.detach().float().clone()
        if self.env.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.env.world_size
        return t

    def _with_engine_state(self, client_state: dict[str, Any]) -> dict[str, Any]:
        return dict(client_state, engine=self.name, steps_taken=self.steps_taken, skipped_steps=self.skipped_steps)

    def _save_async(self, path: str, client_state: dict[str, Any], group=None):
        """Back-end hook for a background write; without one the write is synchronous (a done future)."""
        from concurrent.futures import Future

        self._save(path, client_state)
        done: Future = Future()
        done.set_result(None)
        return done

    def save(self, path: str, client_state: dict[str, Any]) -> None:
        """Write sharded model/optimizer/scheduler state plus ``client_state`` under ``path`` (all ranks)."""
        self._save(path, self._with_engine_state(client_state))

    def save_async(self, path: str, client_state: dict[str, Any], group=None):
        """Like ``save`` but the sharded state is written in the background; returns a future whose
        ``result()`` waits for it."""
        return self._save_async(path, self._with_engine_state(client_state), group)

    def load(self, path: str) -> dict[str, Any]:
        """Restore what ``save`` wrote; returns the client state (all ranks)."""
        client_state = self._load(path)
        if client_state.get("engine") not in (None, self.name):
            raise ValueError(f"checkpoint {path} was written by the {client_state['engine']} engine; "
                             f"this run uses {self.name}")
        self.steps_taken = client_state.get("steps_taken", 0)
        self.skipped_steps = client_state.get("skipped_steps", 0)
        return client_state

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
