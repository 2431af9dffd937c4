"""FSDP2 back end: ``fully_shard`` per transformer block and at the root; DCP checkpoints.

Launched by torchrun (or as a world of one by plain ``python``).
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from scaletrain.checkpoint.safe import refused
from scaletrain.faults import disk_full
from scaletrain.lr import lr_factor_fn
from scaletrain.model import Llama

from .base import Engine, param_groups, set_schedule
from .dist import DistEnv, default_dist_env, dist_env, init_world, launch_env, local_device


class FSDPEngine(Engine):
    name = "fsdp"
    selected_by = "--engine fsdp"  # the flags that choose this engine, for messages

    @classmethod
    def init_distributed(cls) -> DistEnv:
        launch_env()
        device = local_device()
        default_dist_env(device)
        init_world(device)
        return dist_env(device)

    @classmethod
    def init_device(cls, cfg, env: DistEnv) -> torch.device:
        # offloaded parameters live on the CPU; building them on the GPU first would need the memory we lack
        return torch.device("cpu") if cfg.fsdp_cpu_offload else env.device

    @classmethod
    def build_model(cls, model_cfg, cfg, env: DistEnv) -> Llama:
        """On the meta device: ``_setup`` shards it, allocates each rank's shard and fills it (torchtitan's order:
        fully_shard, to_empty, init_weights), so no rank ever holds the whole model."""
        with torch.device("meta"):
            return Llama(model_cfg, init=False)

    @classmethod
    def tensor_reader(cls, path: str, trust: bool = False) -> DCPTensorReader:
        return DCPTensorReader(path, trust)

    def _setup(self, model: nn.Module) -> None:
        cfg, env = self.cfg, self.env
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        mp = None
        if cfg.mixed_precision == "bf16":
            # bf16 compute and all-gathers, fp32 master weights and gradient reduction
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs: dict[str, Any] = {"mesh": mesh}
        if mp is not None:
            kwargs["mp_policy"] = mp
        if cfg.fsdp_cpu_offload:
            # pinned host memory speeds the copies to the GPU; a CPU-only build cannot pin at all
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        meta = any(p.is_meta for p in model.parameters())
        if not meta and not cfg.fsdp_cpu_offload:
            model.to(env.device)
        # with one rank a "shard" is the whole tensor: freeing it after forward saves nothing and
        # costs a copy per block in backward (measured 1.28x vs a plain loop on an H200 with it)
        reshard = cfg.fsdp_reshard_after_forward and env.world_size > 1
        n = len(model.layers)
        for i, block in enumerate(model.layers):
            # the last block is gathered again at once by backward: keep it (torchtitan does the same)
            fully_shard(block, reshard_after_forward=reshard and i < n - 1, **kwargs)
        fully_shard(model, reshard_after_forward=reshard, **kwargs)
        if meta:  # allocate this rank's shards only (offloaded ones on the CPU); RoPE tables where compute runs
            model.to_empty(device="cpu" if cfg.fsdp_cpu_offload else env.device)
            model.reset_buffers(env.device)
        weights = self._weights_for(model)
        if weights is not None:
            fill_sharded(model, weights)
        self._model = model
        use_fused = env.device.type == "cuda" and not cfg.fsdp_cpu_offload
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            **({"fused": True} if use_fused else {"foreach": True}))
        self.scheduler = LambdaLR(self.optimizer, lr_factor_fn(cfg))
        self._stager = None  # --async-checkpoint's host buffers, made by the first background save

    @property
    def module(self) -> nn.Module:
        return self._model

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, scale: float,
                          last: bool) -> torch.Tensor:
        # reduce-scatter gradients only on the last micro-step; earlier ones accumulate unsharded.
        # The reduce-scatter averages over ranks: scale = world / step tokens makes the result
        # sum(token grads) / step tokens.
        self._model.set_requires_gradient_sync(last)
        loss_sum = self._model(input_ids, labels=labels, reduction="sum")
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def full_gradients(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self._model.named_parameters():
            g = p.grad
            out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().float().cpu()
        return out

    def _optimizer_step(self) -> tuple[torch.Tensor, bool]:
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), max_norm, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        # one host sync per optimizer step: a non-finite norm means NaN/inf loss or gradients
        finite = bool(torch.isfinite(norm))
        if finite and not self._is_spike(float(norm)):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach(), not finite

    # ---- checkpoints: DCP for the sharded model and optimizer (the schedule follows the step count) --
    def _save(self, path: str) -> None:
        model_sd, optim_sd = get_state_dict(self._model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=_Writer(path))

    def _save_async(self, path: str, group=None):
        """dcp.async_save: the state is copied into host buffers, then written by a background thread while
        training goes on (``group`` must be a gloo group when the default one is NCCL). The buffers are kept for
        the run and refilled by each save (pinned on CUDA, as torchtitan's async_with_pinned_mem): DCP's default
        allocates them afresh each time, and the loop waited for that (benchmarks/checkpoint_bench.py, the 134M
        model on 2 CPU cores: 1.3-2.3 s a save, about the synchronous save's 1.5-1.7 s, against 0.2 s refilled).
        A save refills them only after the previous write has ended (CheckpointStore.save waits for it first)."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self._stager is None:
            cuda = self.env.device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
        model_sd, optim_sd = get_state_dict(self._model, self.optimizer)
        return dcp.async_save({"model": model_sd, "optim": optim_sd}, storage_writer=_Writer(path),
                              process_group=group, async_stager=self._stager)

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        super().close()

    def _load(self, path: str, trust: bool) -> None:
        reader, planner = dcp_reader(path, trust)
        # read the metadata first: a damaged file then fails here with its own error, not inside DCP's
        # collective load (which logs tracebacks and reports only "CheckpointException ranks: [0]")
        reader.read_metadata()
        model_sd, optim_sd = get_state_dict(self._model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, storage_reader=reader, planner=planner)
        set_state_dict(self._model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def _set_schedule(self, optimizer_steps: int) -> None:
        set_schedule(self.optimizer, self.scheduler, optimizer_steps)


@torch.no_grad()
def fill_sharded(model: nn.Module, source) -> None:
    """Every parameter's local shard from ``source``: each rank asks for the rows it holds (a file source reads
    only those), a random source draws the whole tensor and keeps the rank's rows, so any world size starts from
    the same weights."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for name, get in source.items(model):
        p = model.get_parameter(name)
        if not isinstance(p, DTensor):
            p.copy_(get(p.shape, None, p.device))
            continue
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        local = p.to_local()
        local.copy_(get(p.shape, tuple(slice(o, o + n) for o, n in zip(offset, shape)), local.device))
    model.initialised = True


# ---- loading a DCP checkpoint without running code from it --------------------------------------------------
# torch 2.13's FileSystemReader unpickles ``.metadata`` with plain pickle.load, and DefaultLoadPlanner reads
# non-tensor items with torch.load(weights_only=False): either runs whatever a crafted file names. Tensors are
# read with weights_only=True already. These two subclasses read the rest through an allowlist.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader with ``.metadata`` unpickled through an allowlist of DCP's own metadata types."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        if hasattr(self, "_get_metadata_path"):  # torch >= 2.8: also per-rank metadata files
            path = self._get_metadata_path(kwargs.get("rank"))
        else:
            path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise refused(path, e) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor items (optimizer hyperparameters, ...) read with weights_only=True."""

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise refused(f"item {read_item.dest_index.fqn}", e) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _Writer(FileSystemWriter):
    """DCP's file writer, with two threads (two files) a rank where the rank has two cores to itself, as
    Megatron-core's torch_dist saves: the 134M model's saves on 2 cores took 1.1-1.3 s against 2.7-4.6 s with DCP's
    one thread (benchmarks/checkpoint_bench.py, alternating). With the ``save_enospc`` fault point; a write that
    fails on one rank is gathered by DCP's own collective and raised on every rank (no rank is left waiting)."""

    def __init__(self, path: str, **kwargs) -> None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # the ranks on this host share its cores (torchrun and cluster.py say how many; the deepspeed launcher too)
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        kwargs.setdefault("thread_count", 2 if cores >= 2 * ranks_here else 1)
        super().__init__(path, **kwargs)

    def write_data(self, plan, planner):
        disk_full(str(self.path), dist.get_rank() if dist.is_initialized() else 0)
        return super().write_data(plan, planner)


def dcp_reader(path: str, trust: bool):
    """(storage reader, load planner) for a DCP checkpoint: the allowlisted pair unless ``trust``."""
    return (FileSystemReader(path), DefaultLoadPlanner()) if trust else (SafeFileSystemReader(path), SafeLoadPlanner())


class DCPTensorReader:
    """Model tensors of a DCP checkpoint, a few at a time, in one process without a process group."""

    def __init__(self, path: str, trust: bool = False) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path, self.trust = path, trust
        self.metadata = md = dcp_reader(path, trust)[0].read_metadata()
        self.shapes = {k[len("model."):]: (tuple(v.size), v.properties.dtype)
                       for k, v in md.state_dict_metadata.items()
                       if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        sd = {f"model.{n}": torch.empty(self.shapes[n][0], dtype=self.shapes[n][1]) for n in names}
        reader, planner = dcp_reader(self.path, self.trust)
        reader.read_metadata = lambda *args, **kwargs: self.metadata  # read (and checked) once, not per tensor
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
            dcp.load(sd, storage_reader=reader, planner=planner, no_dist=True)
        return {n: sd[f"model.{n}"] for n in names}

