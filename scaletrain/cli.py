"""Command line -> validated PreTrainingConfig.

Every config field is a flag with the field's name (``save_interval`` -> ``--save-interval``);
``--batch-size`` is kept as an alias of ``--micro-batch-size`` and ``--ds-config`` of
``--ds_config``. ``--config FILE`` (JSON, YAML or TOML) is applied beneath the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from scaletrain.config import ConfigError, PreTrainingConfig
from scaletrain.files import read_text

_FIELDS = {f.name: f for f in dataclasses.fields(PreTrainingConfig)}
_HINTS = typing.get_type_hints(PreTrainingConfig)
# alias (as a config-file key) -> field, e.g. batch_size -> micro_batch_size
_ALIASES = {a.lstrip("-").replace("-", "_"): name for name, f in _FIELDS.items() for a in f.metadata.get("aliases", ())}


def _base_type(hint: Any) -> tuple[type, bool]:
    """(scalar type, is_list) for a field's annotation, unwrapping ``X | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


# model_size: the presets' names, written out (model/presets.py is behind a package that imports torch)
_CHOICES = {"model_size": "tiny,small,base,large,llama3-1b,llama3-3b,llama3-8b", "mixed_precision": "fp16,bf16,fp32",
            "engine": "deepspeed,fsdp", "data_kind": "shards,synthetic", "epoch_limit": "warn,stop"}


def _metavar(name: str, typ: type) -> str:
    """A readable placeholder for --help: N, NUM, PATH, DURATION, NAME or the choices (not MODEL_SIZE)."""
    if name in _CHOICES:
        return "{" + _CHOICES[name] + "}"
    if typ is int:
        return "N"
    if typ is float:
        return "NUM"
    if name.endswith("_dir") or name in ("ds_config", "tokenizer", "resume", "sample_prompts", "model_config",
                                         "init_from"):
        return "PATH"
    if name == "profile_steps":
        return "A:B"
    if name == "max_time":
        return "DURATION"
    return "NAME"


# other tools' names for our flags (DeepSpeed's, Megatron's, Hugging Face Trainer's, nanoGPT's), for "did you mean"
_PEER_FLAGS = {
    "deepspeed_config": "--ds_config", "deepspeed": "--ds_config", "lr": "--learning-rate",
    "min_lr": "--min-learning-rate", "seq_len": "--max-seq-length", "seq_length": "--max-seq-length",
    "block_size": "--max-seq-length", "max_seq_len": "--max-seq-length", "context_length": "--max-seq-length",
    "train_iters": "--max-steps", "max_iters": "--max-steps", "num_steps": "--max-steps", "train_steps": "--max-steps",
    "total_steps": "--max-steps", "lr_warmup_iters": "--warmup-steps", "warmup_iters": "--warmup-steps",
    "warmup": "--warmup-steps", "save": "--checkpoint-dir", "save_dir": "--checkpoint-dir",
    "output_dir": "--checkpoint-dir", "out_dir": "--checkpoint-dir", "load": "--resume",
    "resume_from_checkpoint": "--resume", "clip_grad": "--max-grad-norm", "grad_clip": "--max-grad-norm",
    "gradient_clipping": "--max-grad-norm", "bf16": "--mixed-precision bf16", "fp16": "--mixed-precision fp16",
    "train_batch_size": "--global-batch-size", "per_device_train_batch_size": "--micro-batch-size",
    "model_name_or_path": "--init-from", "recompute_activations": "--gradient-checkpointing",
    "activation_checkpointing": "--gradient-checkpointing", "save_steps": "--save-interval",
    "logging_steps": "--log-interval", "eval_iters": "--eval-steps", "wandb": "--use-wandb",
    "tensorboard": "--use-tensorboard", "gradient_accumulation": "--gradient-accumulation-steps",
}


class FlagParser(argparse.ArgumentParser):
    """An unknown flag gets its likely meaning: the same name with dashes (--max_steps), another tool's name for it
    (--deepspeed_config, --lr, --seq-len), or the nearest of ours; and the error is not buried under 50 lines of
    usage."""

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:"):
            hints = [h for h in map(self._suggest, message.split(":", 1)[1].split()) if h]
            message += "".join(f"\n  {h}" for h in hints)
            self.exit(2, f"{self.prog}: error: {message}\n(--help lists every flag)\n")
        super().error(message)

    def _suggest(self, token: str) -> str | None:
        if not token.startswith("--"):
            return None
        name = token.split("=", 1)[0]
        flags = [f for a in self._actions for f in a.option_strings if f.startswith("--")]
        key = name[2:].replace("-", "_").lower()
        if key == "eval_steps" and "--eval-interval" in flags:  # Hugging Face's: how often; ours: how many batches
            return f"{name}: how often to validate is --eval-interval (--eval-steps: micro-batches per validation)"
        dashed = "--" + key.replace("_", "-")
        if dashed in flags:
            return f"{name}: did you mean {dashed}?"
        if key in _PEER_FLAGS and _PEER_FLAGS[key].split()[0] in flags:
            return f"{name}: here it is {_PEER_FLAGS[key]}"
        import difflib

        near = difflib.get_close_matches(dashed, flags, n=1, cutoff=0.75)
        return f"{name}: did you mean {near[0]}?" if near else None


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        description="Pre-train a Llama-style model with DeepSpeed ZeRO-2/3 or FSDP2.",
        argument_default=argparse.SUPPRESS,  # only flags actually given appear in the namespace
        allow_abbrev=False,  # a prefix such as --data must not silently pick one of --data-dir/--data-kind
    )
    p.add_argument("--config", metavar="FILE", help="JSON/YAML/TOML file of settings, applied beneath the flags")
    p.add_argument("--local_rank", "--local-rank", type=int, metavar="N", help="set by the deepspeed launcher; ignored")
    for name, f in _FIELDS.items():
        typ, is_list = _base_type(_HINTS[name])
        flag = PreTrainingConfig.flag(name)
        flags = [flag, *f.metadata.get("aliases", ())]
        help_ = f.metadata["doc"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if default is not None and "default" not in help_:  # shown once: a doc that explains it is enough
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            help_ += f" (default: {shown})"
        help_ = help_.replace("%", "%%")  # argparse formats help with %
        if typ is bool:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_)
        else:
            p.add_argument(*flags, dest=name, type=typ, nargs="+" if is_list else None, help=help_,
                           metavar=_metavar(name, typ))
    return p


def load_config_file(path: str) -> dict[str, Any]:
    """Read a settings file; keys may use dashes or underscores."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: file {path!r} does not exist")
    text = read_text(file, "--config", ConfigError)
    suffix = file.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"--config: {path!r} must end in .json, .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as e:  # parse errors carry line numbers; keep them
        raise ConfigError(f"--config: cannot parse {path!r}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping of setting -> value")
    out = {}
    for key, value in data.items():
        name = _ALIASES.get(key.replace("-", "_").lstrip("_"), key.replace("-", "_"))
        if name not in _FIELDS:
            import difflib

            near = difflib.get_close_matches(name, sorted(_FIELDS), n=1)
            raise ConfigError(f"--config: {path!r} has unknown setting {key!r}"
                              + (f"; did you mean {near[0]!r}?" if near else " (the settings are the flags' names "
                                                                             "with _ for -, e.g. max_steps)"))
        if value is not None:
            value = _typed(value, name, key, path)
        out[name] = value
    return out


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_LIST_NAMES = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}


def _typed(value: Any, name: str, key: str, path: str) -> Any:
    """``value`` from a settings file, checked against field ``name``'s type; no silent coercion
    (``max_steps: 6.9`` is not 6, ``max_steps: true`` is not 1, ``data_sources: arxiv`` is not five letters)."""
    typ, is_list = _base_type(_HINTS[name])

    def one(v: Any, what: str) -> Any:
        if typ is float and isinstance(v, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(v)
            except ValueError:
                pass
        ok = (isinstance(v, bool) if typ is bool else
              isinstance(v, int) and not isinstance(v, bool) if typ is int else
              isinstance(v, (int, float)) and not isinstance(v, bool) if typ is float else isinstance(v, typ))
        if not ok:
            raise ConfigError(f"--config: {path}: setting {key!r} {what}must be {_TYPE_NAMES[typ]}, "
                              f"got {v!r} ({type(v).__name__})")
        return float(v) if typ is float else v

    if not is_list:
        return one(value, "")
    if not isinstance(value, list):
        raise ConfigError(f"--config: {path}: setting {key!r} must be a list of {_LIST_NAMES[typ]}, got {value!r} "
                          f"({type(value).__name__}); write [{value!r}] for one item")
    return [one(v, f"item {i} ") for i, v in enumerate(value)]


def parse_config(argv: Sequence[str] | None = None) -> PreTrainingConfig:
    """Parse flags (and ``--config``), validate, and record which fields were set explicitly.

    ``config.explicit`` (a set of field names) lets engines tell a user's choice from a
    default, e.g. to fill DeepSpeed ``"auto"`` values or report a contradiction.
    """
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    values: dict[str, Any] = {}
    if "config" in args:
        values.update(load_config_file(args.pop("config")))
    values.update(args)
    return _smoke(PreTrainingConfig(**values).with_explicit(values).with_derived_defaults().validate())


SMOKE = "SCALETRAIN_SMOKE"


def _smoke(cfg: PreTrainingConfig) -> PreTrainingConfig:
    """``SCALETRAIN_SMOKE=1`` shrinks any run to seconds, for checking that a command works end to end (the
    README test uses it): the tiny model, rows of at most 64 tokens, micro-batches of at most 2, at most 4
    steps (a ``--stop-at-step`` at most 2), one validation micro-batch. It says so on stderr."""
    if os.environ.get(SMOKE, "") in ("", "0"):
        return cfg
    small = dict(model_size="tiny", num_layers=None, max_seq_length=min(cfg.max_seq_length, 64),
                 micro_batch_size=min(cfg.micro_batch_size, 2), max_steps=min(cfg.max_steps, 4),
                 eval_steps=1, eval_interval=min(cfg.eval_interval, 2) if cfg.eval_interval else 0,
                 warmup_steps=None if cfg.warmup_steps is None else min(cfg.warmup_steps, 1),
                 stop_at_step=None if cfg.stop_at_step is None else min(cfg.stop_at_step, 2),
                 decay_steps=None if cfg.decay_steps is None else min(cfg.decay_steps, 2),
                 global_batch_size=None, max_tokens=None)  # the micro-batch and steps above instead
    print(f"scaletrain: {SMOKE} is set: shrunk to the tiny model, {small['max_steps']} steps, rows of "
          f"{small['max_seq_length']} tokens", file=sys.stderr)
    return cfg.replace(**small)


def pretrain_main(argv: Sequence[str] | None = None) -> None:
    """``launch/pretrain.py`` and ``scaletrain train``: parse, train, exit (errors: one line, status 1)."""
    from scaletrain.errors import INTERRUPTED, leave, run_entry

    def main() -> None:
        cfg = parse_config(argv)
        from scaletrain.trainer import train

        if train(cfg).interrupted:  # saved by Ctrl-C, but not done
            leave(INTERRUPTED)

    run_entry(main, hard_exit=True)
