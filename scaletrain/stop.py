"""Stop signals: a checkpoint at the next step boundary, taken by every rank together, then exit.

* SIGTERM / SIGUSR1: what schedulers send before they kill (Slurm's ``--signal``, a preemption).
* SIGHUP: the terminal a run was started from closed or an ssh session dropped (it killed the run, unsaved), unless
  the run was started to ignore it (``nohup``): then it goes on.
* SIGINT, Ctrl-C: the same save and stop, said on the console; a second Ctrl-C stops at once without saving. A run
  started with SIGINT ignored (a background job of a script) keeps ignoring it. The terminal sends it to the
  launcher and, under ``deepspeed`` and plain ``python``, to the workers too; torchrun forwards it to its workers.

``--max-time``: the same save and stop, before the step that would not end in time (``Deadline``).

The flag is per process; ``requested`` tells every rank whether any rank got one (one small collective per step).
The launchers wait for the save, then kill: torchrun ``--shutdown_timeout`` (30 s by default), DeepSpeed's launch
process 30 s for each worker in turn.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from scaletrain.files import process_age

# the flag (the largest any rank has wins): the time limit, a stop signal, or Ctrl-C (the run then exits 130)
TIME, STOP, INTERRUPT = 1, 2, 3


def run_age() -> float:
    """Seconds since this run started: since this process did (its imports and build count), or under torchrun since
    its agent did (the worker's parent), so that the workers a restart after a crash starts keep the job's clock
    instead of starting a new one; where /proc is missing, since this module was imported."""
    try:
        return process_age(os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else "self")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()


class Deadline:
    """``--max-time``: whether the next step still ends in time, and the save after it.

    Before each step (after the first of this process, which measures), the run stops when the time since the run
    started (``run_age``), plus the longest step and the longest save it has seen, would pass the limit; the stop
    then saves at once. A save's time is the longest measured (or recorded in the resumed checkpoint); before the
    first one, ``estimate_first_save`` (each rank's share of a checkpoint at the write speed it probed in the
    checkpoint folder, doubled) stands in, so that a job whose limit comes before its first interval save does not
    start a stop's save it cannot finish. A step's time includes its evaluation and logging; its saves count as
    saves."""

    def __init__(self, limit_s: float | None, clock=run_age) -> None:
        self.limit_s, self.clock = limit_s, clock
        self.longest_step = self.longest_save = self.save_estimate = 0.0
        self.steps, self.next_saves = 0, False
        self._t = clock() if limit_s is not None else 0.0

    def estimate_first_save(self, share_bytes: float, speed: float | None) -> str | None:
        """Before any save is measured: twice the time ``share_bytes`` (this rank's part of a checkpoint) takes at
        ``speed`` (bytes/s, ``checkpoint.recovery.write_speed`` of the checkpoint folder). Returns what it found, for
        the run's log (None without --max-time or a speed: the first save is then not counted)."""
        if self.limit_s is None or not speed:
            return None
        self.save_estimate = 2.0 * share_bytes / speed
        return (f"--max-time: no save measured yet; {share_bytes / 1e9:.2f} GB a rank at the {speed / 1e6:.0f} MB/s "
                f"written here estimates one at {self.save_estimate:.1f} s (twice the time), until one is measured")

    def step_done(self, saved_s: float, longest_save_s: float, next_saves: bool = False) -> None:
        """A step ended (its evaluation, logging and saves too); ``saved_s`` of its time went to saving, and the
        longest save in the foreground so far took ``longest_save_s`` (a stop's save is one: a background save's
        time on the loop says nothing of it). ``next_saves``: the next step writes a checkpoint of its own (an
        interval one, say), so that a stop after it would be a second save."""
        if self.limit_s is None:
            return
        now = self.clock()
        self.longest_step = max(self.longest_step, now - self._t - saved_s)
        self.longest_save = longest_save_s or self.save_estimate
        self.next_saves = next_saves
        self.steps += 1
        self._t = now

    def near(self) -> bool:
        """True when the next step (with its own save, if it writes one) and a stop's save would not end within the
        limit (never before a step was measured: each start of a run takes at least one step)."""
        saves = 2 if self.next_saves else 1
        return (self.limit_s is not None and self.steps > 0
                and self.clock() + self.longest_step + saves * self.longest_save > self.limit_s)

    def describe(self) -> str:
        estimated = " (estimated)" if self.save_estimate and self.longest_save == self.save_estimate else ""
        return (f"{self.clock():.1f} s of {self.limit_s:.0f} s since the start; a step took up to "
                f"{self.longest_step:.1f} s, a save {self.longest_save:.1f} s{estimated}")


class StopSignals:
    def __init__(self, group, is_main: bool, deadline: Deadline | None = None) -> None:
        self.flag, self.group, self.is_main = 0, group, is_main
        self.deadline = deadline
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
        """The largest flag of any rank (0, TIME, STOP or INTERRUPT), and whether any rank's data failed: every
        rank learns both before the step, so that all of them save and stop together."""
        flag = max(self.flag, TIME if self.deadline is not None and self.deadline.near() else 0)
        t = torch.tensor([flag, int(data_failed)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t[0]), bool(t[1])

    def close(self) -> None:
        """Past the loop (the last save is done): Ctrl-C stops at once again."""
        if self._took_sigint and signal.getsignal(signal.SIGINT) == self._interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)
