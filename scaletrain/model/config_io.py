"""Model shapes from files: our own fields (JSON, YAML or TOML) or a Hugging Face ``config.json``, and back.

``load_model_config(path)`` reads either kind (a Hugging Face config is told apart by its ``model_type``).
A Hugging Face config the model cannot honour is refused naming the field and value: another
``model_type``, ``hidden_act`` other than SiLU, ``mlp_bias``, a ``head_dim`` other than hidden/heads, a
``rope_type`` other than default/linear/llama3, or sliding-window attention narrower than the training
length (``check_training_length``, once the length is known). ``to_hf_config`` writes the config
transformers loads for our shape (Llama, or Qwen2 when only q/k/v carry biases).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from scaletrain.errors import ScaletrainError
from scaletrain.files import read_text

from .presets import ROPE_SCALINGS, ModelConfig

HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ModelConfigError(ScaletrainError):
    """A model config file the model cannot honour; the message names the file, field and value."""


def read_config_file(path: Path, flag: str = "--model-config") -> dict[str, Any]:
    """A model config file as a mapping; errors (missing, unparsable, not a mapping) start with ``flag PATH``."""
    if not path.is_file():
        raise ModelConfigError(f"{flag}: {path} does not exist")
    text = read_text(path, flag, ModelConfigError)
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - every parser's own error, reported with the file
        raise ModelConfigError(f"{flag}: {path} could not be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{flag}: {path} must hold a mapping of model fields")
    return data


def load_model_config(path: str | Path) -> ModelConfig:
    """Our fields or a Hugging Face config.json (a folder means its config.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    data = read_config_file(p)
    if "model_type" in data or "hidden_size" in data:
        return from_hf_config(data, str(p))
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ModelConfigError(f"{p}: unknown field(s) {unknown}; model fields are {sorted(fields)} (or give a "
                               f"Hugging Face config.json)")
    missing = [f.name for f in dataclasses.fields(ModelConfig)
               if f.default is dataclasses.MISSING and f.name not in data]
    if missing:
        raise ModelConfigError(f"{p}: missing field(s) {missing}")
    return _validated(ModelConfig(**data), str(p))


def _validated(mc: ModelConfig, source: str) -> ModelConfig:
    try:
        mc.validate()
    except ValueError as e:
        raise ModelConfigError(f"{source}: {e}") from None
    return mc


def _rope(data: dict[str, Any], source: str) -> dict[str, Any]:
    """rope_theta and scaling from ``rope_parameters`` (transformers >= 5) or ``rope_theta``/``rope_scaling``."""
    params = dict(data.get("rope_parameters") or {})
    legacy = data.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise ModelConfigError(f"{source}: rope_parameters/rope_scaling must be a mapping")
    params = {**legacy, **params}
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    kind = None if kind in (None, "default") else kind
    if kind not in ROPE_SCALINGS:
        raise ModelConfigError(f"{source}: rope_scaling type {kind!r} is not supported (supported: default, linear, "
                               f"llama3)")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": kind}
    if kind:
        out["rope_factor"] = float(params.get("factor", 1.0))
    if kind == "llama3":
        for ours, theirs in (("rope_low_freq_factor", "low_freq_factor"), ("rope_high_freq_factor", "high_freq_factor"),
                             ("rope_original_max_positions", "original_max_position_embeddings")):
            if theirs not in params:
                raise ModelConfigError(f"{source}: rope_scaling llama3 needs {theirs}")
            out[ours] = params[theirs]
        out["rope_original_max_positions"] = int(out["rope_original_max_positions"])
    if params.get("attention_factor") not in (None, 1.0):
        raise ModelConfigError(f"{source}: rope attention_factor={params['attention_factor']} is not supported")
    return out


def from_hf_config(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A Hugging Face Llama / Mistral / Qwen2 config -> ModelConfig, refusing what the model cannot honour."""
    kind = data.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise ModelConfigError(f"{source}: model_type {kind!r} is not supported; supported: "
                               f"{', '.join(HF_MODEL_TYPES)}")
    if data.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{source}: hidden_act {data['hidden_act']!r} is not supported (the model's MLP is "
                               f"SwiGLU: silu)")
    if data.get("mlp_bias"):
        raise ModelConfigError(f"{source}: mlp_bias true is not supported")
    if data.get("pretraining_tp", 1) not in (1, None):
        raise ModelConfigError(f"{source}: pretraining_tp {data['pretraining_tp']} is not supported (use 1)")

    def field(name: str, cast: type, default: Any = dataclasses.MISSING) -> Any:
        if name not in data or (data[name] is None and default is not dataclasses.MISSING):
            if default is dataclasses.MISSING:
                raise ModelConfigError(f"{source}: missing field {name}")
            return default
        value = data[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (cast is float or value == int(value))
        if not ok or (cast is int and value <= 0):
            raise ModelConfigError(f"{source}: {name} must be a {'positive integer' if cast is int else 'number'}, "
                                   f"got {value!r}")
        return cast(value)

    hidden, heads = field("hidden_size", int), field("num_attention_heads", int)
    mc = dict(d_model=hidden, n_layers=field("num_hidden_layers", int), n_heads=heads,
              n_kv_heads=field("num_key_value_heads", int, heads), ffn_dim=field("intermediate_size", int),
              vocab_size=field("vocab_size", int), max_seq_len=field("max_position_embeddings", int, 4096),
              norm_eps=field("rms_norm_eps", float, 1e-6), tie_embeddings=bool(data.get("tie_word_embeddings", False)),
              init_std=field("initializer_range", float, 0.02))
    if data.get("head_dim") not in (None, hidden // heads):
        raise ModelConfigError(f"{source}: head_dim {data['head_dim']} differs from hidden_size / num_attention_heads "
                               f"= {hidden // heads}; not supported")
    if kind == "qwen2":
        mc["qkv_bias"] = True  # Qwen2 always has q/k/v biases and none on o_proj
    elif data.get("attention_bias"):
        mc["qkv_bias"] = mc["out_bias"] = True
    mc.update(_rope(data, source))
    return _validated(ModelConfig(**mc), source)


def sliding_window(data: dict[str, Any]) -> int | None:
    """The attention window of a Hugging Face config, if it uses one."""
    if data.get("model_type") == "qwen2" and not data.get("use_sliding_window"):
        return None
    window = data.get("sliding_window")
    return int(window) if window else None


def check_training_length(path: str | Path, seq_len: int) -> None:
    """Refuse training rows longer than a Hugging Face config's sliding window (the model attends to the whole
    row, which equals windowed attention only while the row fits in the window)."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file() or p.suffix != ".json":
        return
    data = read_config_file(p)
    window = sliding_window(data) if isinstance(data, dict) and "model_type" in data else None
    if window is not None and seq_len > window:
        raise ModelConfigError(f"{p}: sliding_window {window} is below --max-seq-length {seq_len}; the model "
                               f"attends to the whole row, so train at most {window} tokens per row")


def trained_positions(run: dict[str, Any], mc: ModelConfig) -> int:
    """The positions a checkpoint's model was trained for: its run's ``max_seq_length``; a shape from a file
    (``--model-config``, ``--init-from``) keeps the positions that file declares, when longer (a preset's
    ``max_seq_len`` is only the size of its RoPE table)."""
    n = int(run.get("max_seq_length") or mc.max_seq_len)
    if run.get("init_from") or run.get("model_config"):
        n = max(n, mc.max_seq_len)
    return n


def to_hf_config(mc: ModelConfig, dtype: str, max_positions: int, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None) -> dict[str, Any]:
    """The Hugging Face config for ``mc``: LlamaForCausalLM, or Qwen2ForCausalLM when only q/k/v have biases."""
    qwen2 = mc.qkv_bias and not mc.out_bias
    if mc.out_bias and not mc.qkv_bias:
        raise ModelConfigError("a bias on o_proj alone has no Hugging Face architecture to export to")
    rope: dict[str, Any] = {"rope_type": mc.rope_scaling or "default", "rope_theta": mc.rope_theta}
    if mc.rope_scaling:
        rope["factor"] = mc.rope_factor
    if mc.rope_scaling == "llama3":
        rope.update(low_freq_factor=mc.rope_low_freq_factor, high_freq_factor=mc.rope_high_freq_factor,
                    original_max_position_embeddings=mc.rope_original_max_positions)
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"], "model_type": "qwen2" if qwen2
        else "llama", "hidden_act": "silu", "hidden_size": mc.d_model, "intermediate_size": mc.ffn_dim,
        "num_hidden_layers": mc.n_layers, "num_attention_heads": mc.n_heads, "num_key_value_heads": mc.n_kv_heads,
        "head_dim": mc.head_dim, "vocab_size": mc.vocab_size, "max_position_embeddings": max_positions,
        "rms_norm_eps": mc.norm_eps, "rope_theta": mc.rope_theta,
        # transformers >= 5 reads rope_parameters, earlier releases rope_scaling (None when unscaled)
        "rope_parameters": rope, "rope_scaling": ({k: v for k, v in rope.items() if k != "rope_theta"}
                                                 if mc.rope_scaling else None),
        "tie_word_embeddings": mc.tie_embeddings, "initializer_range": mc.init_std,
        "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "use_cache": True,
    }
    if qwen2:
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(attention_bias=mc.qkv_bias, mlp_bias=False)
    return out
