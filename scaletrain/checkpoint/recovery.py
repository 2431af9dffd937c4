"""What a checkpoint folder holds at start, put right (rank 0, holding the folder's lock): leftovers of saves,
swaps and deletions a crash interrupted (``recover``), a folder that cannot be written (``check_writable``), and
the checkpoints past the step a run goes back to (``set_aside_later``)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from scaletrain.files import ensure_writable

from .store import (
    COMPLETE,
    KEPT_NAMES,
    LATEST,
    CheckpointError,
    atomic_write,
    complete_checkpoints,
    is_complete,
    latest_pointer,
    newest_checkpoint,
    read_meta,
)


def _leftovers(ckpt_dir: Path, prefix: str, tail: str = "") -> list[Path]:
    """The ``prefix<checkpoint name>`` folders a save or deletion of ours leaves, and nothing else: a
    --checkpoint-dir shared with other tools (a scratch folder, $HOME) may hold their own ``.tmp-*``."""
    pattern = re.compile(re.escape(prefix) + r"(step_\d+|" + "|".join(KEPT_NAMES) + ")" + tail)
    return sorted(p for p in ckpt_dir.glob(prefix + "*") if pattern.fullmatch(p.name))


def recover(ckpt_dir: Path) -> list[str]:
    """Finish or undo what a crash interrupted (rank 0, at start, holding the folder's lock); returns what it
    did, for the log. Leftovers of every kind are cleaned: saves that never finished (``.tmp-*``), swaps
    (``.old-*``), interrupted deletions (``.trash-*``); checkpoint-named folders without ``COMPLETE.json`` are
    reported (with their size), not deleted."""
    done = []
    for old in _leftovers(ckpt_dir, ".old-"):  # a re-save of best/final, between its renames
        name = old.name[len(".old-"):]
        final, tmp = ckpt_dir / name, ckpt_dir / f".tmp-{name}"
        if not is_complete(final):
            if is_complete(tmp):
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                done.append(f"{name}: committed the new copy (the crash fell between its renames)")
            elif is_complete(old):
                if final.exists():
                    shutil.rmtree(final)
                old.rename(final)
                done.append(f"{name}: restored the previous copy (its replacement was incomplete)")
                continue
        shutil.rmtree(old, ignore_errors=True)
    latest = newest_checkpoint(ckpt_dir, quiet=True)
    for tmp in _leftovers(ckpt_dir, ".tmp-"):
        name = tmp.name[len(".tmp-"):]
        final = ckpt_dir / name
        if is_complete(tmp) and not final.exists():  # every rank had written: only the rename was missing
            tmp.rename(final)
            done.append(f"{name}: committed (the crash fell between COMPLETE.json and the rename)")
            if name != "best" and (latest is None or read_meta(final)["step"] > read_meta(latest)["step"]):
                atomic_write(ckpt_dir / LATEST, name + "\n")
        else:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that never finished
            done.append(f"removed {tmp.name}, a save that never finished")
    for trash in _leftovers(ckpt_dir, ".trash-", r"-\d+"):
        shutil.rmtree(trash, ignore_errors=True)
        done.append(f"removed {trash.name}, a deletion that was interrupted")
    for probe in sorted(ckpt_dir.glob(PROBE + "*")):  # a write_speed probe, killed midway
        if re.fullmatch(re.escape(PROBE) + r"\d+-\d+", probe.name) and probe.is_file():
            probe.unlink(missing_ok=True)
            done.append(f"removed {probe.name}, a write probe that was interrupted")
    for p in sorted(ckpt_dir.iterdir()):  # not ours to delete: it may be a folder someone put there
        if p.is_dir() and not p.name.startswith(".") and not is_complete(p) and \
                (p.name.startswith("step_") or p.name in KEPT_NAMES):
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            done.append(f"{p} ({size / 2**20:,.0f} MiB) has no {COMPLETE}: not a checkpoint (the remains of a "
                        f"deletion by an older scaletrain, or a copy that never finished); remove it with rm -r {p}")
    return done


PROBE = ".write-probe-rank"


def write_speed(ckpt_dir: str | Path, rank: int, nbytes: int = 64 << 20) -> float | None:
    """Bytes per second this rank writes into the checkpoint folder: ``nbytes`` written and fsynced (by every rank
    at once, as a save writes), then deleted; None where nothing could be written. --max-time's estimate of a save
    before one is measured."""
    probe = Path(ckpt_dir) / f"{PROBE}{rank}-{os.getpid()}"
    block = os.urandom(1 << 20)  # not zeros: a compressing file system would write nothing
    try:
        t0 = time.perf_counter()
        with open(probe, "wb") as f:
            for _ in range(nbytes >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        return nbytes / max(time.perf_counter() - t0, 1e-6)
    except OSError:
        return None
    finally:
        probe.unlink(missing_ok=True)


def check_writable(ckpt_dir: Path, need_bytes: int) -> str | None:
    """Fail now, not after --save-interval steps of compute, when the folder cannot be written; returns a
    warning when its free space is below one checkpoint's estimated size."""
    try:
        ensure_writable(ckpt_dir)
    except OSError as e:
        raise CheckpointError(f"--checkpoint-dir {ckpt_dir} is not writable ({e.strerror or e}); checkpoints could "
                              f"not be saved. Give a writable --checkpoint-dir") from e
    free = shutil.disk_usage(ckpt_dir).free
    if free < need_bytes:
        return (f"--checkpoint-dir {ckpt_dir} has {free / 2**30:.2f} GiB free; one checkpoint needs about "
                f"{need_bytes / 2**30:.2f} GiB: saves will fail unless space is freed")
    return None


def set_aside_later(ckpt_dir: Path, resumed: Path, step: int) -> str | None:
    """A run resumed from step ``step`` of a folder whose checkpoints went further (rolled back past a bad stretch,
    or the newest was damaged) takes a new course from there, and the later checkpoints are of the course it left.
    Left in place, ``latest`` would still name one until this run's first save (a crash before it, and ``--resume
    auto`` jumps back to the course left), and keep-last-N would count them and delete this course's instead. They
    are moved, never deleted, into ``superseded-by-<resumed>-<time>/`` beside them; ``latest`` names the resumed
    checkpoint before anything moves, so a kill midway resumes the right one. Returns the warning to print."""
    if not ckpt_dir.is_dir():
        return None
    later = [(s, p) for s, p in complete_checkpoints(ckpt_dir, quiet=True) if s > step and p != resumed]
    if not later:
        return None
    if resumed.parent.resolve() == ckpt_dir.resolve():
        atomic_write(ckpt_dir / LATEST, resumed.name + "\n")
    elif latest_pointer(ckpt_dir) in [p for _, p in later]:
        (ckpt_dir / LATEST).unlink()
    aside = ckpt_dir / f"superseded-by-{resumed.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for _, p in later:
        p.rename(aside / p.name)
    names = ", ".join(p.name if p.name.startswith("step_") else f"{p.name} (step {s})" for s, p in later)
    return (f"resumed from step {step}, but {ckpt_dir} held checkpoints past it, of the course this run leaves: "
            f"moved {names} to {aside}, so that --resume latest/auto and --keep-last-n-checkpoints follow the run "
            f"from step {step}. Nothing was deleted; remove that folder when it is no longer wanted")
