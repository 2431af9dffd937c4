"""Engine registry: back ends are imported lazily so an FSDP run never imports deepspeed."""

from __future__ import annotations

import importlib

from scaletrain.config import ConfigError

from .base import Engine, StepOutput
from .dist import DistEnv

_REGISTRY = {
    "deepspeed": "scaletrain.engine.deepspeed:DeepSpeedEngine",
    "fsdp": "scaletrain.engine.fsdp:FSDPEngine",
}


def get_engine_class(name: str) -> type[Engine]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown engine {name!r}; valid engines: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["DistEnv", "Engine", "StepOutput", "get_engine_class"]
