"""Where a process sits in its world when no launcher said so: Slurm's variables.

``srun python launch/pretrain.py`` (one task per GPU, no torchrun or deepspeed launcher, as Megatron-LM and
Lightning run under Slurm) starts every task with ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS`` and
the step's node list, but without the ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` that ``torch.distributed``'s env://
rendezvous reads. Without this module each task would start a world of one, all writing into one folder.
``slurm_world`` fills them in: rank, world size, local rank, local world size, the first node of the step as the
master address, and a port derived from the job id (``MASTER_PORT`` when set wins). ``check_world`` refuses a
multi-task Slurm step whose launcher made a smaller world (``srun`` of one ``torchrun --standalone`` per task).
"""

from __future__ import annotations

import os
import re

from scaletrain.errors import ScaletrainError


class LaunchError(ScaletrainError):
    """The processes of one run would not form one world."""


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list (``gpu-[003-005,9],cpu1`` -> ``gpu-003``), as ``scontrol show
    hostnames`` would print it first."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise LaunchError(f"cannot read a host from the Slurm node list {nodelist!r}")
    prefix, ranges, suffix = m.groups()
    if ranges is None:
        return prefix + suffix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + suffix


def _tasks_here(tasks_per_node: str, node_id: int) -> int | None:
    """Tasks on node ``node_id`` from Slurm's ``2(x3),1`` form (2 tasks on each of 3 nodes, then 1)."""
    nodes = 0
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        count, repeat = int(m.group(1)), int(m.group(2) or 1)
        if node_id < nodes + repeat:
            return count
        nodes += repeat
    return None


def slurm_tasks(env=os.environ) -> int:
    """Tasks of the Slurm step this process belongs to (1 outside Slurm)."""
    return int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)


def slurm_world(env=os.environ) -> bool:
    """A task of a multi-task Slurm step started without a launcher: set the env:// rendezvous variables from
    Slurm's and return True; otherwise change nothing and return False."""
    if "RANK" in env or "WORLD_SIZE" in env or slurm_tasks(env) <= 1:
        return False
    missing = [v for v in ("SLURM_PROCID", "SLURM_LOCALID") if v not in env]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if missing or not nodelist:
        raise LaunchError(f"this Slurm step runs {slurm_tasks(env)} tasks but lacks {missing or 'a node list'}: its "
                          f"tasks would train as {slurm_tasks(env)} separate runs. Start them with srun (which sets "
                          f"SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NODELIST), or through torchrun / the deepspeed "
                          f"launcher (see launch/slurm/)")
    node = int(env.get("SLURM_NODEID", "0"))
    local = _tasks_here(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "", node)
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], str(slurm_tasks(env))
    env["LOCAL_RANK"] = env["SLURM_LOCALID"]
    env["LOCAL_WORLD_SIZE"] = str(local or 1)
    env.setdefault("MASTER_ADDR", first_host(nodelist))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
    return True


def check_world(env=os.environ) -> None:
    """Refuse a world smaller than the Slurm step that started it (each task its own world: one folder written by
    several runs)."""
    tasks = slurm_tasks(env)
    if tasks > 1 and "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) < tasks:
        raise LaunchError(f"this Slurm step runs {tasks} tasks but the launcher made a world of {env['WORLD_SIZE']}: "
                          f"the tasks would train as separate runs in one folder. Give torchrun --nnodes "
                          f"$SLURM_NNODES with a c10d rendezvous on the first node (not --standalone), one task per "
                          f"node (launch/slurm/fsdp.sbatch), or srun one task per GPU without a launcher")
