"""Checkpoint folders: atomic commit, the ``latest`` pointer, keep-last-N, resume resolution.

Layout: ``checkpoint_dir/step_000500/``, ``final/``, ``best/`` (lowest validation loss), each
holding the engine's sharded state (DeepSpeed's own files or a DCP checkpoint), every rank's
client state (data-loader position, RNG) and ``COMPLETE.json``. A save goes to
``checkpoint_dir/.tmp-<name>/``; only when every rank has written does rank 0 add
``COMPLETE.json``, rename the folder into place and then move ``latest``. A crash at any moment
leaves the previous complete checkpoint loadable; leftovers of a partial save are removed at the
next start. Old ``step_*`` folders go only after a newer one is complete; ``best``, ``final`` and
the newest complete checkpoint are never deleted.

Test hooks (environment): ``SCALETRAIN_FAULT=save_pause:SECONDS`` sleeps between writing the
shards and committing; ``SCALETRAIN_FAULT=save_enospc`` fails the save as a full disk would.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE.json"
LATEST = "latest"
_KEEP = ("best", "final")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message names the path."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def read_meta(path: str | Path) -> dict[str, Any]:
    marker = Path(path) / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE}: its save did not finish)")
    return json.loads(marker.read_text())


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


class CheckpointManager:
    """Saves through an Engine with atomic commit; all ranks call ``save``."""

    def __init__(self, ckpt_dir: str, keep_last_n: int, rank: int, group=None) -> None:
        self._pending = None
        self.dir = Path(ckpt_dir)
        self.keep_last_n, self.rank, self.group = keep_last_n, rank, group
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):  # a save that never finished
                shutil.rmtree(stale, ignore_errors=True)
            for stale in self.dir.glob(".old-*"):
                shutil.rmtree(stale, ignore_errors=True)
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

    def save(self, engine, name: str, client_state: dict[str, Any], meta: dict[str, Any],
             background: bool = False) -> Path:
        """Write and commit checkpoint ``name``; with ``background`` the write runs on (engine.save_async)
        and the commit happens at the next ``save`` or ``finish``."""
        self.finish()
        final = self.dir / name
        tmp = self.dir / f".tmp-{name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        error, future = None, None
        try:
            if background:
                future = engine.save_async(str(tmp), client_state, self.group)
            else:
                engine.save(str(tmp), client_state)
            kind, arg = _fault()
            if kind == "save_enospc" and self.rank == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            if kind == "save_pause":
                time.sleep(float(arg))
        except Exception as e:  # noqa: BLE001 - reported on every rank below
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
        if self._any(error is not None):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = newest_checkpoint(self.dir)
            kept = f"the previous checkpoint {previous} is intact" if previous else "nothing was committed"
            raise CheckpointError(f"saving checkpoint {final} failed: {error or 'on another rank'}; {kept}") from error
        if self.rank == 0:
            _atomic_write(tmp / COMPLETE, json.dumps(dict(meta, name=name, saved_at=time.time()), indent=1))
            old = None
            if final.exists():  # re-saving best/final: swap, then drop the old one
                old = self.dir / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
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


def checkpoint_meta(step: int, tokens_seen: int, world_size: int, engine_name: str, model_cfg, cfg) -> dict[str, Any]:
    return {"step": step, "tokens_seen": tokens_seen, "world_size": world_size, "engine": engine_name,
            "model_config": asdict(model_cfg), "config": cfg.to_dict()}
