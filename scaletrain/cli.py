"""Command line -> validated PreTrainingConfig.

Every config field is a flag (``save_interval`` -> ``--save-interval``; a few carry the
original design's names: ``--model-size``, ``--batch-size``, ``--ds_config``).
``--config FILE`` (JSON, YAML or TOML) is applied beneath the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from scaletrain.config import ConfigError, PreTrainingConfig

_FIELDS = {f.name: f for f in dataclasses.fields(PreTrainingConfig)}
_HINTS = typing.get_type_hints(PreTrainingConfig)


def _base_type(hint: Any) -> tuple[type, bool]:
    """(scalar type, is_list) for a field's annotation, unwrapping ``X | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pre-train a Llama-style model with DeepSpeed ZeRO-2/3 or FSDP2.",
        argument_default=argparse.SUPPRESS,  # only flags actually given appear in the namespace
    )
    p.add_argument("--config", help="JSON/YAML/TOML file of settings, applied beneath the flags")
    p.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher; ignored")
    for name, f in _FIELDS.items():
        typ, is_list = _base_type(_HINTS[name])
        flag = PreTrainingConfig.flag(name)
        flags = [flag]
        if "_" in flag:  # --ds_config is also --ds-config
            flags.append(flag.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{f.metadata['doc']} (default: {default})"
        if typ is bool:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_)
        elif is_list:
            p.add_argument(*flags, dest=name, type=typ, nargs="+", help=help_)
        else:
            p.add_argument(*flags, dest=name, type=typ, help=help_)
    return p


def load_config_file(path: str) -> dict[str, Any]:
    """Read a settings file; keys may use dashes or underscores."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: file {path!r} does not exist")
    text = file.read_text()
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
        name = key.replace("-", "_")
        if name == "model_size":
            name = "model_config_name"
        elif name == "batch_size":
            name = "micro_batch_size"
        if name not in _FIELDS:
            raise ConfigError(f"--config: {path!r} has unknown setting {key!r}")
        typ, is_list = _base_type(_HINTS[name])
        if value is not None:
            try:
                value = [typ(v) for v in value] if is_list else (value if typ is bool else typ(value))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"--config: {path!r} setting {key!r}={value!r}: {e}") from e
            if typ is bool and not isinstance(value, bool):
                raise ConfigError(f"--config: {path!r} setting {key!r} must be true or false, got {value!r}")
        out[name] = value
    return out


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
    cfg = PreTrainingConfig(**values)
    cfg.explicit = set(values)  # type: ignore[attr-defined]
    return cfg.validate()


def pretrain_main(argv: Sequence[str] | None = None) -> None:
    """``launch/pretrain.py`` and ``scaletrain train``: parse, train, exit."""
    import os
    import sys

    from scaletrain.checkpoint import CheckpointError
    from scaletrain.data.shards import ShardError
    from scaletrain.trainer import train

    try:
        train(parse_config(argv))
    except (ConfigError, CheckpointError, ShardError) as e:  # user-facing: a message, not a traceback
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        os._exit(1)
    # Everything is written and the process group destroyed. Skip interpreter teardown:
    # gloo worker threads can still hold tensors then, and freeing them during finalisation
    # aborts the process now and then ("terminate called without an active exception",
    # seen here about 1 run in 8 under load; pytorch/pytorch#179291 describes it).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
