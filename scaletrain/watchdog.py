"""Workers leave when their launcher dies (Linux).

torchrun and the deepspeed launcher start each worker in its own session, so ``kill -9`` of the launcher's
process group leaves the workers training, racing the restarted job in the same folder. A worker started
by a launcher (``LOCAL_RANK`` is set) watches its parent: when the parent process is gone (the worker is
re-parented), it says so and exits at once. The last complete checkpoint stays; a save in flight is
cleaned at the next start. A polling thread, not ``PR_SET_PDEATHSIG``: that one fires when the parent
*thread* that started the worker ends, which a launcher's helper thread may do while the launcher lives.
"""

from __future__ import annotations

import os
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

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(POLL_S):
            if os.getppid() != parent:
                sys.stderr.write(f"[rank {os.environ.get('RANK', '?')}] scaletrain: the launcher (pid {parent}) is "
                                 f"gone; exiting so that no orphan keeps training\n")
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, name="scaletrain-launcher-watch", daemon=True).start()
    return True
