"""Shared pieces of the benchmarks: engine selection by short name, the plain baseline loop."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaletrain.cli import parse_config  # noqa: E402
from scaletrain.engine import get_engine_class  # noqa: E402
from scaletrain.engine.base import param_groups  # noqa: E402
from scaletrain.lr import lr_factor_fn  # noqa: E402
from scaletrain.trainer import build_model  # noqa: E402

ENGINE_KINDS = ("plain", "fsdp", "zero2", "zero3", "zero3_offload")


def engine_argv(kind: str, tmpdir: str | None = None) -> list[str]:
    """Flags that select back end ``kind``; ZeRO kinds use the shipped config with precision left 'auto'."""
    if kind == "fsdp":
        return ["--engine", "fsdp"]
    if kind.startswith("zero"):
        ds = json.loads((ROOT / "ds_configs" / f"{kind}_bf16.json").read_text())
        ds["bf16"] = {"enabled": "auto"}
        path = Path(tmpdir or tempfile.mkdtemp()) / f"{kind}.json"
        path.write_text(json.dumps(ds))
        return ["--ds_config", str(path)]
    raise ValueError(f"unknown engine kind {kind!r}; valid: {', '.join(ENGINE_KINDS)}")


def rss_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def own_mappings() -> None:
    """glibc: blocks of 64 KiB and up in mappings of their own, unmapped when freed (what MALLOC_MMAP_THRESHOLD_
    asks at the start; ``deepspeed.py``'s ZeRO-3 build leaves it at 32 MiB, under which freed tensors stay in the
    heap and in RSS: ZeRO-3 tiny measured 1.4x the estimate that way, a heap's high-water mark, not tensors)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)  # and what the build freed into the heap goes back


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """This environment without the rendezvous variables (a child starts its own group), one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


class Plain:
    """The baseline: what a hand-written single-device loop does per optimizer step."""

    name = "plain"

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg = cfg
        self.model = build_model(cfg, device=device)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.learning_rate,
                                     betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, **fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor_fn(cfg))
        self.dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
        self.device = device

    def train_step(self, micro_batches, num_tokens: int | None = None):
        # the engines' loss: the step's summed token losses over its target tokens
        num_tokens = num_tokens or sum(int(mb[1].numel()) for mb in micro_batches)
        for x, y, *_ in micro_batches:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                loss_sum = self.model(x, labels=y, reduction="sum")
            (loss_sum / num_tokens).backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        if torch.isfinite(norm):  # the same host sync the engines make
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)


def build_runner(kind: str, argv: list[str], env):
    """A plain loop or an Engine for ``kind``; returns (runner, resolved config)."""
    if kind == "plain":
        cfg = parse_config(argv + ["--engine", "fsdp"])
        return Plain(cfg, env.device), cfg
    cfg = parse_config(argv + engine_argv(kind))
    cls = get_engine_class(cfg.resolved_engine)
    cfg = cls.resolve_config(cfg, env.world_size, env.device.type).freeze()
    return cls(build_model(cfg, device=cls.init_device(cfg, env)), cfg, env), cfg
