"""Stop signals: a checkpoint at the next step boundary, taken by every rank together, then exit.

* SIGTERM / SIGUSR1: what schedulers send before they kill (Slurm's ``--signal``, a preemption).
* SIGHUP: the terminal a run was started from closed or an ssh session dropped (it killed the run, unsaved), unless
  the run was started to ignore it (``nohup``): then it goes on.
* SIGINT, Ctrl-C: the same save and stop, said on the console; a second Ctrl-C stops at once without saving. A run
  started with SIGINT ignored (a background job of a script) keeps ignoring it. The terminal sends it to the
  launcher and, under ``deepspeed`` and plain ``python``, to the workers too; torchrun forwards it to its workers.

The flag is per process; ``requested`` tells every rank whether any rank got one (one small collective per step).
The launchers wait for the save, then kill: torchrun ``--shutdown_timeout`` (30 s by default), DeepSpeed's launch
process 30 s for each worker in turn.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

STOP, INTERRUPT = 1, 2  # the flag: a stop signal, or Ctrl-C (any rank's wins: the run then exits 130)


class StopSignals:
    def __init__(self, group, is_main: bool) -> None:
        self.flag, self.group, self.is_main = 0, group, is_main
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._stop)
        if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
            signal.signal(signal.SIGHUP, self._stop)
        self._took_sigint = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if self._took_sigint:
            signal.signal(signal.SIGINT, self._interrupt)

    def _stop(self, signum, frame) -> None:
        self.flag = max(self.flag, STOP)

    def _interrupt(self, signum, frame) -> None:
        self.flag = INTERRUPT
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C: KeyboardInterrupt, no save
        if self.is_main:  # os.write: print() is not safe inside a handler that may interrupt a print
            os.write(2, b"\nscaletrain: Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again "
                        b"stops at once, without saving)\n")

    def requested(self, data_failed: bool = False) -> tuple[int, bool]:
        """The largest flag of any rank (0, STOP or INTERRUPT), and whether any rank's data failed: every rank
        learns both before the step, so that all of them save and stop together."""
        t = torch.tensor([self.flag, int(data_failed)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t[0]), bool(t[1])

    def close(self) -> None:
        """Past the loop (the last save is done): Ctrl-C stops at once again."""
        if self._took_sigint and signal.getsignal(signal.SIGINT) == self._interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)
