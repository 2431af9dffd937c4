"""One run per checkpoint folder: ``checkpoint_dir/.lock`` (and per run folder, ``runs/NAME/.lock``: ``run.py``).

The lock file holds the holder's host, pid (with the boot and start tick that tell its process from a later one given
the same number), run name, Slurm job id, torchrun run id and restart count, and start time; the holder touches it
every 30 s.
A second run on the same folder stops and names the holder, unless the lock is stale: its process is gone (same
host), it belongs to this same Slurm job (a requeued attempt) or to an earlier attempt of this torchrun job (an
elastic restart), its Slurm job has ended (``scontrol show job`` says so, or no longer knows the job), or nobody
touched it for 10 minutes and nothing says its holder lives (a holder on another host that died). A holder whose
process lives on this host, or whose Slurm job Slurm says is not over, keeps its lock however long it has been
silent: a job suspended by Slurm (``scontrol suspend``: SIGSTOP) or a process stopped with Ctrl-Z stops refreshing,
and 10 minutes later a second run took the folder over while the first could go on. A stale lock is taken over
with a warning; ``--force-lock`` takes any lock (for a holder you know is dead).

The Slurm check is for job chains (``sbatch --dependency=afterany:<job>``, the usual way to train for weeks):
a job killed outright (node failure, out-of-memory kill) cannot release its lock, and the next job of the
chain starts seconds later on another node. Without the check it was refused, and so was every job after it
that started within the 10 minutes.

The torchrun check is for elastic restarts (``--max-restarts``): when a worker fails, torchrun stops every worker
(rank 0 too, often with SIGKILL, leaving its lock) and starts them again, and with a multi-node rendezvous rank 0
may land on another host. The new rank 0 carries the same ``TORCHELASTIC_RUN_ID`` (``--rdzv-id``) and a higher
``TORCHELASTIC_RESTART_COUNT``; without the check it was refused, each restart failing the same way until none were
left. The run id ``none`` (torchrun's default without ``--rdzv-id``) names no job and is not trusted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from scaletrain.files import process_identity

from .store import CheckpointError

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, 0) asks about a process group or every process: no holder named
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# the states of a job that will not run again (a requeued one is PENDING, REQUEUED or RUNNING once more)
ENDED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


def slurm_job_state(job: str) -> str | None:
    """Slurm job ``job``'s state as ``scontrol show job`` reports it (RUNNING, NODE_FAIL, ...), ``"UNKNOWN"``
    when the controller no longer knows the job (it ended more than MinJobAge ago), or None when Slurm cannot
    be asked (no scontrol, no answer)."""
    exe = shutil.which("scontrol")
    if exe is None or not re.fullmatch(r"[0-9_]+", job):
        return None
    try:
        p = subprocess.run([exe, "show", "job", "--oneliner", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0:
        return "UNKNOWN" if "invalid job id" in (p.stdout + p.stderr).lower() else None
    m = re.search(r"\bJobState=([A-Z_]+)", p.stdout)
    return m.group(1) if m else None


def _elastic() -> dict | None:
    """This torchrun job's run id and restart count, when torchrun started this process with a run id that names
    the job (``--rdzv-id``, or the one ``--standalone`` makes)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    try:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", ""))
    except ValueError:
        return None
    return {"run_id": run_id, "restart": restart} if run_id not in ("", "none") else None


def _same_process(pid: int, holder: dict) -> bool:
    """Whether live ``pid`` is still the holder, not a later process given its number (the lock records its
    process's identity; a lock without one is taken as the holder's)."""
    recorded = holder.get("process")
    now = process_identity(pid) if isinstance(recorded, str) else None
    return now is None or now == recorded


def _stale(holder: dict, age_s: float) -> str | None:
    """Why the lock may be taken over, or None when its holder may still be running."""
    here = holder.get("host") == socket.gethostname()
    if here:
        try:
            pid = int(holder.get("pid", -1))
        except (TypeError, ValueError):  # a damaged or hand-edited lock: no process to ask
            pid = -1
        if pid == os.getpid():
            return "it is this process's own"
        if not _alive(pid):
            return f"its process {pid} on this host is gone"
        if not _same_process(pid, holder):
            return f"its process {pid} on this host is gone (the number now belongs to a later process)"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return f"it is an earlier attempt of this Slurm job {job}"
    ours, theirs = _elastic(), holder.get("torchelastic")
    if ours and isinstance(theirs, dict) and theirs.get("run_id") == ours["run_id"] and \
            isinstance(theirs.get("restart"), int) and theirs["restart"] < ours["restart"]:
        return (f"it is attempt {theirs['restart']} of this torchrun job {ours['run_id']!r} (this is attempt "
                f"{ours['restart']})")
    if here:
        return None  # its process lives (however long since it refreshed the lock: stopped, suspended or stuck)
    if holder.get("slurm_job_id"):
        state = slurm_job_state(str(holder["slurm_job_id"]))
        if state in ENDED_STATES:
            return f"its Slurm job {holder['slurm_job_id']} has ended ({state})"
        if state == "UNKNOWN":
            return f"its Slurm job {holder['slurm_job_id']} is no longer known to Slurm (it ended)"
        if state is not None:
            return None  # Slurm says the job lives (RUNNING, SUSPENDED, ...): its silence is not its end
    if age_s > STALE_S:
        return f"it was last refreshed {age_s / 60:.0f} minutes ago"
    return None


def _lives(holder: dict) -> str:
    if holder.get("host") == socket.gethostname():
        return f"its process {holder.get('pid')} is alive on this host"
    return f"Slurm says its job {holder.get('slurm_job_id')} is not over"


class FolderLock:
    """Held by rank 0 from the start of a run to its end."""

    def __init__(self, folder: Path, run_name: str, force: bool = False, lock_name: str = LOCK,
                 subject: str | None = None, advice: str | None = None) -> None:
        """``lock_name``, ``subject`` and ``advice``: another holder's lock file in ``folder`` (prepare locks one
        domain), how the refusal names what is locked and what it tells the user to do."""
        self.path = folder / lock_name
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "process": process_identity("self"),
                       "run_name": run_name,
                       "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "torchelastic": _elastic(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.warning: str | None = None
        self._stop = threading.Event()
        folder.mkdir(parents=True, exist_ok=True)
        while not self._create():
            holder, age = self._read()
            if holder is None:  # released meanwhile: try again
                continue
            why = "--force-lock was given" if force else _stale(holder, age)
            if why is None:
                quiet = (f"; it has not refreshed the lock for {age / 60:.0f} minutes but {_lives(holder)}, stopped, "
                         f"suspended or stuck: end it" if age > STALE_S else "")
                raise CheckpointError(
                    f"{subject or f'--checkpoint-dir {folder}'} is in use by run {holder.get('run_name')!r} (pid "
                    f"{holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, lock refreshed "
                    f"{age:.0f} s ago){quiet}; " + (advice or "two runs in one folder overwrite each other's "
                                                    "checkpoints. Use another --checkpoint-dir, wait for it to end, "
                                                    "or pass --force-lock if that run is dead"))
            self.warning = (f"took over the lock of {self.path} held by run {holder.get('run_name')!r} (pid "
                            f"{holder.get('pid')} on {holder.get('host')}): {why}")
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self._thread = threading.Thread(target=self._beat, name="scaletrain-lock", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
        return True

    def _read(self) -> tuple[dict | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_bytes()
        except FileNotFoundError:
            return None, 0.0
        try:
            holder = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            holder = None
        return (holder if isinstance(holder, dict) else {"run_name": "(unreadable lock file)"}), age

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            holder, _ = self._read()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()
        except OSError:
            pass


def lock_run_folder(folder: Path, checkpoints: Path, force: bool = False) -> list[FolderLock]:
    """The run's folder (``runs/NAME``: metrics.jsonl, TensorBoard events, the W&B id) is one run's too. Two runs
    of one name with checkpoints in different folders both wrote into it, and the second, starting fresh, set the
    first's live logs aside as superseded: the folder then told the second run's course while the first went on."""
    if folder.resolve() == checkpoints.resolve():
        return []  # one folder, already locked
    try:
        return [FolderLock(folder, folder.name, force,
                           subject=f"the run folder {folder} (--run-dir {folder.parent}, --run-name {folder.name})",
                           advice="two runs of one name write into one log (metrics.jsonl, TensorBoard, W&B). Give "
                                  "this run another --run-name, wait for that run to end, or pass --force-lock if "
                                  "it is dead")]
    except OSError:
        return []  # an unwritable --run-dir is reported, naming it, where the logs are opened
