"""The Engine interface both back ends honour.

The public methods (``train_step``, ``save``, ``load``) do the guarding and bookkeeping;
a back end fills in ``_setup``, ``_forward_backward``, ``_optimizer_step``, ``current_lr``,
``_save``/``_load`` and says where its model is built and how its checkpoints are read
(``init_device``, ``tensor_reader``). Nothing outside ``scaletrain/engine`` branches on the back end.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from scaletrain.config import PreTrainingConfig
from scaletrain.model import IGNORE_INDEX, Llama, ModelConfig
from scaletrain.model.weights import RandomWeights, WeightSource
from scaletrain.spikes import SpikeGuard

from .dist import DistEnv


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # this rank's sum of token losses over the step's micro-batches (on device, not synced)
    num_tokens: int  # target tokens of the whole step, all micro-batches and ranks (the loss divisor)
    grad_norm: torch.Tensor  # global norm before clipping (nan/inf when the step was skipped)
    lr: float  # learning rate the step used
    skipped: bool  # optimizer step skipped (non-finite gradients)
    spike: str | None = None  # why the step was skipped as a loss or gradient-norm spike (--spike-sigma)
    z_loss_sum: torch.Tensor | None = None  # this rank's summed z-loss term (--z-loss), not part of loss_sum


MicroBatch = Sequence  # (input_ids, labels) or (input_ids, labels, step_tokens)


def set_schedule(optimizer, scheduler, optimizer_steps: int) -> None:
    """After loading: the schedule at ``optimizer_steps`` applied steps (skipped ones do not advance it),
    computed from this run's flags (a restored optimizer carries the lr of the run that saved it, which
    differs when --max-steps changed)."""
    scheduler.last_epoch = optimizer_steps
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(optimizer_steps)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not norms or the embedding table (GPT-3 / Llama practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter's own data is empty (1-D)
        (decay if ndim >= 2 and "embed_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def unfilled_model(model_cfg: ModelConfig, device: torch.device | str) -> Llama:
    """The model with its tensors allocated on ``device`` but not initialised (built on the meta device, so no
    time goes into initialisers whose values would be replaced)."""
    with torch.device("meta"):
        model = Llama(model_cfg, init=False)
    model.to_empty(device=device)
    if model_cfg.tie_embeddings:  # to_empty gives each module its own tensor
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_buffers(device)
    return model


@torch.no_grad()
def fill_whole(model: nn.Module, source: WeightSource) -> None:
    """Every parameter from ``source``, for a model whose parameters are whole on this rank."""
    for name, get in source.items(model):
        p = model.get_parameter(name)
        p.copy_(get(p.shape, None, p.device))
    model.initialised = True


def group_policy(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters as this run built them (taken before any load)."""
    return [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def restore_optimizer_invariants(optimizer: torch.optim.Optimizer, policy: list[dict[str, Any]],
                                 optimizer_steps: int) -> None:
    """After loading a checkpoint: every group's hyperparameters (all but lr, which the schedule sets)
    are this run's, and every parameter's state has its own ``step`` equal to the optimizer steps applied.

    Why: DeepSpeed 0.19.8's ZeRO-3 universal-checkpoint load (runtime/zero/stage3.py,
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) assigns ONE ``step`` tensor object to every
    sub-group's Adam state, which torch's AdamW then increments in place once per sub-group (measured step
    counts 4, 6, 8, 10 after steps 3..6 with two sub-groups), and copies ``param_groups[0]``'s
    hyperparameters into every group (the no-decay group got weight_decay 0.1). Both persist through
    later saves (torch.save keeps the aliasing), so this runs after every load, which also repairs
    checkpoints already damaged that way. Cheap and harmless where nothing is wrong (ZeRO-1/2, DCP):
    drop the DeepSpeed part once a DeepSpeed release loads group by group.
    """
    if len(policy) != len(optimizer.param_groups):
        raise RuntimeError(f"optimizer has {len(optimizer.param_groups)} param groups after loading, "
                           f"this run built {len(policy)}")
    for group, own in zip(optimizer.param_groups, policy):
        for key, value in own.items():
            if key not in ("lr", "initial_lr"):
                group[key] = copy.deepcopy(value)
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = torch.full_like(step, float(optimizer_steps))  # a tensor of its own
        elif step is not None:
            state["step"] = optimizer_steps


class Engine(ABC):
    """Wraps a model for distributed training: micro-steps with accumulation, a clipped
    optimizer step on the warmup+cosine schedule, and sharded save/load of the model and
    optimizer (the run's own state, data position and RNG belong to the checkpoint manager).

    The loss of an optimizer step is the sum of its token losses over the number of target tokens
    of the whole step, across micro-batches and ranks (torchtitan and transformers >= 4.46 do the
    same): each micro-batch's summed loss is scaled by ``world / num_tokens`` before backward, and
    the engines' data-parallel gradient averaging divides by ``world``. With packed rows this is the
    mean over micro-batches; with padded rows every token weighs the same whatever its batch holds.
    """

    name: str = ""
    selected_by: str = ""  # the flags that choose this engine (for messages that name it)

    @classmethod
    @abstractmethod
    def init_distributed(cls) -> DistEnv:
        """Start the process group (with this back end's preferred call) and pick the device."""

    @classmethod
    def resolve_config(cls, cfg: PreTrainingConfig, world_size: int, device_type: str) -> PreTrainingConfig:
        """The run's config with whatever this back end's own configuration decides (a pure function:
        it returns a new config and mutates nothing). Called once, before anything is built."""
        return cfg

    @classmethod
    def init_device(cls, cfg: PreTrainingConfig, env: DistEnv) -> torch.device:
        """Where to build the model before it is handed to this engine."""
        return env.device

    @classmethod
    def build_model(cls, model_cfg: ModelConfig, cfg: PreTrainingConfig, env: DistEnv) -> Llama:
        """The model as this back end takes it: allocated where ``init_device`` says, not initialised; the
        constructor fills its weights (``weights``). A back end that shards overrides this to allocate one
        shard per rank (meta device, ``zero.Init``)."""
        return unfilled_model(model_cfg, cls.init_device(cfg, env))

    @classmethod
    @abstractmethod
    def tensor_reader(cls, path: str, trust: bool = False):
        """A reader of this engine's checkpoint at ``path`` in one process (``.shapes`` and ``.load(names)``);
        unless ``trust``, no file may name code to run while it loads."""

    def __init__(self, model: nn.Module, cfg: PreTrainingConfig, env: DistEnv,
                 resume_meta: dict[str, Any] | None = None, weights: WeightSource | None = None) -> None:
        """``weights``: where the starting weights come from (``RandomWeights(seed)`` or ``--init-from``'s files),
        filled in after the model is sharded, each rank taking its part; None keeps the weights ``model`` has
        (one built by ``build_model`` has none yet: it gets ``RandomWeights(cfg.seed)``)."""
        resolved = type(self).resolve_config(cfg, env.world_size, env.device.type)
        if resolved != cfg:
            changed = [f for f in cfg.__dataclass_fields__ if getattr(cfg, f) != getattr(resolved, f)]
            raise RuntimeError(f"resolve the config with {type(self).__name__}.resolve_config before building the "
                               f"engine (it changes {changed})")
        self.cfg, self.env = cfg, env
        self.resume_meta = resume_meta  # COMPLETE.json of the checkpoint this run will load, if any
        self.weights = weights
        self.spike_guard: SpikeGuard | None = None  # set by the trainer with --spike-sigma (the run state's window)
        self._spike_loss: float | None = None  # the step's loss over all ranks, while the guard decides
        self._spike_reason: str | None = None
        self._z_sum: torch.Tensor | None = None
        model.gradient_checkpointing = cfg.gradient_checkpointing
        model.z_loss = cfg.z_loss
        self._core = model  # the Llama itself, whatever wraps it (its last_z_loss)
        if cfg.compile:
            for block in model.layers:
                block.compile()
        self._setup(model)
        self._policy = group_policy(self.base_optimizer)

    # ---- back-end hooks --------------------------------------------------------------------
    @abstractmethod
    def _setup(self, model: nn.Module) -> None:
        """Shard the model, fill its weights from ``self.weights`` (``_weights_for``), build the optimizer and LR
        scheduler."""

    def _weights_for(self, model: nn.Module) -> WeightSource | None:
        """The source to fill ``model`` from: the one given, else random for a model without values yet."""
        if self.weights is not None:
            return self.weights
        return None if getattr(model, "initialised", True) else RandomWeights(self.cfg.seed)

    @abstractmethod
    def _forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, scale: float,
                          last: bool) -> torch.Tensor:
        """Summed token loss of one micro-batch (detached); backward of ``loss_sum * scale``, gradients
        accumulate and are synced only when ``last``."""

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

    @property
    @abstractmethod
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that holds the state (inside DeepSpeed's ZeRO wrapper, for DeepSpeed)."""

    @abstractmethod
    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's full (unsharded) fp32 gradient by name, between ``accumulate`` and
        ``optimizer_step`` (a collective: all ranks call it). For tests and debugging."""

    @abstractmethod
    def _save(self, path: str) -> None: ...

    @abstractmethod
    def _load(self, path: str, trust: bool) -> None:
        """Restore the engine's state; unless ``trust``, no file may name code to run while it loads."""

    @abstractmethod
    def _set_schedule(self, optimizer_steps: int) -> None: ...

    # ---- public API ------------------------------------------------------------------------
    def accumulate(self, micro_batches: Sequence[MicroBatch],
                   num_tokens: int | None = None) -> tuple[torch.Tensor, int]:
        """Forward and backward over the step's micro-batches; returns (this rank's summed loss, the step's
        target tokens over all ranks). ``num_tokens`` comes with the loader's micro-batches (their third
        element); without it the target tokens are counted here (one all-reduce)."""
        if len(micro_batches) != self.cfg.gradient_accumulation_steps:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches, expected "
                             f"--gradient-accumulation-steps={self.cfg.gradient_accumulation_steps}")
        if num_tokens is None:
            num_tokens = micro_batches[0][2] if len(micro_batches[0]) > 2 else self._count_targets(micro_batches)
        if num_tokens <= 0:
            raise ValueError(f"an optimizer step with {num_tokens} target tokens")
        self.module.train()
        scale = self.env.world_size / num_tokens
        total, self._z_sum = None, None
        for i, mb in enumerate(micro_batches):
            loss_sum = self._forward_backward(mb[0], mb[1], scale, last=i == len(micro_batches) - 1)
            if self.cfg.z_loss:  # the training loss held the z-term; the reported loss is cross-entropy only
                z = self._core.last_z_loss.float()
                loss_sum = loss_sum - z
                self._z_sum = z if self._z_sum is None else self._z_sum + z
            total = loss_sum if total is None else total + loss_sum
        return total, int(num_tokens)

    def optimizer_step(self) -> tuple[torch.Tensor, bool]:
        """Clip, step (unless the gradients are non-finite) and zero; returns (grad norm, skipped)."""
        return self._optimizer_step()

    def train_step(self, micro_batches: Sequence[MicroBatch], num_tokens: int | None = None) -> StepOutput:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; with a ``spike_guard``, a step
        whose loss or gradient norm is a spike is not taken (``StepOutput.spike`` says why)."""
        lr = self.current_lr()
        loss_sum, n = self.accumulate(micro_batches, num_tokens)
        self._spike_reason = None
        # the guard needs the step's loss over all ranks before the step: a collective and a host sync, only then
        loss = (self.all_reduce_sum(loss_sum) / n).item() if self.spike_guard is not None else None
        self._spike_loss = loss
        grad_norm, skipped = self.optimizer_step()
        spike, self._spike_loss = self._spike_reason, None
        if loss is not None and not skipped and spike is None:
            self.spike_guard.record(loss, float(grad_norm))
        return StepOutput(loss_sum=loss_sum, num_tokens=n, grad_norm=grad_norm, lr=lr, skipped=skipped, spike=spike,
                          z_loss_sum=self._z_sum)

    def _is_spike(self, grad_norm: float) -> bool:
        """Whether the step about to be taken is a spike (its loss, or ``grad_norm``, the global norm before
        clipping, far above the guard's window). A back end calls this once per step, between computing the norm
        and stepping; every rank gets the same answer (the same all-reduced values)."""
        if self.spike_guard is None or self._spike_loss is None or not math.isfinite(grad_norm):
            return False
        self._spike_reason = self.spike_guard.check(self._spike_loss, grad_norm)
        return self._spike_reason is not None

    def _count_targets(self, micro_batches: Sequence[MicroBatch]) -> int:
        n = torch.tensor([sum(int((mb[1] != IGNORE_INDEX).sum()) for mb in micro_batches)], dtype=torch.float64)
        if self.env.world_size > 1:
            dist.all_reduce(n)
        return int(n.item())

    def step_loss(self, out: StepOutput) -> float:
        """The step's loss over all ranks: sum of token losses / target tokens (a collective; a host sync)."""
        return (self.all_reduce_sum(out.loss_sum) / out.num_tokens).item()

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, target tokens) of one held-out micro-batch on this rank, on device."""
        self.module.eval()
        loss_sum = self.module(input_ids, labels=labels, reduction="sum").detach().float()
        return loss_sum, (labels != IGNORE_INDEX).sum().float()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (a collective: call on every rank)."""
        t = t.detach().float().clone()
        if self.env.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over data-parallel ranks (a collective: call on every rank)."""
        return self.all_reduce_sum(t) / self.env.world_size

    def _save_async(self, path: str, group=None):
        """Back-end hook for a background write; without one the write is synchronous (a done future)."""
        from concurrent.futures import Future

        self._save(path)
        done: Future = Future()
        done.set_result(None)
        return done

    def save(self, path: str) -> None:
        """Write the sharded model, optimizer and scheduler state under ``path`` (all ranks)."""
        self._save(path)

    def save_async(self, path: str, group=None):
        """Like ``save`` but written in the background; returns a future whose ``result()`` waits for it."""
        return self._save_async(path, group)

    def checkpoint_share(self, nbytes: float) -> float:
        """About how many of a checkpoint's ``nbytes`` this rank writes (--max-time's estimate of a save before one
        is measured): an even share where every rank writes its shard."""
        return nbytes / self.env.world_size

    def load(self, path: str, optimizer_steps: int, trust: bool | None = None) -> None:
        """Restore what ``save`` wrote (all ranks). ``optimizer_steps`` (steps applied, skipped ones not
        counted, from the run's own state) sets the schedule and every parameter's Adam step count.
        Files that would run code while loading are refused unless ``trust`` (default: --trust-checkpoint)."""
        self._load(path, self.cfg.trust_checkpoint if trust is None else trust)
        restore_optimizer_invariants(self.base_optimizer, self._policy, optimizer_steps)
        self._set_schedule(optimizer_steps)

    def native_config(self) -> dict | None:
        """The back end's own resolved configuration where it has one (DeepSpeed's JSON), else None."""
        return None

    def memory_estimate(self, model_cfg: ModelConfig, device_memory_gib: float | None = None):
        """``scaletrain estimate`` for this engine's run (resident memory on a CPU; the GPU's size on CUDA)."""
        from scaletrain.estimate import run_estimate

        device = self.env.device.type
        return run_estimate(self.cfg, model_cfg, self.env.world_size, device, device_memory_gib,
                            resident=device == "cpu", ds_config=self.native_config())

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
