"""Model shapes as a data table (litgpt config.py / torchtitan ``debugmodel`` style).

Each preset names the shape it follows. ``tiny`` exists for tests and CPU demos.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention
    ffn_dim: int  # SwiGLU hidden size
    vocab_size: int
    max_seq_len: int = 4096  # RoPE table length; the training seq length must not exceed it
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")


# name -> (config, where the shape comes from)
PRESETS: dict[str, tuple[ModelConfig, str]] = {
    "tiny": (
        ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=512,
                    max_seq_len=1024),
        "test model, ~0.9M params, GQA 4q/2kv",
    ),
    "small": (
        ModelConfig(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, vocab_size=32000),
        "GPT-3 Small / OPT-125M width and depth with a Llama block, ~134M params",
    ),
    "base": (
        ModelConfig(d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5504, vocab_size=32000),
        "GPT-3 XL / OPT-1.3B width and depth with a Llama block, ~1.35B params",
    ),
    "large": (
        ModelConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000),
        "Llama-2-7B shape, ~6.74B params",
    ),
}


def get_model_config(name: str, **overrides) -> ModelConfig:
    """Look up a preset; ``overrides`` replace fields (e.g. vocab_size from the tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name][0]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        cfg = replace(cfg, **overrides)
    cfg.validate()
    return cfg
