"""Resolve a run once, before anything is built; then the config is frozen.

Everything the run needs to know is decided here: what the engine's own configuration adopts
(DeepSpeed batch sizes or precision from its JSON), the tokenizer and vocabulary from the data's
manifests, the model shape, the checkpoint to resume and whether it fits, and the run name.
Models, loaders and engines are built from the result and nothing changes it afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from scaletrain.checkpoint import check_model_matches, read_meta, recover, resolve_resume
from scaletrain.checkpoint.integrity import verify_folder
from scaletrain.checkpoint.lock import FolderLock, lock_run_folder
from scaletrain.checkpoint.manager import checkpoint_bytes
from scaletrain.checkpoint.recovery import check_writable
from scaletrain.checkpoint.store import (
    COMPLETE,
    LATEST,
    CheckpointError,
    complete_checkpoints,
    delete_checkpoint,
    newest_checkpoint,
    warn,
)
from scaletrain.config import ConfigError, PreTrainingConfig
from scaletrain.data.loader import model_vocab_size
from scaletrain.data.manifest import TOKENIZER_FILE, ShardError, TokenizerInfo, check_same_tokenizing, load_manifest
from scaletrain.data.tokenizer import file_identity
from scaletrain.errors import ScaletrainError
from scaletrain.model import ModelConfig, get_model_config
from scaletrain.model.presets import with_overrides


@dataclass(frozen=True)
class RunPlan:
    cfg: PreTrainingConfig  # resolved and frozen
    model_config: ModelConfig
    tokenizer: TokenizerInfo | None  # None for synthetic data
    tokenizer_file: Path | None  # the tokenizer.json beside the shards (Hugging Face tokenizers only)
    resume: Path | None
    resume_meta: dict[str, Any] | None
    init_source: Any = None  # --init-from's weights (HFWeights or CheckpointWeights), None for a random start
    recovered: tuple[str, ...] = ()  # what crash recovery of the checkpoint folder did (rank 0)
    locks: tuple[FolderLock, ...] = ()  # rank 0 holds the checkpoint folder's and the run folder's until the end

    @property
    def generation_config(self) -> dict | None:
        """The generation config the run's checkpoints carry to the export: the resumed checkpoint's, else that of
        --init-from's model folder (or of the checkpoint it names)."""
        if self.resume_meta is not None:
            return self.resume_meta.get("generation_config")
        return getattr(self.init_source, "generation_config", None)

    def release(self) -> None:
        _release(self.locks)


def _release(locks) -> None:
    for lock in locks:
        lock.release()


def model_config_for(cfg: PreTrainingConfig, vocab_size: int | None = None,
                     source: ModelConfig | None = None) -> ModelConfig:
    """The run's model shape: from ``source`` (--init-from's weights), --model-config, or the preset; with
    ``--num-layers`` and room for ``--max-seq-length`` applied. A preset takes the data's vocab (``vocab_size``);
    a shape from a file keeps its own, which must hold every token id of the data."""
    if cfg.model_config:
        from scaletrain.model.config_io import check_training_length, load_model_config

        base = load_model_config(cfg.model_config)
        check_training_length(cfg.model_config, cfg.max_seq_length)
    elif source is not None:
        base = source
    else:
        base = get_model_config(cfg.model_size)
    from_file = bool(cfg.model_config) or source is not None
    if from_file and vocab_size is not None and vocab_size > base.vocab_size:
        what = f"--model-config {cfg.model_config}" if cfg.model_config else f"--init-from {cfg.init_from}"
        raise ConfigError(f"{what}: the model has {base.vocab_size} token rows but the data's tokenizer has "
                          f"{vocab_size} ids; prepare the data with the model's tokenizer")
    return with_overrides(base, n_layers=cfg.num_layers, vocab_size=None if from_file else vocab_size,
                          max_seq_len=max(base.max_seq_len, cfg.max_seq_length))


def _init_source(cfg: PreTrainingConfig, tokenizer: TokenizerInfo | None, is_main: bool = True):
    """--init-from's weights, with the checks that need them: the data must be tokenized as the source was."""
    if not cfg.init_from:
        return None
    from scaletrain.checkpoint.init_from import CheckpointWeights, open_init_source

    source = open_init_source(cfg.init_from, cfg.trust_checkpoint)
    hf = getattr(source, "hf_config", None)
    if hf is not None:
        from scaletrain.model.config_io import check_training_length

        check_training_length(Path(cfg.init_from), cfg.max_seq_length)
    theirs = getattr(source, "tokenizer", None)  # a scaletrain checkpoint's tokenizer description, or an export's
    if tokenizer is None:
        return source
    if source.tokenizer_json is not None and file_identity(source.tokenizer_json) == tokenizer.identity:
        if hf is not None and not tokenizer.add_bos and is_main:
            _say_missing_bos(cfg.init_from, source.tokenizer_json.parent)
        return source  # the data was prepared with the folder's own tokenizer.json
    if theirs and theirs.get("identity") == tokenizer.identity:
        return source  # with the tokenizer the checkpoint's run (or the run an export came from) trained on
    if theirs and isinstance(source, CheckpointWeights):
        raise ConfigError(f"--init-from {cfg.init_from}: it was trained on data tokenized with {theirs.get('name')} "
                          f"({str(theirs.get('identity'))[:19]}...), this data with {tokenizer.name} "
                          f"({tokenizer.identity[:19]}...); prepare the data with the tokenizer the checkpoint used")
    if source.tokenizer_json is not None:
        file_id = file_identity(source.tokenizer_json)
        raise ConfigError(f"--init-from {cfg.init_from}: its tokenizer ({source.tokenizer_json}, {file_id[:19]}...) "
                          f"is not the one the data was prepared with ({tokenizer.name}, "
                          f"{tokenizer.identity[:19]}...); prepare the data with --tokenizer {cfg.init_from}")
    return source


def _say_missing_bos(init_from: str, folder: Path) -> None:
    """Data prepared without the BOS that the model folder's tokenizer puts before every text: the model never
    saw a text without it (shards prepared before prepare followed the tokenizer, or with --no-add-bos)."""
    from scaletrain.data.tokenizer import HFTokenizer

    tok = HFTokenizer(str(folder))
    if tok.adds_bos:
        warn(f"--init-from {init_from}: its tokenizer puts {tok.bos_token} before every text, and the model was "
             f"trained so; this data was prepared without it. Unless that is meant, prepare the data again "
             f"(prepare now adds it for this tokenizer; --no-add-bos leaves it out)")


def data_tokenizer(cfg: PreTrainingConfig) -> tuple[TokenizerInfo | None, Path | None]:
    """The tokenizer every data source was prepared with (they must agree), and its file."""
    if cfg.data_kind == "synthetic":
        return None, None
    infos = {}
    for source in cfg.data_sources:
        infos[source] = load_manifest(Path(cfg.data_dir) / source).tokenizer
    check_same_tokenizing(infos)
    first = next(iter(infos.values()))
    file = Path(cfg.data_dir) / cfg.data_sources[0] / TOKENIZER_FILE
    if first.kind == "hf":
        if not file.is_file():
            raise ShardError(f"{file.parent} was prepared with {first.name} but {file} is missing; prepare it again")
        have = file_identity(file)
        if have != first.identity:  # it goes into every checkpoint and the export: the shards' ids would not match
            raise ShardError(f"{file} is not the tokenizer {file.parent} was prepared with (the manifest records "
                             f"{first.identity[:19]}..., the file is {have[:19]}...): it was changed or damaged "
                             f"since. Put back the file prepare copied from {first.name}, or prepare the domain again")
    return first, (file if first.kind == "hf" else None)


def _broadcast(obj, world_size: int):
    box = [obj]
    if world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _take_folder(cfg: PreTrainingConfig, model_cfg: ModelConfig, env) -> tuple[tuple[FolderLock, ...], list[str]]:
    """Rank 0 checks the checkpoint folder is writable, locks it and the run's folder, then finishes or undoes what
    a crash left; every rank gets the outcome (an error stops them all with the same line)."""
    locks, notes, error = [], [], None
    if env.is_main:
        folder = Path(cfg.checkpoint_dir)
        try:
            low = check_writable(folder, checkpoint_bytes(model_cfg))
            locks.append(FolderLock(folder, cfg.run_name or "(unnamed)", cfg.force_lock))
            locks += lock_run_folder(Path(cfg.run_dir) / cfg.run_name, folder, cfg.force_lock)
            for lock in locks:
                if lock.warning:
                    warn(lock.warning)
            if low:
                warn(low)
            notes = recover(folder)
            if not cfg.resume:
                _fresh_start(cfg, folder)
        except ScaletrainError as e:
            error = str(e)
    error = _broadcast(error, env.world_size)
    if error:
        _release(locks)
        raise CheckpointError(error)
    return tuple(locks), notes


def _fresh_start(cfg: PreTrainingConfig, folder: Path) -> None:
    """A run that does not resume must not write into another run's checkpoints: its saves would replace that run's
    ``final`` and ``best`` one by one, and until its own first save ``--resume latest`` would find the other run's.
    Refused unless --overwrite-checkpoints, which deletes them first (rank 0, holding the folder's lock)."""
    found = complete_checkpoints(folder, quiet=True)
    if not found:
        return
    newest = newest_checkpoint(folder, quiet=True)  # what --resume latest would take
    meta = read_meta(newest)
    name = (meta.get("config") or {}).get("run_name")
    if not cfg.overwrite_checkpoints:
        raise CheckpointError(
            f"{folder} already holds {len(found)} complete checkpoint(s) of run {name!r} (newest {newest.name}, step "
            f"{meta['step']}), and this run does not resume: continue that run with --resume latest (or --resume "
            f"auto), start a separate one with another --run-name or --checkpoint-dir, or give "
            f"--overwrite-checkpoints to delete them and start over. They are untouched")
    for _, path in found:
        delete_checkpoint(path)
    (folder / LATEST).unlink(missing_ok=True)
    warn(f"--overwrite-checkpoints: deleted {len(found)} checkpoint(s) of run {name!r} from {folder} (newest "
         f"{newest.name}, step {meta['step']})")


_NOT_COMPARED = {"resume", "stop_at_step", "max_time", "run_name", "force_lock", "overwrite_checkpoints",
                 "trust_checkpoint", "verify_checkpoint", "run_dir", "wandb_run_name"}


def _choose_resume(cfg: PreTrainingConfig, env, group) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume: the first candidate whose files match their checksums. With --resume latest/auto
    or a folder of checkpoints, a damaged one is reported and the previous complete one taken; an explicit
    checkpoint that is damaged stops the run naming the file."""
    candidates = resolve_resume(cfg.resume, cfg.checkpoint_dir)
    explicit = bool(cfg.resume) and cfg.resume not in ("auto", "latest") and (Path(cfg.resume) / COMPLETE).is_file()
    problems = []
    for path in candidates:
        meta = read_meta(path)
        bad = verify_folder(path, meta, env.rank, env.world_size, group) if cfg.verify_checkpoint else []
        if not bad:
            return path, meta
        what = f"checkpoint {path} is damaged: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        if explicit:
            raise CheckpointError(f"--resume {cfg.resume}: {what}; resume from another checkpoint (or pass "
                                  f"--no-verify-checkpoint to load it anyway)")
        problems.append(what)
        if env.is_main:
            warn(f"{what}; trying the previous complete checkpoint")
    if problems:
        raise CheckpointError(f"--resume {cfg.resume}: every checkpoint is damaged ({'; '.join(problems)})")
    return None, None


def _check_resume(cfg: PreTrainingConfig, path: Path, meta: dict, engine_name: str, env) -> None:
    """Refuse what cannot continue; warn about every setting that changed since the checkpoint."""
    step = int(meta["step"])
    if meta.get("engine") and meta["engine"] != engine_name:
        from scaletrain.engine import get_engine_class

        how = get_engine_class(meta["engine"]).selected_by
        raise CheckpointError(
            f"checkpoint {path} was written by the {meta['engine']} engine and this run uses {engine_name}; resume it "
            f"with the engine that wrote it ({how}). A checkpoint's optimizer state does not pass between engines; "
            f"its weights do: start a new run from them with --init-from {path} (fresh optimizer, schedule and "
            f"data position; another --run-name), or export them with: python launch/convert.py {path} <out>")
    if step > cfg.max_steps:
        raise CheckpointError(f"checkpoint {path} is at step {step}, past --max-steps {cfg.max_steps}: nothing to "
                              f"train. Give --max-steps above {step} to go on (the schedule follows --max-steps)")
    if cfg.stop_at_step is not None and cfg.stop_at_step <= step:
        raise CheckpointError(f"--stop-at-step {cfg.stop_at_step} is not after the resumed step {step} ({path}); "
                              f"give a later step, or drop --stop-at-step")
    if not env.is_main:
        return
    saved = meta.get("config") or {}
    if cfg.run_name and saved.get("run_name") and saved["run_name"] != cfg.run_name:
        warn(f"checkpoint {path} was written by run {saved['run_name']!r}; this run is {cfg.run_name!r}")
    derived = set()
    if saved.get("micro_batch_size") and saved.get("gradient_accumulation_steps") and meta.get("world_size"):
        before, now = _global_batch(saved, int(meta["world_size"])), _global_batch(cfg.to_dict(), env.world_size)
        if before != now:
            warn(f"resuming {path.name} with a global batch of {now} rows; the checkpoint's run took {before} a step. "
                 f"The data stream goes on from its row, but a step now holds other rows (give --global-batch-size "
                 f"{before} to keep the batch on any world size)")
        # said above, or the same rows a step: the accumulation follows the world size and --global-batch-size by
        # design, and a --global-batch-size given now names the batch the run had without one
        derived = {"gradient_accumulation_steps", "global_batch_size"}
    if "checkpoint_dir" not in cfg.explicit:  # the run's own folder: another only under another --run-name, said above
        derived.add("checkpoint_dir")
    for key, now in cfg.to_dict().items():
        if key in saved and key not in _NOT_COMPARED | derived and saved[key] != now:
            was = "none (the default)" if saved[key] is None else repr(saved[key])
            warn(f"resuming {path.name} with {PreTrainingConfig.flag(key)} {now!r}; the checkpoint was saved with "
                 f"{was}")
    from scaletrain.lr import resume_jump

    jump = resume_jump(cfg, saved, step)
    if jump:
        warn(f"resuming {path.name}: {jump}")


def resolve_for_world(cfg: PreTrainingConfig, engine_cls, world_size: int, device_type: str) -> PreTrainingConfig:
    """The config on ``world_size`` ranks: the accumulation --global-batch-size derives, the precision the device
    computes natively when none was given (bf16, else fp32: ``bf16_native``), then what the engine's own
    configuration decides (an engine whose own file sets batch sizes refuses ones that break the global batch; a
    DeepSpeed file that enables bf16 has it)."""
    from scaletrain.engine.dist import bf16_native

    if "mixed_precision" not in cfg.explicit and cfg.mixed_precision == "bf16" and not bf16_native(device_type):
        cfg = cfg.replace(mixed_precision="fp32")
    cfg = engine_cls.resolve_config(cfg.for_world_size(world_size), world_size, device_type)
    assert cfg.global_batch_size is None or _global_batch(cfg.to_dict(), world_size) == cfg.global_batch_size, cfg
    return cfg


def _global_batch(config: dict, world_size: int) -> int:
    """Rows per optimizer step of a run's config dict on ``world_size`` ranks."""
    return int(config["micro_batch_size"]) * int(config["gradient_accumulation_steps"]) * world_size


def _run_folder(cfg: PreTrainingConfig, world_size: int) -> PreTrainingConfig:
    """The run's name and checkpoint folder. The name: --run-name, else that of the run whose checkpoint --resume
    names (it goes on under its name), else rank 0's timestamp shared with every rank. Checkpoints go to the run's
    own folder, run_dir/run_name/checkpoints, unless --checkpoint-dir says otherwise; so --resume latest/auto looks
    only inside its own run."""
    name = cfg.run_name or _resumed_run_name(cfg)
    if name is None:
        if cfg.resume == "latest" and cfg.checkpoint_dir is None:
            runs = sorted(q.parent.name for q in Path(cfg.run_dir).glob("*/checkpoints"))
            raise ConfigError(f"--resume latest: which run? Give its name, --run-name NAME (runs with checkpoints in "
                              f"{cfg.run_dir}/: {', '.join(runs) or 'none'}), or the folder, --checkpoint-dir")
        name = [_claim_new_name(Path(cfg.run_dir)) if not dist.is_initialized() or dist.get_rank() == 0 else None]
        if world_size > 1:
            dist.broadcast_object_list(name, src=0)
        name = name[0]
    changes: dict[str, Any] = {"run_name": name} if name != cfg.run_name else {}
    if cfg.checkpoint_dir is None:
        changes["checkpoint_dir"] = str(Path(cfg.run_dir) / name / "checkpoints")
    return cfg.replace(**changes) if changes else cfg


def _claim_new_name(run_dir: Path) -> str:
    """A timestamp no other run has: runs started in the same second (a sweep launched by a loop, an array job
    without --run-name) got the same name, and all but one stopped at the checkpoint folder's lock. The folder is
    made here, so of two claims only one succeeds; the next one takes ``<timestamp>-2``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1, 1000):
        name = stamp if i == 1 else f"{stamp}-{i}"
        try:
            (run_dir / name).mkdir(parents=True)
            return name
        except FileExistsError:
            continue
        except OSError:
            return name  # an unwritable --run-dir is reported, naming it, where the run's folder is written
    return name


def _resumed_run_name(cfg: PreTrainingConfig) -> str | None:
    """The name of the run whose checkpoint --resume names (a folder, or latest/auto in a given --checkpoint-dir)."""
    if not cfg.resume or (cfg.resume in ("auto", "latest") and cfg.checkpoint_dir is None):
        return None
    try:
        candidates = resolve_resume(cfg.resume, cfg.checkpoint_dir)
        return (read_meta(candidates[0]).get("config") or {}).get("run_name") if candidates else None
    except ScaletrainError:
        return None  # reported with its reason where the checkpoint is chosen


def plan_run(cfg: PreTrainingConfig, engine_cls, env, group=None) -> RunPlan:
    """Resolve everything, then freeze the config (all ranks call this; ``group``: a CPU group for the
    checkpoint checks). Rank 0 holds the checkpoint and run folders' locks from here: call ``RunPlan.release`` at
    the end."""
    cfg = resolve_for_world(cfg, engine_cls, env.world_size, env.device.type)
    if cfg.memory_snapshot and env.device.type != "cuda":
        raise ConfigError(f"--memory-snapshot: records the CUDA allocator's history; this run is on "
                          f"{env.device.type} (--profile-steps A:B traces CPU memory per operator)")
    if cfg.warmup_steps is None:  # recorded as a number in the config dump and every checkpoint
        cfg = cfg.replace(warmup_steps=cfg.warmup)
    tokenizer, tokenizer_file = data_tokenizer(cfg)
    source = _init_source(cfg, tokenizer, env.is_main)
    from_file = bool(cfg.model_config) or source is not None  # a file's rows are what they are: every id must fit
    vocab = (tokenizer.vocab_size if from_file else model_vocab_size(tokenizer.vocab_size)) if tokenizer else None
    model_cfg = model_config_for(cfg, vocab, source.model_config if source else None)
    if source is not None:
        from scaletrain.checkpoint.init_from import check_same_shape

        check_same_shape(source.model_config, model_cfg, cfg.init_from, env.is_main, cfg.max_seq_length)
    cfg = _run_folder(cfg, env.world_size)
    locks, recovered = _take_folder(cfg, model_cfg, env)  # first: recovery must not race another run
    try:
        resume, resume_meta = _choose_resume(cfg, env, group)
        if resume_meta:
            check_model_matches(resume_meta, model_cfg, resume)
            _check_resume(cfg, resume, resume_meta, engine_cls.name, env)
    except BaseException:
        _release(locks)
        raise
    return RunPlan(cfg.freeze(), model_cfg, tokenizer, tokenizer_file, resume, resume_meta, source, tuple(recovered),
                   locks)
