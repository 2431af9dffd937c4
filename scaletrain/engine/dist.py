"""Where a run's processes find each other: the rank, world and device of this process, the process group of a
launcher's world or of a plain one-process run, and Slurm's place for a task started without a launcher."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scaletrain.cluster import check_world, slurm_world
from scaletrain.faults import fault


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_dist_env(device: torch.device | None = None) -> bool:
    """Let a plain ``python launch/pretrain.py`` run as a world of one, without a launcher. Its process group
    keeps its rendezvous in memory (a HashStore): a launcher's TCPStore listens on every interface, with no
    authentication, which a one-process run does not need. Returns whether this is such a run. Call
    ``launch_env`` first."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return False
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))  # read by some libraries; nothing listens on it
    if device is not None and not dist.is_initialized():
        dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
    return True


def launch_env() -> None:
    """Before anything reads ``LOCAL_RANK``: a task of a multi-task Slurm step started without a launcher takes its
    place in the step's world from Slurm's variables; a launcher's world smaller than its Slurm step is refused
    (``cluster.py``)."""
    check_world()
    slurm_world()


def local_device() -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def bf16_native(device_type: str) -> bool:
    """Whether the device computes bf16 in hardware: a CUDA (or ROCm) GPU that has it (Ampere, MI200 and later), a
    CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated: a step of the demo's run took 6.8x as long as in fp32
    on such a CPU, while on this AMX host bf16 ran the small preset 1.39x faster than fp32."""
    if device_type == "cuda":  # without emulation: by default a V100 "supports" bf16 by emulating it
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe() for probe in probes if probe is not None)
    return False


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def dist_env(device: torch.device) -> DistEnv:
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=device)


def init_world(device: torch.device, timeout=None) -> None:
    """The process group of a launcher's world (a world of one is made by ``default_dist_env``); ``timeout`` for its
    collectives (a timedelta; None: torch's default, 10 minutes for NCCL and 30 for gloo).

    Under torchrun the agent hosts the store the workers meet in (``TORCHELASTIC_USE_AGENT_STORE``), and keeps
    it across the restarts of ``--max-restarts``; torch's ``env://`` join adds no prefix per attempt ("a new
    TCPStore for every retry", which neither the static nor the shared c10d rendezvous makes). A restarted rank then
    read the addresses the crashed attempt's ranks had published: ``Gloo connectFullMesh failed ... Connection
    refused``, or a wait on ranks that are gone (3 restarts of 12 came back, ``benchmarks/elastic_restarts.py``;
    pytorch/pytorch#135712, and #167288 for NCCL). Each attempt joins under its own prefix,
    ``TORCHELASTIC_RESTART_COUNT``, which every worker of a node's agent shares: 12 of 12."""
    if dist.is_initialized():
        return
    device_id = device if device.type == "cuda" else None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt is None or fault("plain_join") is not None:
        dist.init_process_group(backend_for(device), device_id=device_id, timeout=timeout)
        return
    from datetime import timedelta

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=30))
    dist.init_process_group(backend_for(device), store=dist.PrefixStore(f"scaletrain/attempt_{attempt}", agent),
                            rank=rank, world_size=world, device_id=device_id, timeout=timeout)
