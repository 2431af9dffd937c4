"""Checks of a run's settings (``PreTrainingConfig.validate``): each bad value is a ConfigError naming its flag, what
it got and what is valid. No torch import here, as in config.py."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from scaletrain.lr import DECAY_SHAPES, SCHEDULES

if TYPE_CHECKING:
    from scaletrain.config import PreTrainingConfig


def check(c: PreTrainingConfig) -> None:
    """Raise ConfigError naming the flag for the first invalid value."""
    from scaletrain.config import DATA_KINDS, ENGINES, PRECISIONS, ConfigError, parse_duration, parse_steps
    from scaletrain.model.presets import PRESETS

    def bad(name: str, msg: str) -> ConfigError:
        flag = c.flag(name)
        others = [a for a in c.__dataclass_fields__[name].metadata.get("aliases", ())
                  if a.replace("_", "-") != flag.replace("_", "-")]  # --batch-size, not --ds-config
        return ConfigError(f"{'/'.join([flag, *others])}: {msg}")

    if c.model_size not in PRESETS:
        raise bad("model_size", f"unknown preset {c.model_size!r}; valid: {', '.join(PRESETS)}")
    if c.model_config and "model_size" in c.explicit:
        raise bad("model_config", f"gives the model's shape, as does --model-size {c.model_size}; drop one")
    if c.init_from and "model_size" in c.explicit:
        raise bad("init_from", f"the model's shape comes from these weights; drop --model-size {c.model_size} "
                               f"(or give --model-config to check the shape against)")
    if c.max_steps < 0:
        raise bad("max_steps", f"must be >= 0, got {c.max_steps}")
    if c.global_batch_size is not None:
        if c.global_batch_size <= 0:
            raise bad("global_batch_size", f"must be a positive integer, got {c.global_batch_size}")
        if "gradient_accumulation_steps" in c.explicit:
            raise bad("global_batch_size", f"derives --gradient-accumulation-steps (global / (micro-batch x "
                                           f"world size)); drop --gradient-accumulation-steps "
                                           f"{c.gradient_accumulation_steps}")
        if c.global_batch_size % c.micro_batch_size:
            raise bad("global_batch_size", f"{c.global_batch_size} is not a multiple of --micro-batch-size "
                                           f"{c.micro_batch_size}")
    if c.max_tokens is not None:
        if c.max_tokens <= 0:
            raise bad("max_tokens", f"must be a positive integer, got {c.max_tokens}")
        if c.global_batch_size is None:
            raise bad("max_tokens", "needs --global-batch-size (the rows of a step, whatever the world size) to "
                                    "turn tokens into steps")
        if "max_steps" in c.explicit:
            raise bad("max_tokens", f"sets the run's length, as does --max-steps {c.max_steps}; drop one")
        if not c.packing:
            raise bad("max_tokens", "counts full rows of --max-seq-length tokens, and --no-packing pads each "
                                    "document to a row: the steps would train a fraction of those tokens; give "
                                    "--max-steps")
    for name in ("max_seq_length", "micro_batch_size", "gradient_accumulation_steps",
                 "log_interval", "max_nonfinite_steps", "eval_steps"):
        if getattr(c, name) <= 0:
            raise bad(name, f"must be a positive integer, got {getattr(c, name)}")
    if c.warmup_steps is not None and c.warmup_steps < 0:
        raise bad("warmup_steps", f"must be >= 0, got {c.warmup_steps}")
    for name in ("save_interval", "keep_last_n_checkpoints", "num_workers", "eval_interval"):
        if getattr(c, name) < 0:
            raise bad(name, f"must be >= 0, got {getattr(c, name)}")
    if c.max_time is not None:
        try:
            seconds = parse_duration(c.max_time)
        except ValueError as e:
            raise bad("max_time", str(e)) from None
        if seconds <= 0:
            raise bad("max_time", f"must be above zero, got {c.max_time!r}")
    if c.stop_at_step is not None and not 0 < c.stop_at_step <= c.max_steps:
        raise bad("stop_at_step", f"must be between 1 and --max-steps={c.max_steps}, got {c.stop_at_step}")
    if c.num_layers is not None and c.num_layers <= 0:
        raise bad("num_layers", f"must be a positive integer, got {c.num_layers}")
    if not (c.learning_rate > 0 and math.isfinite(c.learning_rate)):
        raise bad("learning_rate", f"must be a positive number, got {c.learning_rate}")
    if not 0 <= c.min_learning_rate <= c.learning_rate:
        raise bad("min_learning_rate", f"must be between 0 and --learning-rate={c.learning_rate}, "
                                       f"got {c.min_learning_rate}")
    if c.warmup_steps is not None and c.warmup_steps > c.max_steps:
        raise bad("warmup_steps", f"{c.warmup_steps} exceeds --max-steps={c.max_steps}")
    if c.lr_schedule not in SCHEDULES:
        raise bad("lr_schedule", f"unknown schedule {c.lr_schedule!r}; valid: {', '.join(SCHEDULES)}")
    if c.decay_shape not in DECAY_SHAPES:
        raise bad("decay_shape", f"unknown shape {c.decay_shape!r}; valid: {', '.join(DECAY_SHAPES)}")
    if not 0 < c.decay_fraction <= 1:
        raise bad("decay_fraction", f"must be in (0, 1], got {c.decay_fraction}")
    if c.decay_steps is not None and not 0 < c.decay_steps <= c.max_steps - c.warmup:
        raise bad("decay_steps", f"must be between 1 and --max-steps minus warmup ({c.max_steps} - "
                                 f"{c.warmup}), got {c.decay_steps}")
    for name in ("decay_fraction", "decay_steps", "decay_shape"):
        if name in c.explicit and c.lr_schedule != "wsd":
            raise bad(name, f"shapes the decay of --lr-schedule wsd; this run's schedule is {c.lr_schedule}")
    if c.spike_sigma < 0 or not math.isfinite(c.spike_sigma):
        raise bad("spike_sigma", f"must be >= 0 (0: off), got {c.spike_sigma}")
    if c.spike_window < 2:
        raise bad("spike_window", f"must be at least 2 steps, got {c.spike_window}")
    if c.max_spike_steps <= 0:
        raise bad("max_spike_steps", f"must be a positive integer, got {c.max_spike_steps}")
    if c.z_loss < 0 or not math.isfinite(c.z_loss):
        raise bad("z_loss", f"must be >= 0 (0: off), got {c.z_loss}")
    if not 0 <= c.max_grad_norm < math.inf:  # nan turned clipping off without a word
        raise bad("max_grad_norm", f"must be >= 0 (0 disables clipping), got {c.max_grad_norm}")
    if not c.weight_decay >= 0 or not math.isfinite(c.weight_decay):  # a negative one grows the weights
        raise bad("weight_decay", f"must be >= 0 (0: none), got {c.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise bad(name, f"must be in [0, 1), got {getattr(c, name)}")
    if not c.adam_eps > 0 or not math.isfinite(c.adam_eps):
        raise bad("adam_eps", f"must be positive, got {c.adam_eps}")
    if c.run_name is not None:  # a folder's name under --run-dir, and how --resume latest finds the run
        name = c.run_name
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
            raise bad("run_name", f"{name!r} is not a folder name: the run's folder is --run-dir/NAME, so a "
                                  f"name with / or .. lands elsewhere (to group runs: --run-dir runs/GROUP "
                                  f"--run-name NAME)")
        if name != name.strip():
            raise bad("run_name", f"{name!r} begins or ends with a space; give {name.strip()!r}")
        if not name.isprintable():
            raise bad("run_name", f"{name!r} holds characters that do not print (a tab, a newline); give a "
                                  f"plain name")
    if c.mixed_precision not in PRECISIONS:
        raise bad("mixed_precision", f"got {c.mixed_precision!r}; valid: {', '.join(PRECISIONS)}")
    if c.engine is not None and c.engine not in ENGINES:
        raise bad("engine", f"unknown engine {c.engine!r}; valid: {', '.join(ENGINES)}")
    if c.engine == "fsdp" and c.ds_config:
        raise bad("ds_config", "is a DeepSpeed setting but --engine fsdp was given; drop one of them")
    if c.resolved_engine == "fsdp" and c.mixed_precision == "fp16":
        raise bad("mixed_precision", "fp16 needs loss scaling, which the fsdp engine does not do; "
                                     "use bf16 (or fp32), or --engine deepspeed with ds_configs/zero2_fp16.json")
    if c.async_checkpoint and c.resolved_engine != "fsdp":
        raise bad("async_checkpoint", "needs --engine fsdp (DeepSpeed writes its checkpoints synchronously)")
    if c.data_kind not in DATA_KINDS:
        raise bad("data_kind", f"unknown data kind {c.data_kind!r}; valid: {', '.join(DATA_KINDS)}")
    if c.restart_positions and not c.document_masking:
        raise bad("restart_positions", "needs --document-masking (positions restart where a document starts)")
    if c.document_masking and c.data_kind == "synthetic":
        raise bad("document_masking", "needs prepared data (documents end with the tokenizer's EOS); "
                                      "synthetic tokens have no documents")
    if c.epoch_limit not in ("warn", "stop"):
        raise bad("epoch_limit", f"{c.epoch_limit!r}: choose warn or stop")
    if not c.max_epochs_per_domain > 0:
        raise bad("max_epochs_per_domain", f"must be positive, got {c.max_epochs_per_domain}")
    if len(c.data_mix_weights) != len(c.data_sources):
        raise bad("data_mix_weights", f"{len(c.data_mix_weights)} weights for {len(c.data_sources)} "
                                      f"--data-sources {c.data_sources}; give one weight per source")
    if any(w < 0 or not math.isfinite(w) for w in c.data_mix_weights):
        raise bad("data_mix_weights", f"weights must be finite and >= 0, got {c.data_mix_weights}")
    if sum(c.data_mix_weights) <= 0:
        raise bad("data_mix_weights", f"weights sum to zero: {c.data_mix_weights}")
    if c.profile_steps is not None:
        try:
            first, last = parse_steps(c.profile_steps)
        except ValueError:
            raise bad("profile_steps", f"{c.profile_steps!r}: give A:B, the first and last optimizer step "
                                       f"to trace, 1 <= A <= B (e.g. 5:7)") from None
        if first > c.max_steps:
            raise bad("profile_steps", f"starts at step {first}, after --max-steps {c.max_steps}")
    if c.profile_rank0_only and not c.profile_steps:
        raise bad("profile_rank0_only", "needs --profile-steps A:B")
    if c.memory_snapshot_step is not None and (not c.memory_snapshot or c.memory_snapshot_step <= 0):
        raise bad("memory_snapshot_step", "needs --memory-snapshot and a step >= 1")
    if c.sample_tokens < 0:
        raise bad("sample_tokens", f"must be >= 0 (0: no samples), got {c.sample_tokens}")
    if not 0 <= c.sample_top_p <= 1:
        raise bad("sample_top_p", f"must be in [0, 1] (0: greedy only), got {c.sample_top_p}")
    if c.peak_tflops is not None and not 0 < c.peak_tflops < math.inf:  # nan, inf: an MFU of nan or 0
        raise bad("peak_tflops", f"must be a positive number, got {c.peak_tflops}")
