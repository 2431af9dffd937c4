"""DeepSpeed back end: ZeRO stage 2 or 3 (optionally with optimizer offload).

The only file that imports deepspeed. Its JSON config is reconciled with the run's flags in
``ds_config.py`` (``resolve_config`` here applies it, once, before anything is built).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from scaletrain.checkpoint.safe import UnsafeCheckpointError, weights_only_loads
from scaletrain.config import ConfigError, PreTrainingConfig
from scaletrain.faults import disk_full, fault
from scaletrain.lr import lr_factor_fn
from scaletrain.model import Llama

from .base import Engine, param_groups, set_schedule
from .dist import DistEnv, backend_for, default_dist_env, dist_env, init_world, launch_env, local_device
from .ds_config import DEFAULT_DS_CONFIG, load_ds_config, resolve_ds_config  # noqa: F401 - part of this module's API

_TAG = "deepspeed"
_UNIVERSAL = "deepspeed_universal"

# DeepSpeed's per-step INFO lines, and torch's deprecation notices for the collectives it calls (printed again and
# again in a run)
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor).* is deprecated")


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    selected_by = "--ds_config <the JSON it was trained with>"  # the flags that choose this engine, for messages

    @classmethod
    def init_distributed(cls) -> DistEnv:
        launch_env()
        device = local_device()
        default_dist_env(device)  # a world of one: its group is made here, and deepspeed joins it
        # and a launcher's (torchrun's restarts need it made so), with DeepSpeed's timeout: DEEPSPEED_TIMEOUT
        # minutes, 10 by default (the group made here first had torch's, and the variable was ignored)
        init_world(device, timeout=deepspeed.constants.default_pg_timeout)
        deepspeed.init_distributed(dist_backend=backend_for(device))
        env = dist_env(device)
        _unlink_shm_workspace(env.rank)
        return env

    @classmethod
    def _resolve(cls, cfg: PreTrainingConfig, world_size: int, device_type: str):
        return resolve_ds_config(load_ds_config(cfg.ds_config), cfg, world_size,
                                 fp16_supported=get_accelerator().is_fp16_supported(), device_type=device_type)

    @classmethod
    def resolve_config(cls, cfg: PreTrainingConfig, world_size: int, device_type: str) -> PreTrainingConfig:
        _, adopted = cls._resolve(cfg, world_size, device_type)
        return cfg.replace(**adopted) if adopted else cfg

    @classmethod
    def build_model(cls, model_cfg, cfg: PreTrainingConfig, env: DistEnv) -> Llama:
        """ZeRO-3: built under ``deepspeed.zero.Init``, each parameter partitioned as soon as its module exists, so
        no rank holds the whole model; ``_setup`` fills each rank's partition. ZeRO-1/2 keep whole parameters on
        every rank (only gradients and optimizer state are sharded)."""
        ds, _ = cls._resolve(cfg, env.world_size, env.device.type)
        if ds["zero_optimization"]["stage"] != 3:
            return super().build_model(model_cfg, cfg, env)
        with _heap_kept_small(), deepspeed.zero.Init(config_dict_or_path=ds):
            return Llama(model_cfg, init=False)

    @classmethod
    def tensor_reader(cls, path: str, trust: bool = False) -> ZeroTensorReader:
        return ZeroTensorReader(path, trust)

    def _setup(self, model: nn.Module) -> None:
        cfg = self.cfg
        self.ds_config, adopted = self._resolve(cfg, self.env.world_size, self.env.device.type)
        assert not adopted, adopted  # the config was resolved before the engine was built
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        # another world size than the checkpoint's: load DeepSpeed's universal format (converted in _load)
        self.universal = bool(self.resume_meta) and self.resume_meta["world_size"] != self.env.world_size
        if self.universal:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        weights = self._weights_for(model)
        if weights is not None:  # before initialize: DeepSpeed's fp32 master weights are copies of these
            fill_partitioned(model, weights)
        factor = lr_factor_fn(cfg)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), config=self.ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, factor))
        self._spike_decided = None
        if cfg.spike_sigma:  # the torch optimizers ZeRO steps (stage 3 offload keeps a second one on the device)
            backup = getattr(self.ds.optimizer, "backup_optimizer", None)
            for opt in [self.base_optimizer] + ([backup] if backup is not None else []):
                opt.step = self._guarded(opt.step)

    @property
    def module(self) -> nn.Module:
        return self.ds

    def native_config(self) -> dict:
        return self.ds_config

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return self.ds.optimizer.optimizer  # the torch AdamW inside DeepSpeed's ZeRO optimizer

    def current_lr(self) -> float:
        return self.ds.get_lr()[0]

    def _forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, scale: float,
                          last: bool) -> torch.Tensor:
        loss_sum = self.ds(input_ids, labels=labels, reduction="sum")
        # scale = world / step tokens; DeepSpeed averages gradients over ranks, and must not divide by
        # the accumulation steps as well (the scale already covers the whole step)
        self.ds.backward(loss_sum * scale, scale_wrt_gas=False)
        if not last:
            self.ds.step()  # only counts the micro-step; DeepSpeed steps at the accumulation boundary
        return loss_sum.detach().float()

    def full_gradients(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        return {name: safe_get_full_grad(p).detach().float().cpu() for name, p in self.ds.module.named_parameters()}

    def _guarded(self, step):
        """The torch optimizer's ``step`` as ZeRO calls it (once per parameter group or sub-group, after it has
        computed the global gradient norm): not taken when the guard calls the step a spike."""
        @functools.wraps(step)  # keeps the marks torch's LR scheduler put on it
        def guarded_step(*args, **kwargs):
            if self._spike_decided is None:  # the first group of this optimizer step decides for all
                self._spike_decided = self._is_spike(float(self.ds.optimizer._global_grad_norm))
            return None if self._spike_decided else step(*args, **kwargs)
        return guarded_step

    def _optimizer_step(self) -> tuple[torch.Tensor, bool]:
        before = self.ds.skipped_steps
        self._spike_decided = None
        self.ds.step()  # clips to gradient_clipping, skips on inf/nan gradients, steps the scheduler
        skipped = self.ds.skipped_steps != before
        if self._spike_decided:  # the parameters and moments stayed; the schedule must not move either
            set_schedule(self.optimizer, self.scheduler, self.scheduler.last_epoch - 1)
        norm = self.ds.get_global_grad_norm()
        if norm is None or skipped:
            norm = float("nan")
        return torch.as_tensor(norm, dtype=torch.float32).detach(), skipped

    def _save(self, path: str) -> None:
        # DeepSpeed's save has barriers between its file writes: a rank whose write fails must still reach them,
        # or every other rank waits there until the process-group timeout. So a failing write is recorded,
        # the rank's remaining writes are skipped, and the failure is raised once save_checkpoint returns.
        engine, failures = self.ds.checkpoint_engine, []
        write = engine.save

        def save(*args, **kwargs):  # DeepSpeed calls save(state_dict=..., path=...)
            if failures:
                return None
            try:
                disk_full(str(kwargs.get("path", args[1] if len(args) > 1 else "")), self.env.rank)  # save_enospc
                return write(*args, **kwargs)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - raised below, after the collectives
                failures.append(e)
                return None

        engine.save = save
        try:
            self.ds.save_checkpoint(path, tag=_TAG, save_latest=False)
        finally:
            del engine.save  # the instance attribute hid the class's method
        if failures:
            raise failures[0]

    def checkpoint_share(self, nbytes: float) -> float:
        """Below ZeRO-3 the module's whole weights (in their training dtype) go into one file, written by data-parallel
        rank 0 on top of its optimizer shard (bf16 at world 8: twice an even share; at world 64: nine times)."""
        share = super().checkpoint_share(nbytes)
        if self.zero_stage < 3 and self.ds.save_non_zero_checkpoint:
            share += sum(p.numel() * p.element_size() for p in self.ds.module.parameters())
        return share

    def _load(self, path: str, trust: bool) -> None:
        tag = _TAG
        if self.universal:
            tag = _UNIVERSAL
            self._universal_ready(path, trust)
        with weights_only_loads(SAFE_GLOBALS(), trust):
            load_path, _ = self.ds.load_checkpoint(path, tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}/{tag}")

    def _universal_ready(self, path: str, trust: bool) -> None:
        """Rank 0 converts the checkpoint to DeepSpeed's universal format (once: it is kept beside the shards) while
        the others wait for its word on a gloo group of their own, whose timeout allows for the conversion. They
        waited in a barrier of the run's process group, which DeepSpeed times out after 10 minutes
        (DEEPSPEED_TIMEOUT); the conversion took 17.3 s for the small preset's 134M parameters here (2.9 s of it to
        start), so about 12 minutes for large's 6.7B, and every rank but 0 would have failed. A conversion that
        fails stops every rank with rank 0's error."""
        from datetime import timedelta

        group = dist.new_group(backend="gloo", timeout=timedelta(hours=6)) if self.env.world_size > 1 else None
        error: Exception | None = None
        if self.env.rank == 0 and not os.path.isdir(os.path.join(path, _UNIVERSAL)):
            try:
                to_universal(path, self.zero_stage, trust)
            except Exception as e:  # every rank stops with it
                error = e
        said = [None if error is None else (isinstance(error, UnsafeCheckpointError), str(error))]
        if group is not None:
            dist.broadcast_object_list(said, src=0, group=group)
            dist.destroy_process_group(group)
        if error is not None:
            raise error
        if said[0] is not None:
            unsafe, message = said[0]
            raise (UnsafeCheckpointError if unsafe else RuntimeError)(f"rank 0: {message}")

    def _set_schedule(self, optimizer_steps: int) -> None:
        set_schedule(self.optimizer, self.scheduler, optimizer_steps)


@contextmanager
def _heap_kept_small():
    """``zero.Init`` builds each module whole, then keeps only this rank's partition. glibc serves the freed
    4-32 MB tensors from its heap, which stays at its high-water mark: the build peaked at 0.72x the base
    model's fp32 bytes per rank at world 2 against its 0.5x partition (0.55x with this; malloc_trim afterwards
    gave the memory back but not the peak). While building, allocations of 1 MiB and up are mapped and
    unmapped on their own; afterwards the threshold is the 32 MiB that glibc's own adjustment rises to."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        yield
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 1 << 20)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 << 20)


def _unlink_shm_workspace(rank: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce (0.19.8 ``ops/csrc/cpu/comm/shm.cpp``) creates one 69 MB segment per
    rank, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, and never unlinks it:
    every CPU run left 138 MB of RAM behind in /dev/shm (10 GB after a day of this suite). ``init_distributed``
    returns once this rank has mapped every rank's segment; after a barrier all have, so the names can go and the
    memory is freed when the last process exits, however it exits."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    dist.barrier()
    if not os.path.exists(f"/dev/shm/{name}"):  # no shm op (GPU, another OS) or not all ranks local
        return
    try:
        import _posixshmem

        _posixshmem.shm_unlink("/" + name)
    except (ImportError, OSError):
        pass


@torch.no_grad()
def fill_partitioned(model: nn.Module, source) -> None:
    """Every parameter from ``source``; a ZeRO-3 partitioned one (``zero.Init``) straight into this rank's
    partition, with no collective: the partition is elements [start, start + n) of the flattened parameter
    (DeepSpeed 0.19.8 ``Init._partition_param``), so the rank asks for the rows that hold them (a random source
    draws the whole tensor on every rank, keeping their streams equal)."""
    for name, get in source.items(model):
        p = model.get_parameter(name)
        if not hasattr(p, "ds_id"):
            p.copy_(get(p.shape, None, p.device))
            continue
        if getattr(p, "ds_secondary_tensor", None) is not None:
            raise ConfigError("--init-from with zero_hpz_partition_size > 1 is not supported")
        part, shape, total = p.ds_tensor, p.ds_shape, p.ds_numel
        n = part.ds_numel
        start = n * dist.get_rank(group=p.ds_process_group)
        end = min(start + n, total)
        row = max(1, total // shape[0]) if len(shape) else 1
        r0, r1 = min(start, total) // row, -(-end // row) if end > start else min(start, total) // row
        rows = get(shape, (slice(r0, r1),), part.device).reshape(-1)
        if end > start:
            part.narrow(0, 0, end - start).copy_(rows[start - r0 * row:end - r0 * row])
    model.initialised = True


def SAFE_GLOBALS() -> list:  # noqa: N802 - a constant, built on first use
    """The DeepSpeed types its checkpoint files hold besides tensors and plain containers (DeepSpeed 0.19.8:
    ZeRO-1/2/3, offload, universal; found with torch.serialization.get_unsafe_globals_in_checkpoint).
    Each rebuilds from plain values without running anything else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def run_universal_converter(argv: list[str], trust: bool) -> None:
    """DeepSpeed's ds_to_universal main with every torch.load weights-only (in the converter's process)."""
    import runpy

    sys.argv = ["ds_to_universal", *argv]
    with weights_only_loads(SAFE_GLOBALS(), trust):
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)


def to_universal(path: str, zero_stage: int, trust: bool = False) -> str:
    """Convert ``path``'s DeepSpeed shards to the universal format next to them (atomically), with
    DeepSpeed's own converter. The same as: python -m deepspeed.checkpoint.ds_to_universal
    --input_folder PATH/deepspeed --output_folder PATH/deepspeed_universal [--inject_missing_state]
    (with its file reads weights-only unless ``trust``)."""
    if fault("universal_pause"):
        time.sleep(float(fault("universal_pause")))
    out = os.path.join(path, _UNIVERSAL)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    argv = ["--input_folder", os.path.join(path, _TAG), "--output_folder", tmp, "--num_extract_workers", "1",
            "--num_merge_workers", "1"]
    if zero_stage < 3:
        argv.append("--inject_missing_state")  # ZeRO-1/2 checkpoints lack what the converter needs
    code = ("import sys; from scaletrain.engine.deepspeed import run_universal_converter; "
            f"run_universal_converter(sys.argv[1:], {trust!r})")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        refusal = [x for x in proc.stderr.splitlines() if "UnsafeCheckpointError" in x]
        if refusal:
            raise UnsafeCheckpointError(refusal[-1].split("UnsafeCheckpointError: ", 1)[-1])
        raise RuntimeError(f"converting {path} to DeepSpeed's universal checkpoint failed:\n{proc.stderr[-3000:]}")
    os.rename(tmp, out)
    return out


class ZeroTensorReader:
    """fp32 model tensors of a ZeRO-2/3 checkpoint via DeepSpeed's zero_to_fp32 in lazy mode: each
    tensor is assembled from the shards when asked for, so memory stays near the tensors in hand."""

    def __init__(self, path: str, trust: bool = False) -> None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        self.trust = trust
        with weights_only_loads(SAFE_GLOBALS(), trust):
            self._lazy = get_fp32_state_dict_from_zero_checkpoint(path, tag=_TAG, lazy_mode=True)
        self.shapes = {k: (tuple(v.shape), torch.float32) for k, v in self._lazy.items()}

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        with weights_only_loads(SAFE_GLOBALS(), self.trust):
            return {n: self._lazy[n].contiguous() for n in names}

