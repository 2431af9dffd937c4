"""Named fault-injection points for the crash and hostile-world tests; all off unless set.

``SCALETRAIN_FAULT=<kind>[:<arg>][,<kind>[:<arg>]...]`` in the environment turns them on:

* ``save_pause:SECONDS``: a checkpoint save sleeps between writing its files and committing;
* ``save_enospc[:RANK[@NAME]]``: writing a checkpoint (only checkpoint NAME, e.g. ``step_000004``, if given)
  fails on rank RANK (default 0) the way a full disk fails, inside the engine's own collective save;
* ``spike:STEP[@RANK]``: the forward passes of optimizer step STEP (1-based) on rank RANK (default 0) have their
  logits scaled 30x, as a poisoned batch's would be: a finite loss and gradient norm far above the recent steps;
* ``swap_kill``: the process kills itself between the two renames that replace a folder (a checkpoint's
  ``best``/``final``, a prepared domain with ``--overwrite``);
* ``crash:STEP[@RANK]``: rank RANK (default 0) kills itself (SIGKILL, as a node failure or an out-of-memory kill
  would) before optimizer step STEP, in the first attempt of a job only (torchrun's and Slurm's restart counts 0).
* ``universal_pause:SECONDS``: rank 0 sleeps before converting a DeepSpeed checkpoint to the universal format (a
  resume on another world size), as converting a large model takes minutes;
* ``plain_join``: the ranks of a torchrun restart join the process group as torch's ``env://`` does, with no
  prefix per attempt (``engine/dist.py::init_world``), to measure what that prefix mends.

Nothing else reads the variable; a real run never sets it.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "SCALETRAIN_FAULT"


def fault(kind: str) -> str | None:
    """The argument of fault ``kind`` when it is on (``""`` without one), else None."""
    for spec in os.environ.get(ENV, "").split(","):
        name, _, arg = spec.partition(":")
        if spec and name == kind:
            return arg
    return None


def kill_between_renames() -> None:
    if fault("swap_kill") is not None:
        os.kill(os.getpid(), signal.SIGKILL)


def disk_full(path: str, rank: int) -> None:
    """Raise ENOSPC as a write to ``path`` would on a full disk, when ``save_enospc`` names this rank."""
    arg = fault("save_enospc")
    if arg is None:
        return
    who, _, name = arg.partition("@")
    if rank == int(who or 0) and (not name or f".tmp-{name}" in path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def poisoned_step(rank: int) -> int | None:
    """The step ``spike:STEP[@RANK]`` poisons on this rank, if any."""
    arg = fault("spike")
    if arg is None:
        return None
    step, _, who = arg.partition("@")
    return int(step) if rank == int(who or 0) else None


def crash_step(rank: int) -> int | None:
    """The step before which ``crash:STEP[@RANK]`` kills this rank (SIGKILL), if any: in a job's first attempt only
    (torchrun's and Slurm's restart counts 0), so that the restart it causes runs on."""
    arg = fault("crash")
    if arg is None or any(os.environ.get(v, "0") != "0" for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")):
        return None
    at, _, who = arg.partition("@")
    return int(at) if rank == int(who or 0) else None


def crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
