"""Every setting of a pre-training run, typed, documented and validated once.

No torch import here: the CLI parses and validates before any heavy import.
Precedence (torchtitan job_config / litgpt style): defaults < ``--config FILE`` < flags.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from scaletrain.errors import ScaletrainError

PRECISIONS = ("fp16", "bf16", "fp32")
ENGINES = ("deepspeed", "fsdp")
DATA_KINDS = ("shards", "synthetic")


class ConfigError(ScaletrainError):
    """A user mistake in flags or config files; the message names the flag and what is valid."""


def parse_steps(text: str) -> tuple[int, int]:
    """--profile-steps 'A:B' (or 'A') -> (A, B); ValueError unless 1 <= A <= B."""
    a, _, b = text.partition(":")
    first, last = int(a), int(b or a)
    if not 1 <= first <= last:
        raise ValueError(text)
    return first, last


_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_SLURM = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: units (``3h30m``, ``45m``, ``90s``, ``1.5h``, ``2d``) or Slurm's ``--time`` forms
    (``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``), so that a job's limit can be pasted. A bare
    number is refused: Slurm reads it as minutes, most tools as seconds. ValueError names what would be right."""
    t = str(text).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", t)
    if parts and "".join(n + u for n, u in parts) == t:
        return sum(float(n) * _UNITS[u] for n, u in parts)
    m = _SLURM.fullmatch(t)
    if m and (m.group(1) or m.group(3)):
        days, a, b, c = (int(g) if g else None for g in m.groups())
        if days is not None:  # D-HH[:MM[:SS]]
            return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        if c is not None:  # HH:MM:SS
            return a * 3600 + b * 60 + c
        return a * 60 + b  # MM:SS
    why = (" (a bare number: Slurm reads it as minutes, most tools as seconds; say which)"
           if re.fullmatch(r"\d+(\.\d+)?", t) else "")
    raise ValueError(f"{text!r} is not a duration{why}: give units (90m, 3h30m, 45s, 1.5h) or Slurm's --time form "
                     f"(HH:MM:SS, MM:SS, D-HH:MM)")


def _f(default: Any, doc: str, aliases: tuple[str, ...] = (), flag: str | None = None, **kw: Any) -> Any:
    meta: dict[str, Any] = {"doc": doc, "aliases": aliases}
    if flag:  # only --ds_config, spelled as DeepSpeed's own launcher examples spell it
        meta["flag"] = flag
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class PreTrainingConfig:
    # model
    model_size: str = _f("tiny", "model preset: tiny, small, base, large, llama3-1b, llama3-3b, llama3-8b")
    model_config: str | None = _f(None, "the model's shape from a file instead of a preset: our fields (JSON, YAML "
                                        "or TOML) or a Hugging Face config.json (Llama, Mistral, Qwen2)")
    init_from: str | None = _f(None, "start from these weights (optimizer, schedule and data position start "
                                     "fresh): a Hugging Face model folder (config.json + *.safetensors) or a "
                                     "scaletrain checkpoint of any engine and world size; the shape comes from it")
    num_layers: int | None = _f(None, "override the preset's layer count (benchmarks on one GPU)")
    max_seq_length: int = _f(256, "tokens per training row")
    # data
    data_kind: str = _f("shards", "shards (prepared WebDataset shards under --data-dir) or synthetic (a "
                                  "deterministic, learnable token stream for tests and benchmarks)")
    data_dir: str = _f("data/pretraining", "folder with one sub-folder of shards per domain")
    data_sources: list[str] = _f(["arxiv", "general"], "domains to mix (sub-folders of data_dir)")
    data_mix_weights: list[float] = _f([0.3, 0.7], "token share of each domain, one per data source (trained "
                                                    "target tokens, with or without packing)")
    allow_data_change: bool = _f(False, "resume although a domain's shards differ from those the checkpoint was "
                                        "reading (prepared again, changed): that domain is read from its start")
    max_epochs_per_domain: float = _f(1.0, "epochs of any one domain a run may read before --epoch-limit acts (its "
                                           "documents start to repeat past 1)")
    epoch_limit: str = _f("warn", "what passing --max-epochs-per-domain does: warn (once per domain) or stop (save "
                                  "a checkpoint and stop)")
    packing: bool = _f(True, "pack documents into full rows; --no-packing: one document per row, padded (the loss "
                             "and tokens/s count real tokens only)")
    document_masking: bool = _f(False, "attention in packed rows stays within each document (the tokenizer's EOS "
                                       "ends one): FlexAttention on CUDA, an exact masked SDPA elsewhere")
    restart_positions: bool = _f(False, "with --document-masking: RoPE positions restart at 0 at each document")
    tokenizer: str | None = _f(None, "tokenizer.json the shards were prepared with (checked against the manifests)")
    num_workers: int = _f(0, "DataLoader worker processes per rank")
    pin_memory: bool = _f(True, "pin host batches (only where CUDA exists)")
    # batch and schedule
    micro_batch_size: int = _f(8, "rows per device per micro-step", aliases=("--batch-size",))
    gradient_accumulation_steps: int = _f(1, "micro-steps per optimizer step")
    global_batch_size: int | None = _f(None, "rows per optimizer step over all ranks: --gradient-accumulation-steps "
                                             "becomes this / (--micro-batch-size x world size), so a run resumed on "
                                             "another world size keeps its batch, data stream and schedule")
    max_steps: int = _f(100, "optimizer steps to train (0: build and initialise the model, or load --init-from, "
                             "save it as the final checkpoint and stop)")
    max_tokens: int | None = _f(None, "train this many tokens instead of giving --max-steps (needs "
                                      "--global-batch-size): steps = ceil(tokens / (global batch x --max-seq-length))")
    warmup_steps: int | None = _f(None, "linear warmup steps before cosine decay (default: 1% of --max-steps, at "
                                        "least 1, at most 2000)")
    learning_rate: float = _f(3e-4, "peak learning rate")
    min_learning_rate: float = _f(3e-5, "learning rate at the end of the decay (default: 10% of --learning-rate)")
    lr_schedule: str = _f("cosine", "after warmup: cosine or linear decay to --min-learning-rate at --max-steps, "
                                    "constant, or wsd (stable at the peak, then decay over the run's last "
                                    "--decay-fraction)")
    decay_fraction: float = _f(0.2, "wsd: the share of --max-steps the final decay takes")
    decay_steps: int | None = _f(None, "wsd: decay over exactly this many final steps instead of --decay-fraction "
                                       "(annealing a stable-phase checkpoint: --max-steps S+N --decay-steps N)")
    decay_shape: str = _f("linear", "wsd: the decay's shape, linear, cosine or 1-sqrt")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only; norms and embeddings get none)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this; 0 disables clipping")
    max_nonfinite_steps: int = _f(5, "stop after this many optimizer steps in a row with NaN/inf loss")
    spike_sigma: float = _f(0.0, "skip an optimizer step whose loss or gradient norm is more than this many standard "
                                 "deviations above the mean of the last --spike-window steps (0: off; OLMo-core "
                                 "uses 6)")
    spike_window: int = _f(128, "steps in the window --spike-sigma compares with (judging starts after 20)")
    max_spike_steps: int = _f(10, "stop after this many optimizer steps in a row skipped as spikes")
    z_loss: float = _f(0.0, "weight of the z-loss, mean of log(sum(exp(logits)))^2 per target token (PaLM uses "
                            "1e-4; 0: off); logged as z_loss, not part of loss")
    # precision, memory, speed
    mixed_precision: str = _f("bf16", "fp16, bf16 or fp32 (default: bf16 where the device computes it natively, a "
                                      "GPU from Ampere on or a CPU with AVX512-BF16/AMX; fp32 elsewhere, where bf16 "
                                      "is emulated several times slower)")
    gradient_checkpointing: bool = _f(False, "recompute each transformer block in backward")
    compile: bool = _f(False, "torch.compile each transformer block")
    # engine
    engine: str | None = _f(None, "deepspeed or fsdp (default: deepspeed when --ds_config is given, else fsdp)")
    ds_config: str | None = _f(None, "DeepSpeed JSON config; 'auto' fields are filled from these settings",
                                flag="--ds_config", aliases=("--ds-config",))
    fsdp_reshard_after_forward: bool = _f(True, "FSDP2: free gathered parameters after forward (ZeRO-3 style)")
    fsdp_cpu_offload: bool = _f(False, "FSDP2: keep parameters, gradients and optimizer state on the CPU")
    # checkpoints
    checkpoint_dir: str | None = _f(None, "where the checkpoint folders (step_NNNNNN, final, best) go (default: "
                                           "the run's folder, run_dir/run_name/checkpoints)")
    save_interval: int = _f(1000, "save a step_N checkpoint every N steps (0: none), so that a crash loses at most "
                                  "N steps (with 0 and no validation split, a run had no checkpoint until final); "
                                  "every run that completes writes final")
    save_best: bool = _f(True, "keep a 'best' checkpoint of the lowest validation loss; each improvement writes "
                               "a full checkpoint (12-14 bytes per parameter: ~90 GB for 7B), --no-save-best "
                               "skips that")
    keep_last_n_checkpoints: int = _f(3, "keep this many step checkpoints (0: keep all)")
    async_checkpoint: bool = _f(False, "fsdp: write checkpoints in the background (dcp.async_save); each one is "
                                       "committed at the next save or the end of the run")
    stop_at_step: int | None = _f(None, "save a checkpoint and stop after this step, keeping the schedule of "
                                        "--max-steps (fits a run into job time limits)")
    max_time: str | None = _f(None, "save a checkpoint and stop before this much time has passed since the process "
                                    "(under torchrun: torchrun) started (3h50m, 45m, or Slurm's 23:30:00, "
                                    "1-00:00:00): before each step, when the longest step and save so far would not "
                                    "end in time (Megatron's --exit-duration-in-mins); exits 0, resume with --resume "
                                    "latest")
    resume: str | None = _f(None, "resume: a checkpoint folder, a checkpoint_dir or a run's folder (runs/NAME), "
                                  "'latest' (required) or 'auto' (the newest complete one if any, else start fresh)")
    trust_checkpoint: bool = _f(False, "load checkpoint files that name code to run while unpickling (refused by "
                                       "default); only for checkpoints from a source you trust")
    verify_checkpoint: bool = _f(True, "check every file of the checkpoint resumed from against the sizes and "
                                       "checksums recorded at save (--no-verify-checkpoint skips it)")
    overwrite_checkpoints: bool = _f(False, "start afresh although the checkpoint folder already holds complete "
                                            "checkpoints (an earlier run of this name, or another run's): they are "
                                            "deleted first (without it such a start is refused, naming the run "
                                            "and how to resume it)")
    force_lock: bool = _f(False, "take the checkpoint folder's lock even when another run seems to hold it (only "
                                 "when you know that run is dead)")
    # evaluation and logging
    eval_interval: int = _f(100, "validation loss every N steps when a validation set exists (0: never)")
    eval_steps: int = _f(10, "global batches of held-out rows in each validation pass, shared by the domains (the "
                             "same rows on any number of ranks)")
    log_interval: int = _f(10, "log metrics every N steps")
    run_dir: str = _f("runs", "each run's folder is run_dir/run_name: its config, metrics.jsonl, TensorBoard "
                              "events, W&B files and (unless --checkpoint-dir) checkpoints/")
    run_name: str | None = _f(None, "name of this run, and of its folder (default: the run of the checkpoint given to "
                                    "--resume, else a timestamp); resuming a run: --run-name NAME --resume latest")
    use_tensorboard: bool = _f(True, "write TensorBoard events")
    use_wandb: bool = _f(False, "log to Weights & Biases (honours WANDB_MODE=offline)")
    wandb_project: str = _f("scaletrain", "Weights & Biases project")
    wandb_run_name: str | None = _f(None, "Weights & Biases run name (default: run_name)")
    profile_steps: str | None = _f(None, "write a torch.profiler trace of optimizer steps A:B (e.g. 5:7) to "
                                         "run_dir/run_name/profile/ (Perfetto, chrome://tracing, TensorBoard)")
    profile_rank0_only: bool = _f(False, "with --profile-steps: trace rank 0 only (default: every rank)")
    memory_snapshot: bool = _f(False, "CUDA: record the allocator's history and dump a snapshot into the run folder "
                                      "on out-of-memory (and after --memory-snapshot-step); pytorch.org/memory_viz")
    memory_snapshot_step: int | None = _f(None, "with --memory-snapshot: also dump one after this step")
    sample_tokens: int = _f(32, "at each evaluation, continue each sample prompt by this many tokens (greedy) and "
                                "log the text (0: no samples)")
    sample_prompts: str | None = _f(None, "prompts for the samples: JSON {domain: [prompt, ...]} or a text file, "
                                          "one prompt a line (default: two built-in prompts per domain)")
    sample_top_p: float = _f(0.0, "also sample each prompt with this top-p (nucleus) at temperature 1, seeded "
                                  "(0: greedy only)")
    peak_tflops: float | None = _f(None, "device peak TFLOP/s for MFU (default: detected from the GPU name)")
    seed: int = _f(42, "seed for weights and data order (a resumed run keeps its checkpoint's data order)")

    # ---- helpers -------------------------------------------------------------------------
    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag that sets field ``name`` (the field's name with dashes)."""
        f = {x.name: x for x in dataclasses.fields(PreTrainingConfig)}[name]
        return f.metadata.get("flag", "--" + name.replace("_", "-"))

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"the run's config is frozen once resolved; cannot set {name}")
        object.__setattr__(self, name, value)

    @property
    def explicit(self) -> frozenset[str]:
        """Fields the user set (a flag or the --config file), as opposed to defaults."""
        return getattr(self, "_explicit", frozenset())

    def with_explicit(self, names) -> PreTrainingConfig:
        object.__setattr__(self, "_explicit", frozenset(names))
        return self

    def replace(self, **changes: Any) -> PreTrainingConfig:
        """A new, unfrozen config with ``changes`` (validated); remembers which fields were explicit."""
        return dataclasses.replace(self, **changes).with_explicit(self.explicit).validate()

    def freeze(self) -> PreTrainingConfig:
        """Nothing may change this config afterwards (resolve first, then freeze)."""
        object.__setattr__(self, "_frozen", True)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def warmup(self) -> int:
        """--warmup-steps, or 1% of --max-steps (at least 1, at most 2000) when not given."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(self.max_steps, max(1, min(2000, round(0.01 * self.max_steps))))

    @property
    def steps_for_tokens(self) -> int | None:
        """--max-tokens as optimizer steps (each step trains global batch x max_seq_length target tokens)."""
        if self.max_tokens is None or self.global_batch_size is None:
            return None
        return -(-self.max_tokens // (self.global_batch_size * self.max_seq_length))

    def with_derived_defaults(self) -> PreTrainingConfig:
        """This config with the defaults that follow from given flags (before validation; the explicit set
        unchanged): --max-steps from --max-tokens, the end learning rate from a given peak (10% of it: a lone
        --learning-rate 1e-5 was refused, the default end 3e-5 above it), and the weights of given --data-sources
        (one source: all of it; the default 0.3 0.7 belongs to the default arxiv general, and other sources without
        weights are refused: a lone --data-sources mine was refused as "2 weights for 1", weights never given)."""
        if "data_sources" in self.explicit and "data_mix_weights" not in self.explicit:
            default = self.__dataclass_fields__["data_sources"].default_factory()
            if len(self.data_sources) == 1:
                object.__setattr__(self, "data_mix_weights", [1.0])
            elif self.data_sources != default:
                raise ConfigError(f"--data-mix-weights: not given for --data-sources {' '.join(self.data_sources)}; "
                                  f"give each source's token share (equal shares: --data-mix-weights "
                                  f"{' '.join('1' * len(self.data_sources))}); the default "
                                  f"{' '.join(f'{w:g}' for w in self.data_mix_weights)} is for {' '.join(default)}")
        if "learning_rate" in self.explicit and "min_learning_rate" not in self.explicit:
            # rounded: 3e-4 (what the user would write), not 3.0000000000000003e-4
            object.__setattr__(self, "min_learning_rate", float(f"{self.learning_rate / 10:.12g}"))
        steps = self.steps_for_tokens
        if steps is not None and "max_steps" not in self.explicit:
            object.__setattr__(self, "max_steps", steps)
        return self

    def for_world_size(self, world_size: int) -> PreTrainingConfig:
        """With --global-batch-size: this config with the accumulation that gives it on ``world_size`` ranks (a
        ConfigError naming all three when it does not divide)."""
        if self.global_batch_size is None:
            return self
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not a multiple of --micro-batch-size "
                              f"{self.micro_batch_size} x world size {world_size} = {per_step}; give a global batch "
                              f"that is, or another micro-batch size")
        accumulation = self.global_batch_size // per_step
        return self if accumulation == self.gradient_accumulation_steps else \
            self.replace(gradient_accumulation_steps=accumulation)

    @property
    def decay_length(self) -> int:
        """wsd: the decay's steps, --decay-steps or --decay-fraction of --max-steps."""
        if self.decay_steps is not None:
            return self.decay_steps
        return round(self.decay_fraction * self.max_steps)

    @property
    def resolved_engine(self) -> str:
        return self.engine or ("deepspeed" if self.ds_config else "fsdp")

    def validate(self) -> PreTrainingConfig:
        """Raise ConfigError naming the flag for the first invalid value (``config_checks.py``); returns self."""
        from scaletrain.config_checks import check

        check(self)
        return self
