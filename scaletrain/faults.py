"""Named fault-injection points for the crash and hostile-world tests; all off unless set.

``SCALETRAIN_FAULT=<kind>[:<arg>]`` in the environment turns one on:

* ``save_pause:SECONDS``: a checkpoint save sleeps between writing its files and committing;
* ``save_enospc[:RANK[@NAME]]``: writing a checkpoint (only checkpoint NAME, e.g. ``step_000004``, if given)
  fails on rank RANK (default 0) the way a full disk fails, inside the engine's own collective save;
* ``spike:STEP[@RANK]``: the forward passes of optimizer step STEP (1-based) on rank RANK (default 0) have their
  logits scaled 30x, as a poisoned batch's would be: a finite loss and gradient norm far above the recent steps;
* ``swap_kill``: the process kills itself between the two renames that replace a folder (a checkpoint's
  ``best``/``final``, a prepared domain with ``--overwrite``).

Nothing else reads the variable; a real run never sets it.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "SCALETRAIN_FAULT"


def fault(kind: str) -> str | None:
    """The argument of fault ``kind`` when it is on (``""`` without one), else None."""
    spec = os.environ.get(ENV, "")
    name, _, arg = spec.partition(":")
    return arg if spec and name == kind else None


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
