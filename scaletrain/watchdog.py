"""Workers leave when their launcher dies (Linux).

torchrun and the deepspeed launcher start each worker in its own session, so ``kill -9`` of the launcher's
process group leaves the workers training, racing the restarted job in the same folder. A worker started
by a launcher (``LOCAL_RANK`` is set) watches its parent: when the parent process is gone (the worker is
re-parented), it says so and exits at once. The last complete checkpoint stays; a save in flight is
cleaned at the next start. A polling thread, not ``PR_SET_PDEATHSIG``: that one fires when the parent
*thread* that started the worker ends, which a launcher's helper thread may do while the launcher lives.

The ``deepspeed`` command is two processes: the runner, and ``deepspeed.launcher.launch`` that it starts and that
starts the workers. On one node the runner has no signal handler, so SIGTERM to it (what ``kill PID`` or a
scheduler aiming at the command it started does) ends the runner alone: its launch process and the workers would
train on, detached from anything that waits for them. A worker whose parent is DeepSpeed's launch process also
watches that process's parent; when the runner is gone, the worker sends itself SIGTERM, which the trainer
treats as a preemption: a checkpoint at the current step, then exit 0 (and launch.py exits 0 with its workers).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

POLL_S = 1.0


def exit_with_launcher() -> bool:
    """Start the watch when a launcher started this process; returns whether it did."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    if parent == 1:  # already orphaned, or started by init: nothing to watch
        return False

    runner = _parent_of(parent) if _is_deepspeed_launch(parent) else None

    def watch() -> None:
        nonlocal runner
        stop = threading.Event()
        while not stop.wait(POLL_S):
            if runner is not None and _parent_of(parent) not in (runner, None):
                sys.stderr.write(f"[rank {os.environ.get('RANK', '?')}] scaletrain: the deepspeed runner (pid "
                                 f"{runner}) is gone; saving a checkpoint and exiting, as on SIGTERM\n")
                sys.stderr.flush()
                runner = None
                os.kill(os.getpid(), signal.SIGTERM)
            if os.getppid() != parent:
                sys.stderr.write(f"[rank {os.environ.get('RANK', '?')}] scaletrain: the launcher (pid {parent}) is "
                                 f"gone; exiting so that no orphan keeps training\n")
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, name="scaletrain-launcher-watch", daemon=True).start()
    return True


def _parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _is_deepspeed_launch(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"deepspeed.launcher.launch" in f.read()
    except OSError:
        return False
