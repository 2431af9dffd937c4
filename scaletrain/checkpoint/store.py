"""Checkpoint folders: atomic commit, the ``latest`` pointer, keep-last-N, resume resolution.

Layout: ``checkpoint_dir/step_000500/``, ``final/``, ``best/`` (lowest validation loss), each
holding the engine's sharded state (DeepSpeed's own files or a DCP checkpoint), every rank's
run state (``train_state_rank<r>.pt``), the tokenizer the run used (``tokenizer/``) and
``COMPLETE.json``. A save goes to ``checkpoint_dir/.tmp-<name>/``; only when every rank has
written does rank 0 add ``COMPLETE.json``, rename the folder into place and then move ``latest``.
Re-saving ``best`` or ``final`` moves the old one to ``.old-<name>`` first. A crash at any moment
leaves one complete copy under each name, or a complete copy the next start puts back (``recovery.py``): a
``.tmp-<name>`` with ``COMPLETE.json`` takes the place of a missing ``<name>``, else a ``.old-<name>``
is restored; what is incomplete is removed. Old ``step_*`` folders go only after a newer one is
complete, renamed to ``.trash-<name>`` first and then deleted (a kill mid-delete leaves a trash folder,
never a partial checkpoint); ``best``, ``final`` and the newest complete checkpoint are never deleted.
``COMPLETE.json`` records every file's size and checksum (``integrity.py``).

A save that fails on any rank fails on every rank within seconds: each rank catches its own failure, the
ranks agree on it before the engine's collective part (so none waits in a collective the others left), the
engines finish their own collectives whatever a write did (``Engine.save`` contract), and the errors are
gathered so the message names the failing rank and its cause. The previous checkpoint and ``latest`` stay.
Fault points used here: ``save_pause``, ``swap_kill`` (see ``scaletrain.faults``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scaletrain.errors import ScaletrainError
from scaletrain.faults import fault, kill_between_renames

from .integrity import HASH, hash_share

COMPLETE = "COMPLETE.json"
LATEST = "latest"
KEPT_NAMES = ("best", "final")


class CheckpointError(ScaletrainError):
    """A checkpoint that cannot be written or resumed from; the message names the path."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def warn(msg: str) -> None:
    print(f"scaletrain: warning: {msg}", file=sys.stderr, flush=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    marker = Path(path) / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE}: its save did not finish)")
    try:
        meta = json.loads(marker.read_bytes())
        int(meta["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{marker} is damaged ({type(e).__name__}: {str(e)[:200]}); resume from another "
                              f"checkpoint") from e
    return meta


def complete_checkpoints(ckpt_dir: str | Path, quiet: bool = False) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first (``best`` sorts before a same-step one). One
    whose ``COMPLETE.json`` is damaged is left out with a warning (never fatal)."""
    d = Path(ckpt_dir)
    found = []
    for p in d.iterdir() if d.is_dir() else []:
        if p.is_dir() and not p.name.startswith(".") and (p / COMPLETE).is_file():
            try:
                found.append((int(read_meta(p)["step"]), p.name != "best", p))
            except CheckpointError as e:
                if not quiet:
                    warn(f"skipping {p}: {e}")
    return [(s, p) for s, _, p in sorted(found)]


def latest_pointer(ckpt_dir: Path) -> Path | None:
    """What ``latest`` names, when it is a readable name of a folder here."""
    try:
        name = (ckpt_dir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        warn(f"{ckpt_dir / LATEST} is unreadable; taking the newest complete checkpoint instead")
        return None
    if not name or "/" in name or name.startswith("."):
        warn(f"{ckpt_dir / LATEST} names {name[:80]!r}, not a checkpoint here; taking the newest complete one")
        return None
    return ckpt_dir / name


def newest_checkpoint(ckpt_dir: str | Path, quiet: bool = False) -> Path | None:
    """The ``latest`` pointer when it names a complete checkpoint, else the newest complete one."""
    found = resume_candidates(ckpt_dir, quiet)
    return found[0] if found else None


def resume_candidates(ckpt_dir: str | Path, quiet: bool = False) -> list[Path]:
    """Complete checkpoints to resume from, best first: what ``latest`` names, then the rest newest first
    (``best`` last: it is an earlier step than the run reached)."""
    d = Path(ckpt_dir)
    ordered = [p for _, p in reversed(complete_checkpoints(d, quiet))]
    ordered = [p for p in ordered if p.name != "best"] + [p for p in ordered if p.name == "best"]
    target = latest_pointer(d) if d.is_dir() else None
    if target is not None and target in ordered:
        ordered.remove(target)
        ordered.insert(0, target)
    return ordered


def resolve_resume(resume: str | None, ckpt_dir: str) -> list[Path]:
    """``--resume``: None, ``auto`` (newest if any), ``latest`` (newest, required) or a path (a step folder,
    or a checkpoint_dir whose newest complete checkpoint is taken). Returns the candidates in order: the
    first that verifies is resumed (an explicit step folder is the only candidate)."""
    if not resume:
        return []
    if resume in ("auto", "latest"):
        found = resume_candidates(ckpt_dir)
        if not found and resume == "latest":
            raise CheckpointError(f"--resume latest: no complete checkpoint in --checkpoint-dir {ckpt_dir}")
        return found
    return checkpoint_folder(resume, "--resume")


def checkpoint_folder(given: str, flag: str, also: str = "") -> list[Path]:
    """The checkpoint a path names (``--resume PATH``, ``--init-from PATH``, ``convert PATH``): a checkpoint folder,
    a folder of them (its complete ones, the one ``latest`` names first) or a run's folder holding ``checkpoints/``.
    Errors start with ``flag PATH``; ``also``: what else the path may be, for the error that finds neither."""
    p = Path(given)
    if not p.exists():
        raise CheckpointError(f"{flag} {given}: no such checkpoint")
    if not p.is_dir():
        raise CheckpointError(f"{flag} {given}: a file; give the checkpoint's folder (the one holding {COMPLETE})")
    if (p / COMPLETE).is_file():
        read_meta(p)
        return [p]
    found = resume_candidates(p) or resume_candidates(p / "checkpoints")  # a run's folder, runs/NAME, too
    if found:
        return found
    runs = sorted(q.parent.name for q in p.glob("*/checkpoints") if resume_candidates(q, quiet=True))
    hint = f"; it holds runs: give one of them, e.g. {p / runs[0]}" if runs else ""
    # a save writes each rank's run state first: with it but no marker, a save that did not finish
    unfinished = any(p.glob("train_state_rank*"))
    what = f"no {COMPLETE}: its save did not finish" if unfinished else f"no {COMPLETE}"
    raise CheckpointError(f"{flag} {given}: not a complete checkpoint ({what}) and no complete checkpoint inside "
                          f"it{f', nor {also}' if also else ''}{hint}")


def check_model_matches(meta: dict[str, Any], model_cfg, path: Path) -> None:
    """Refuse a checkpoint of another shape, naming the first tensor that differs and both shapes."""
    from scaletrain.model import Llama, ModelConfig

    saved = ModelConfig(**meta["model_config"])
    if saved == model_cfg:
        return
    with torch.device("meta"):
        theirs = {n: tuple(p.shape) for n, p in Llama(saved).named_parameters()}
        ours = {n: tuple(p.shape) for n, p in Llama(model_cfg).named_parameters()}
    for name in sorted(set(theirs) | set(ours)):
        if theirs.get(name) != ours.get(name):
            raise CheckpointError(f"checkpoint {path}: tensor {name} has shape {list(theirs.get(name) or [])} there "
                                  f"but {list(ours.get(name) or [])} in this run (model preset, --num-layers or the "
                                  f"data's vocab differ)")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(p: Path) -> bool:
    return (p / COMPLETE).is_file()


def delete_checkpoint(folder: Path) -> None:
    """Remove a checkpoint folder so that a kill midway leaves a ``.trash-*`` folder, never a partial checkpoint."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def describe_failure(e: BaseException) -> str:
    """One line about a failure; for DCP's CheckpointException (raised on every rank), the failing rank and
    its underlying error."""
    failures = getattr(e, "failures", None)
    prefix = ""
    if isinstance(failures, dict) and failures:
        rank, inner = next(iter(sorted(failures.items())))
        e = inner[0] if isinstance(inner, tuple) else getattr(inner, "exception", inner)
        prefix = f"on rank {rank}: " if len(failures) < 2 else f"on ranks {', '.join(map(str, sorted(failures)))}: "
    text = str(e).strip()
    return f"{prefix}{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _is_enospc(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict) and any(_is_enospc(v[0] if isinstance(v, tuple) else getattr(v, "exception", v))
                                              for v in failures.values()):
            return True
        e = e.__cause__ or e.__context__
    return False


def _attempt(fn, *args):
    """(result, None) or (None, the failure): every failure, DCP's BaseException ones included."""
    try:
        return fn(*args), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        return None, e


class CheckpointStore:
    """Checkpoint folders with atomic commit; all ranks call ``save``."""

    def __init__(self, ckpt_dir: str, keep_last_n: int, rank: int, world_size: int = 1, group=None,
                 estimate_bytes: int = 0) -> None:
        self._pending = None
        self.dir = Path(ckpt_dir)
        self.keep_last_n, self.rank, self.world, self.group = keep_last_n, rank, world_size, group
        self.estimate_bytes = estimate_bytes
        self.longest_save_s = 0.0  # of the saves written in the foreground (their records' save_seconds)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)

    def _gather(self, obj) -> list:
        if not dist.is_initialized() or self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def save(self, local, collective, name: str, meta: dict[str, Any], background: bool = False,
             files: dict[str, list] | None = None) -> Path:
        """Write and commit checkpoint ``name``. ``local(folder)`` writes this rank's own files (no collectives);
        ``collective(folder, background)`` is the engine's save (returns a future when ``background``). The
        commit happens at once, or for a background write at the next ``save`` or ``finish``. ``files``: the
        checksums when they are known already (a copy of another checkpoint's files)."""
        self.finish()
        started = time.perf_counter()
        final = self.dir / name
        tmp = self.dir / f".tmp-{name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            _, error = _attempt(tmp.mkdir, 0o777, True)
        else:
            error = None
        self._barrier()
        if error is None:
            _, error = _attempt(local, tmp)
        future = None
        failed = self._gather(describe_failure(error) if error is not None else None)
        if not any(failed):  # every rank enters the engine's collectives, or none does
            future, error = _attempt(collective, tmp, background)
            pause = fault("save_pause")
            if pause:
                time.sleep(float(pause))
        self._pending = (name, tmp, final, meta, future, error, failed if any(failed) else None, files, started)
        if not background:
            self.finish()
        return final

    def finish(self) -> Path | None:
        """Wait for a background write, then commit it (all ranks); returns the committed folder."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        name, tmp, final, meta, future, error, failed, files, started = pending
        if future is not None and error is None:
            _, error = _attempt(future.result)
        digests: dict[str, list] = dict(files or {})
        if failed is None:  # the files' checksums (each rank its share) travel with the outcome
            mine = None
            if error is None and files is None:
                mine, error = _attempt(hash_share, tmp, self.rank, self.world)
            gathered = self._gather((describe_failure(error) if error is not None else None, mine))
            failed = [f for f, _ in gathered]
            for _, part in gathered:
                digests.update(part or {})
        if any(failed):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self._barrier()
            raise self._failure(final, failed, error)
        timed = {}
        if future is None and files is None:  # written in the foreground, not linked: what a save takes here
            timed["save_seconds"] = round(time.perf_counter() - started, 3)
            self.longest_save_s = max(self.longest_save_s, timed["save_seconds"])
        if self.rank == 0:
            record = dict(meta, name=name, saved_at=time.time(), hash=HASH, files=dict(sorted(digests.items())),
                          **timed)
            atomic_write(tmp / COMPLETE, json.dumps(record, indent=1))
            old = None
            if final.exists():  # re-saving best/final: swap, then drop the old one (see recover)
                old = self.dir / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                kill_between_renames()
            tmp.rename(final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            if name != "best":
                atomic_write(self.dir / LATEST, name + "\n")
            self._prune()
        self._barrier()
        return final

    def _failure(self, final: Path, failed: list, error: BaseException | None) -> CheckpointError:
        ranks = [r for r, f in enumerate(failed) if f]
        if len(set(failed)) == 1:  # a collective failure every rank reports alike (it names the rank itself)
            what = failed[0]
        else:
            what = f"on rank {ranks[0]}: {failed[ranks[0]]}" if self.world > 1 else failed[0]
            if len(ranks) > 1:
                what += f" (and on {len(ranks) - 1} more rank{'s' if len(ranks) > 2 else ''})"
        space = ""
        try:
            free = shutil.disk_usage(self.dir).free
        except OSError:
            free = None
        # a full disk does not always say so: torch.save's zip writer reports it as "unexpected pos"
        if free is not None and ("No space left" in what or _is_enospc(error) or free < self.estimate_bytes):
            space = (f"; {free / 2**30:.2f} GiB free on {self.dir}, this checkpoint needs about "
                     f"{self.estimate_bytes / 2**30:.2f} GiB")
        previous = newest_checkpoint(self.dir, quiet=True)
        kept = f"the previous checkpoint {previous} is intact and latest unchanged" if previous else \
            "nothing was committed"
        sep = " " if what.startswith("on rank") else ": "
        return CheckpointError(f"saving checkpoint {final} failed{sep}{what}{space}; {kept}")

    def _prune(self) -> None:
        if self.keep_last_n <= 0:
            return
        steps = [(s, p) for s, p in complete_checkpoints(self.dir) if p.name.startswith("step_")]
        newest = newest_checkpoint(self.dir, quiet=True)
        for _, p in steps[: max(0, len(steps) - self.keep_last_n)]:
            if p != newest and p.name not in KEPT_NAMES:
                delete_checkpoint(p)
