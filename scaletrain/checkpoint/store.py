"""Checkpoint folders: atomic commit, the ``latest`` pointer, keep-last-N, resume resolution.

Layout: ``checkpoint_dir/step_000500/``, ``final/``, ``best/`` (lowest validation loss), each
holding the engine's sharded state (DeepSpeed's own files or a DCP checkpoint), every rank's
run state (``train_state_rank<r>.pt``), the tokenizer the run used (``tokenizer/``) and
``COMPLETE.json``. A save goes to ``checkpoint_dir/.tmp-<name>/``; only when every rank has
written does rank 0 add ``COMPLETE.json``, rename the folder into place and then move ``latest``.
Re-saving ``best`` or ``final`` moves the old one to ``.old-<name>`` first. A crash at any moment
leaves one complete copy under each name, or a complete copy the next start puts back: a
``.tmp-<name>`` with ``COMPLETE.json`` takes the place of a missing ``<name>``, else a ``.old-<name>``
is restored; what is incomplete is removed. Old ``step_*`` folders go only after a newer one is
complete; ``best``, ``final`` and the newest complete checkpoint are never deleted.

Fault injection for tests (environment, off unless set): ``SCALETRAIN_FAULT=save_pause:SECONDS``
sleeps between writing the shards and committing; ``save_enospc`` fails the save as a full disk
would; ``swap_kill`` kills the process between the two renames that replace ``best``/``final``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scaletrain.errors import ScaletrainError

COMPLETE = "COMPLETE.json"
LATEST = "latest"
_KEEP = ("best", "final")


class CheckpointError(ScaletrainError):
    """A checkpoint that cannot be written or resumed from; the message names the path."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def read_meta(path: str | Path) -> dict[str, Any]:
    marker = Path(path) / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE}: its save did not finish)")
    try:
        meta = json.loads(marker.read_text())
        int(meta["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker} is damaged ({type(e).__name__}: {e}); resume from another checkpoint") from e
    return meta


def complete_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first (``best`` sorts before a same-step one)."""
    d = Path(ckpt_dir)
    found = []
    for p in d.iterdir() if d.is_dir() else []:
        if p.is_dir() and not p.name.startswith(".") and (p / COMPLETE).is_file():
            found.append((read_meta(p)["step"], p.name != "best", p))
    return [(s, p) for s, _, p in sorted(found)]


def newest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The ``latest`` pointer when it names a complete checkpoint, else the newest complete one."""
    pointer = Path(ckpt_dir) / LATEST
    if pointer.is_file():
        target = Path(ckpt_dir) / pointer.read_text().strip()
        if (target / COMPLETE).is_file():
            return target
    found = complete_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, ckpt_dir: str) -> Path | None:
    """``--resume``: None, ``auto`` (newest if any), ``latest`` (newest, required) or a path (a step folder,
    or a checkpoint_dir whose newest complete checkpoint is taken)."""
    if not resume:
        return None
    if resume in ("auto", "latest"):
        found = newest_checkpoint(ckpt_dir)
        if found is None and resume == "latest":
            raise CheckpointError(f"--resume latest: no complete checkpoint in --checkpoint-dir {ckpt_dir}")
        return found
    p = Path(resume)
    if not p.exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint")
    if (p / COMPLETE).is_file():
        return p
    found = newest_checkpoint(p)
    if found is not None:
        return found
    raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE}: its save did not finish) "
                          f"and no complete checkpoint inside it")


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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fault() -> tuple[str, str]:
    spec = os.environ.get("SCALETRAIN_FAULT", "")
    kind, _, arg = spec.partition(":")
    return kind, arg


def _complete(p: Path) -> bool:
    return (p / COMPLETE).is_file()


def recover(ckpt_dir: Path) -> list[str]:
    """Finish or undo what a crash interrupted (rank 0, at start); returns what it did, for the log."""
    done = []
    for old in sorted(ckpt_dir.glob(".old-*")):  # a re-save of best/final, between its renames
        name = old.name[len(".old-"):]
        final, tmp = ckpt_dir / name, ckpt_dir / f".tmp-{name}"
        if not _complete(final):
            if _complete(tmp):
                tmp.rename(final)
                done.append(f"{name}: committed the new copy (the crash fell between its renames)")
            elif _complete(old):
                if final.exists():
                    shutil.rmtree(final)
                old.rename(final)
                done.append(f"{name}: restored the previous copy (its replacement was incomplete)")
                continue
        shutil.rmtree(old, ignore_errors=True)
    latest = newest_checkpoint(ckpt_dir)
    for tmp in sorted(ckpt_dir.glob(".tmp-*")):
        name = tmp.name[len(".tmp-"):]
        final = ckpt_dir / name
        if _complete(tmp) and not final.exists():  # every rank had written: only the rename was missing
            tmp.rename(final)
            done.append(f"{name}: committed (the crash fell between COMPLETE.json and the rename)")
            if name != "best" and (latest is None or read_meta(final)["step"] > read_meta(latest)["step"]):
                _atomic_write(ckpt_dir / LATEST, name + "\n")
        else:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that never finished
    return done


class CheckpointStore:
    """Checkpoint folders with atomic commit; all ranks call ``save``."""

    def __init__(self, ckpt_dir: str, keep_last_n: int, rank: int, group=None) -> None:
        self._pending = None
        self.dir = Path(ckpt_dir)
        self.keep_last_n, self.rank, self.group = keep_last_n, rank, group
        self.recovered: list[str] = []
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.recovered = recover(self.dir)
        self._barrier()

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)

    def _any(self, flag: bool) -> bool:
        if not dist.is_initialized():
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def save(self, write, name: str, meta: dict[str, Any], background: bool = False) -> Path:
        """Write and commit checkpoint ``name``: ``write(folder, background)`` writes this rank's part (and
        returns a future when ``background``); the commit happens at once, or for a background write at the
        next ``save`` or ``finish``."""
        self.finish()
        final = self.dir / name
        tmp = self.dir / f".tmp-{name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        error, future = None, None
        try:
            future = write(tmp, background)
            kind, arg = _fault()
            if kind == "save_enospc" and self.rank == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            if kind == "save_pause":
                time.sleep(float(arg))
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = e
        except BaseException as e:  # torch DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            error = e
        self._pending = (name, tmp, final, meta, future, error)
        if not background:
            self.finish()
        return final

    def finish(self) -> Path | None:
        """Wait for a background write, then commit it (all ranks); returns the committed folder."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is None:
            return None
        name, tmp, final, meta, future, error = pending
        if future is not None and error is None:
            try:
                future.result()
            except Exception as e:  # noqa: BLE001
                error = e
            except BaseException as e:  # DCP's CheckpointException
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                error = e
        if self._any(error is not None):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = newest_checkpoint(self.dir)
            kept = f"the previous checkpoint {previous} is intact" if previous else "nothing was committed"
            raise CheckpointError(f"saving checkpoint {final} failed: {error or 'on another rank'}; {kept}") from error
        if self.rank == 0:
            _atomic_write(tmp / COMPLETE, json.dumps(dict(meta, name=name, saved_at=time.time()), indent=1))
            old = None
            if final.exists():  # re-saving best/final: swap, then drop the old one (see recover)
                old = self.dir / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                if _fault()[0] == "swap_kill":
                    os.kill(os.getpid(), signal.SIGKILL)
            tmp.rename(final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            if name != "best":
                _atomic_write(self.dir / LATEST, name + "\n")
            self._prune()
        self._barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last_n <= 0:
            return
        steps = [(s, p) for s, p in complete_checkpoints(self.dir) if p.name.startswith("step_")]
        newest = newest_checkpoint(self.dir)
        for _, p in steps[: max(0, len(steps) - self.keep_last_n)]:
            if p != newest and p.name not in _KEEP:
                shutil.rmtree(p, ignore_errors=True)

