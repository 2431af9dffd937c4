"""The checkpoint manager: what a checkpoint holds, and when one is written.

A checkpoint is ``{engine's sharded model and optimizer, train state, data position}`` plus the
tokenizer the run used and ``COMPLETE.json`` (step, world size, engine, model shape, the resolved
config, the tokenizer's special tokens). The per-rank run state is written and read here, in one
place, as plain values and tensors (``torch.load(weights_only=True)``).

Policy, decided here and nowhere else, in one call per step (``after_step``):
  * ``best``: whenever validation runs and the loss is the lowest so far (``--no-save-best`` keeps
    tracking it without writing the checkpoint);
  * preemption (SIGTERM/SIGUSR1 on any rank) and ``--stop-at-step``: a ``step_N`` checkpoint, then stop;
  * ``--save-interval N``: ``step_N`` every N steps (in the background with ``--async-checkpoint``);
  * the last step: ``final``, always.
Two checkpoints of the same step (``best`` and ``final`` at the end, say) share their files through
hard links instead of writing the state twice.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .recovery import set_aside_later
from .safe import UnsafeCheckpointError, load_run_state
from .store import CheckpointError, CheckpointStore, describe_failure, read_meta, step_name, warn

STATE_FILE = "train_state_rank{rank}.pt"
TOKENIZER_DIR = "tokenizer"
FORMAT = 3  # 3: COMPLETE.json records every file's size and checksum
BYTES_PER_PARAM = 16  # fp32 weights and Adam's two moments (12), plus DeepSpeed's 16-bit weights and slack


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src`` made of hard links (a plain copy where links are not possible)."""
    for p in sorted(src.rglob("*")):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif p.name != "COMPLETE.json":
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError:
                shutil.copy2(p, target)


def checkpoint_bytes(model_cfg) -> int:
    """About how many bytes one checkpoint of this model takes (for the free-space checks)."""
    from scaletrain.model import num_params

    return num_params(model_cfg) * BYTES_PER_PARAM


class CheckpointManager:
    """Saves and loads a run's checkpoints; all ranks call every method."""

    def __init__(self, cfg, env, engine, loader, state, model_cfg, tokenizer=None, tokenizer_file: Path | None = None,
                 group=None, generation_config: dict | None = None) -> None:
        self.cfg, self.env, self.engine, self.loader, self.state = cfg, env, engine, loader, state
        self.store = CheckpointStore(cfg.checkpoint_dir, cfg.keep_last_n_checkpoints, env.rank, env.world_size, group,
                                     estimate_bytes=checkpoint_bytes(model_cfg))
        self.group = group
        # a background save's collectives (DCP's planning: gather, all_gather, reduce_scatter) run in its own thread,
        # while the loop runs its own on ``group`` every step (the stop check): two threads on one gloo group pair
        # different collectives across ranks and hang (2 ranks, a save every 2 steps: 3 runs of 3 hung). So a group of
        # their own, as torchtitan's async checkpointer has.
        self.background_group = (dist.new_group(backend="gloo") if cfg.async_checkpoint and dist.is_initialized()
                                 else group)
        self.rolled_back = False  # set by resume: it moved checkpoints past the resumed one aside (rank 0)
        self.model_cfg, self.tokenizer, self.tokenizer_file = model_cfg, tokenizer, tokenizer_file
        self.generation_config = generation_config  # --init-from's model folder's, for the export
        self._written: tuple[int, str] | None = None  # (step, name) of the last checkpoint committed
        self.last_saved: Path | None = None

    # ---- policy ----------------------------------------------------------------------------------
    def after_step(self, val_loss: float | None = None, stop_for: str | None = None) -> str | None:
        """Write what the policy asks for after optimizer step ``state.step``; returns why the run must stop
        now ("stop_at_step", or ``stop_for``: another reason to save and stop) or None. A preemption is seen before
        the next step, with its data (``stop_here``)."""
        cfg, step = self.cfg, self.state.step
        if val_loss is not None and self.state.record_val_loss(val_loss) and cfg.save_best:
            self.save("best")
        if step == cfg.max_steps:
            self.save("final")
            return None
        if stop_for:
            self.save(step_name(step), stopped_for=stop_for)
            return stop_for
        if step == cfg.stop_at_step:
            self.save(step_name(step), stopped_for="stop_at_step")
            return "stop_at_step"
        if cfg.save_interval and step % cfg.save_interval == 0:
            self.save(step_name(step), background=cfg.async_checkpoint)
        return None

    @property
    def longest_save_s(self) -> float:
        """The longest save written in the foreground here, or recorded by the resumed checkpoint: what a stop's
        save will take (--max-time)."""
        return self.store.longest_save_s

    def saves_at(self, step: int, evaluates: bool) -> bool:
        """Whether ``after_step`` at ``step`` may write a checkpoint in the foreground (``evaluates``: validation runs
        after that step, and may find a new best)."""
        cfg = self.cfg
        return (step in (cfg.max_steps, cfg.stop_at_step) or (evaluates and cfg.save_best)
                or bool(cfg.save_interval and step % cfg.save_interval == 0 and not cfg.async_checkpoint))

    def stop_here(self, reason: str) -> Path | None:
        """A checkpoint of the last step done, for a stop before the next one (a signal, the time limit, data that
        failed): ``step_N``, its record saying why (``stopped_for``: what launch/slurm/requeue.sh reads). When the
        step's own checkpoint was just written, its files are kept (linked) under a record that says so."""
        name = step_name(self.state.step)
        written = self._written is not None and self._written == (self.state.step, name)
        if not written:
            self.save(name, stopped_for=reason)
        self.finish()
        if written:
            self._save_links(name, name, stopped_for=reason)
        return self.last_saved

    def finish(self) -> None:
        """Commit a background save still in flight (all ranks)."""
        self.store.finish()

    # ---- writing ---------------------------------------------------------------------------------
    def meta(self, stopped_for: str | None = None) -> dict[str, Any]:
        """COMPLETE.json's record; ``stopped_for``: why the run stopped at this checkpoint (time_limit, preempted,
        interrupted, stop_at_step, epoch_limit, data_error), absent where it went on."""
        st = self.state
        return {"format": FORMAT, "step": st.step, "tokens_seen": st.tokens_seen,
                "best_val_loss": None if math.isinf(st.best_val_loss) else st.best_val_loss,
                "world_size": self.env.world_size, "engine": self.engine.name,
                "model_config": asdict(self.model_cfg), "config": self.cfg.to_dict(),
                "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
                **({"generation_config": self.generation_config} if self.generation_config else {}),
                **({"stopped_for": stopped_for} if stopped_for else {})}

    def save(self, name: str, background: bool = False, stopped_for: str | None = None) -> Path:
        step = self.state.step
        if self._written and self._written[0] == step and not background:
            return self._save_links(self._written[1], name, stopped_for)
        run_state = {"train": self.state.state_dict(), "data": self.loader.state_dict()}

        def local(folder: Path) -> None:
            torch.save(run_state, folder / STATE_FILE.format(rank=self.env.rank))
            if self.env.is_main and self.tokenizer_file is not None:
                (folder / TOKENIZER_DIR).mkdir()
                shutil.copyfile(self.tokenizer_file, folder / TOKENIZER_DIR / "tokenizer.json")

        def collective(folder: Path, in_background: bool):
            if in_background:
                return self.engine.save_async(str(folder), self.background_group)
            self.engine.save(str(folder))
            return None

        path = self.store.save(local, collective, name, self.meta(stopped_for), background=background)
        self._written = (step, name)
        self.last_saved = path
        if self.env.is_main:
            print(f"scaletrain: {'writing' if background else 'saved'} {path}", flush=True)
        return path

    def _save_links(self, source: str, name: str, stopped_for: str | None = None) -> Path:
        """Checkpoint ``name`` made of ``source``'s files (same step): hard links, and a record of its own (also
        ``source`` itself again, to record why the run stopped there)."""
        src = self.store.dir / source

        def local(folder: Path) -> None:
            if self.env.is_main:
                _link_tree(src, folder)

        record = read_meta(src)
        # the same bytes: the same checksums, and the time writing them took (a resume's --max-time estimate starts
        # from it, not from none)
        timed = {"save_seconds": record["save_seconds"]} if "save_seconds" in record else {}
        path = self.store.save(local, lambda folder, bg: None, name, {**self.meta(stopped_for), **timed},
                               files=record.get("files"))
        self._written = (self.state.step, name)
        self.last_saved = path
        if self.env.is_main and source != name:
            print(f"scaletrain: saved {path} (the files of {source}, same step)", flush=True)
        return path

    # ---- reading ---------------------------------------------------------------------------------
    def load(self, path: Path) -> None:
        """Restore the train state, the engine and the data position from checkpoint ``path``."""
        meta = read_meta(path)
        rank_file = path / STATE_FILE.format(rank=self.env.rank)
        if not rank_file.is_file():  # resharding onto more ranks: start from rank 0's copy
            rank_file = path / STATE_FILE.format(rank=0)
        if not rank_file.is_file():
            older = any(path.rglob("client_state_rank0.pt"))
            old = " (written by an older scaletrain, which this version cannot resume)" if older else ""
            raise CheckpointError(f"checkpoint {path} has no {rank_file.name}{old}")
        try:
            run_state = load_run_state(rank_file)  # plain values and tensors: never code
            self.state.load_state_dict(run_state["train"])
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say which
            raise CheckpointError(f"checkpoint {path}: cannot read {rank_file.name} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from e
        try:
            self.engine.load(str(path), self.state.optimizer_steps)
        except CheckpointError:
            raise
        except BaseException as e:  # DCP raises CheckpointException, a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(f"checkpoint {path}: the {self.engine.name} engine cannot load its state "
                                  f"({describe_failure(e)})") from e
        self.loader.load_state_dict(run_state["data"])
        # how long a save of this run took (its record, when written in the foreground): --max-time's estimate
        # before this process has saved, instead of none
        self.store.longest_save_s = max(self.store.longest_save_s, float(meta.get("save_seconds") or 0.0))
        if self.env.is_main:  # a rollback: what lies past this step is of the course the run leaves
            moved = set_aside_later(self.store.dir, path, self.state.step)
            self.rolled_back = moved is not None
            if moved:
                warn(moved)
