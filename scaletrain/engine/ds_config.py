"""DeepSpeed's JSON config against the run's flags, without importing deepspeed.

``"auto"`` values are filled from the run's settings; an explicit value that contradicts a flag the user
set is an error naming both (Hugging Face's DeepSpeed integration behaves the same way); an explicit value
where the user set no flag is adopted into the run's config, once, when the run is resolved, before
anything is built.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from scaletrain.config import ConfigError, PreTrainingConfig
from scaletrain.files import read_text

DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    # reduce and accumulate gradients in fp32 as FSDP2's MixedPrecisionPolicy(reduce_dtype=fp32) does;
    # without these DeepSpeed uses the model dtype (bf16) for both
    "communication_data_type": "fp32",
    "data_types": {"grad_accum_dtype": "fp32"},
    "zero_optimization": {"stage": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
}


def load_ds_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds_config: file {path!r} does not exist (see ds_configs/ for examples)")
    try:
        ds = json.loads(read_text(p, "--ds_config", ConfigError))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config: {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds_config: {path} must hold a JSON object of DeepSpeed settings")
    return ds


def resolve_ds_config(ds: dict[str, Any], cfg: PreTrainingConfig, world_size: int, fp16_supported: bool = True,
                      device_type: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill ``"auto"`` fields from ``cfg`` and check explicit ones. A pure function: returns (the
    resolved DeepSpeed config, the settings adopted from the file where the user gave no flag)."""
    ds = copy.deepcopy(ds)
    src = cfg.ds_config or "the default DeepSpeed config"
    explicit = cfg.explicit
    adopted: dict[str, Any] = {}

    def value(field: str) -> Any:
        return adopted.get(field, getattr(cfg, field))

    def reconcile(container: dict, key: str, field: str, to_ds=lambda v: v, from_ds=lambda v: v) -> None:
        want = to_ds(value(field))
        if key not in container or container[key] == "auto":
            container[key] = want
        elif container[key] != want:
            if field in explicit:
                raise ConfigError(f"{src}: {key}={container[key]!r} contradicts {cfg.flag(field)}="
                                  f"{getattr(cfg, field)!r}; set it to \"auto\" or drop the flag")
            adopted[field] = from_ds(container[key])

    reconcile(ds, "train_micro_batch_size_per_gpu", "micro_batch_size")
    reconcile(ds, "gradient_accumulation_steps", "gradient_accumulation_steps")
    reconcile(ds, "gradient_clipping", "max_grad_norm", float, float)
    global_batch = value("micro_batch_size") * value("gradient_accumulation_steps") * world_size
    if cfg.global_batch_size is not None and global_batch != cfg.global_batch_size:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size}: {src} sets micro-batch "
                          f"{value('micro_batch_size')} x accumulation {value('gradient_accumulation_steps')} x world "
                          f"size {world_size} = {global_batch}; set its batch sizes to \"auto\"")
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = global_batch
    elif ds["train_batch_size"] != global_batch:
        raise ConfigError(f"{src}: train_batch_size={ds['train_batch_size']} but micro batch "
                          f"{value('micro_batch_size')} x accumulation {value('gradient_accumulation_steps')} x "
                          f"{world_size} ranks = {global_batch}; set it to \"auto\"")

    # precision: the file's explicit choice vs --mixed-precision
    bf16, fp16 = ds.setdefault("bf16", {}), ds.setdefault("fp16", {})
    file_prec = None
    if fp16.get("enabled") is True:
        file_prec = "fp16"
    elif bf16.get("enabled") is True:
        file_prec = "bf16"
    elif bf16.get("enabled") is False and fp16.get("enabled") in (False, None):
        file_prec = "fp32"
    if file_prec is not None and file_prec != cfg.mixed_precision:
        if "mixed_precision" in explicit:
            raise ConfigError(f"{src}: enables {file_prec} but --mixed-precision={cfg.mixed_precision}; "
                              f"set bf16.enabled/fp16.enabled to \"auto\" or drop the flag")
        adopted["mixed_precision"] = file_prec
    precision = value("mixed_precision")
    bf16["enabled"] = precision == "bf16"
    fp16["enabled"] = precision == "fp16"
    if precision == "fp16" and not fp16_supported:
        raise ConfigError(f"--mixed-precision fp16 ({src}): DeepSpeed's {device_type} accelerator does not "
                          f"support fp16; use bf16 or fp32")

    opt = ds.setdefault("optimizer", copy.deepcopy(DEFAULT_DS_CONFIG["optimizer"]))
    if not isinstance(opt, dict) or str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"{src}: optimizer type {opt.get('type') if isinstance(opt, dict) else opt!r} is not "
                          f"supported; use AdamW")
    params = opt.setdefault("params", {})
    reconcile(params, "lr", "learning_rate", float, float)
    reconcile(params, "eps", "adam_eps", float, float)
    reconcile(params, "weight_decay", "weight_decay", float, float)
    betas = params.get("betas", "auto")
    if betas == "auto":
        params["betas"] = [value("adam_beta1"), value("adam_beta2")]
    elif list(betas) != [cfg.adam_beta1, cfg.adam_beta2]:
        if {"adam_beta1", "adam_beta2"} & explicit:
            raise ConfigError(f"{src}: optimizer betas={betas} contradict --adam-beta1/--adam-beta2="
                              f"{cfg.adam_beta1}/{cfg.adam_beta2}")
        adopted["adam_beta1"], adopted["adam_beta2"] = float(betas[0]), float(betas[1])
    zero = ds.setdefault("zero_optimization", {"stage": 2})
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if not offload:
        # torch's AdamW (fused on CUDA): nothing to JIT-compile, the same optimizer as the FSDP engine
        params.setdefault("torch_adam", True)
        if device_type == "cuda" and params["torch_adam"]:
            params.setdefault("fused", True)
    if "scheduler" in ds:
        raise ConfigError(f"{src}: has a \"scheduler\" section; scaletrain drives warmup + cosine from "
                          f"--warmup-steps/--learning-rate/--min-learning-rate, so remove it")
    if zero.get("stage") not in (1, 2, 3):
        raise ConfigError(f"{src}: zero_optimization.stage={zero.get('stage')!r}; use 2 or 3 (or 1)")
    ds.setdefault("steps_per_print", 10**9)  # our own logger reports
    ds.setdefault("wall_clock_breakdown", False)
    return ds, adopted
