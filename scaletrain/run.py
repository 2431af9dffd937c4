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
from scaletrain.config import PreTrainingConfig
from scaletrain.data.loader import model_vocab_size
from scaletrain.data.manifest import TOKENIZER_FILE, ShardError, TokenizerInfo, load_manifest
from scaletrain.model import ModelConfig, get_model_config


@dataclass(frozen=True)
class RunPlan:
    cfg: PreTrainingConfig  # resolved and frozen
    model_config: ModelConfig
    tokenizer: TokenizerInfo | None  # None for synthetic data
    tokenizer_file: Path | None  # the tokenizer.json beside the shards (Hugging Face tokenizers only)
    resume: Path | None
    resume_meta: dict[str, Any] | None
    recovered: tuple[str, ...] = ()  # what crash recovery of the checkpoint folder did (rank 0)


def model_config_for(cfg: PreTrainingConfig, vocab_size: int | None = None) -> ModelConfig:
    """The preset with ``--num-layers``, the data's vocab and room for ``--max-seq-length`` applied."""
    preset = get_model_config(cfg.model_size)
    return get_model_config(cfg.model_size, n_layers=cfg.num_layers, vocab_size=vocab_size,
                            max_seq_len=max(preset.max_seq_len, cfg.max_seq_length))


def data_tokenizer(cfg: PreTrainingConfig) -> tuple[TokenizerInfo | None, Path | None]:
    """The tokenizer every data source was prepared with (they must agree), and its file."""
    if cfg.data_kind == "synthetic":
        return None, None
    infos = {}
    for source in cfg.data_sources:
        infos[source] = load_manifest(Path(cfg.data_dir) / source).tokenizer
    first = next(iter(infos.values()))
    if any(t.identity != first.identity or t.add_bos != first.add_bos for t in infos.values()):
        detail = ", ".join(f"{s}: {t.name} ({t.identity[:19]}..., add_bos={t.add_bos})" for s, t in infos.items())
        raise ShardError(f"--data-sources were prepared with different tokenizers or BOS settings ({detail}); "
                         f"prepare them all the same way")
    file = Path(cfg.data_dir) / cfg.data_sources[0] / TOKENIZER_FILE
    if first.kind == "hf" and not file.is_file():
        raise ShardError(f"{file.parent} was prepared with {first.name} but {file} is missing; prepare it again")
    return first, (file if first.kind == "hf" else None)


def _run_name(cfg: PreTrainingConfig, world_size: int) -> str:
    """--run-name, or rank 0's timestamp shared with every rank."""
    if cfg.run_name:
        return cfg.run_name
    name = [time.strftime("%Y%m%d-%H%M%S")]
    if world_size > 1:
        dist.broadcast_object_list(name, src=0)
    return name[0]


def plan_run(cfg: PreTrainingConfig, engine_cls, env) -> RunPlan:
    """Resolve everything, then freeze the config (all ranks call this)."""
    cfg = engine_cls.resolve_config(cfg, env.world_size, env.device.type)
    tokenizer, tokenizer_file = data_tokenizer(cfg)
    vocab = model_vocab_size(tokenizer.vocab_size) if tokenizer else None
    model_cfg = model_config_for(cfg, vocab)
    recovered: list[str] = []
    if env.is_main and Path(cfg.checkpoint_dir).is_dir():  # finish or undo what a crash interrupted, first
        recovered = recover(Path(cfg.checkpoint_dir))
    if env.world_size > 1:
        dist.barrier()
    resume = resolve_resume(cfg.resume, cfg.checkpoint_dir)
    resume_meta = read_meta(resume) if resume else None
    if resume_meta:
        check_model_matches(resume_meta, model_cfg, resume)
    name = _run_name(cfg, env.world_size)
    if name != cfg.run_name:
        cfg = cfg.replace(run_name=name)
    return RunPlan(cfg.freeze(), model_cfg, tokenizer, tokenizer_file, resume, resume_meta, tuple(recovered))
