"""One base class for every user mistake, and the one entry wrapper that reports it.

A ``ScaletrainError`` is something the user can fix (a flag, a file, a checkpoint, a corpus):
the entry points print its message on one line, with no traceback, and exit 1. Anything else
is a bug and keeps its traceback. ``SCALETRAIN_TRACEBACK=1`` shows tracebacks for user errors too.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, NoReturn


class ScaletrainError(Exception):
    """A user mistake; the message names the flag, file or value and what would be right."""


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


def fail(e: BaseException) -> NoReturn:
    """Print ``error: ...`` (every rank prints its own) and leave at once with status 1."""
    if os.environ.get("SCALETRAIN_TRACEBACK"):
        traceback.print_exception(e)
    sys.stdout.flush()
    sys.stderr.write(f"{_rank_prefix()}error: {e}\n")
    sys.stderr.flush()
    # os._exit: other ranks may be blocked in a collective; the launcher then stops them
    os._exit(1)


INTERRUPTED = 130  # the status of a run stopped by Ctrl-C, saved or not: a `train && convert` chain goes no further


def leave(status: int) -> NoReturn:
    """Flush and exit at once (``os._exit``: see ``run_entry``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_entry(fn: Callable[[], object], hard_exit: bool = False) -> None:
    """Run an entry point: a ScaletrainError becomes a one-line message and exit status 1.

    ``hard_exit`` leaves with ``os._exit(0)`` after success: gloo worker threads can still hold
    tensors at interpreter teardown, and freeing them during finalisation aborts the process now
    and then ("terminate called without an active exception", seen here about 1 run in 8 under
    load; pytorch/pytorch#179291 describes it)."""
    try:
        fn()
    except ScaletrainError as e:
        fail(e)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk or quota is the machine, not a bug: one line naming the file
        fail(ScaletrainError(f"the disk is full ({e.strerror}" + (f": {e.filename}" if e.filename else "")
                             + "); free space there, or write elsewhere, and run again"))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        leave(INTERRUPTED)
    if hard_exit:
        leave(0)
