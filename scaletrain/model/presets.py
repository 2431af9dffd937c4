"""Model shapes as a data table (litgpt config.py / torchtitan ``debugmodel`` style).

Each preset names the shape it follows. ``tiny`` exists for tests and CPU demos. A shape can also come from a
file (``--model-config``: our fields, or a Hugging Face ``config.json``; see ``config_io.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

ROPE_SCALINGS = (None, "linear", "llama3")  # what rope_tables implements (HF rope_type names)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder (also Mistral, and Qwen2 with its q/k/v biases)."""

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
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2; Llama's attention_bias sets both)
    out_bias: bool = False  # bias on the attention output projection (Llama attention_bias)
    # RoPE frequency scaling (Hugging Face rope_type): None, "linear" (positions / factor) or "llama3" (Llama 3.1:
    # long wavelengths / factor, short ones kept, a smooth band between)
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192

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
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling={self.rope_scaling!r}; supported: {', '.join(map(str, ROPE_SCALINGS))}")
        if self.rope_scaling and not self.rope_factor > 0:
            raise ValueError(f"rope_factor={self.rope_factor} must be positive")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                             f"rope_low_freq_factor={self.rope_low_freq_factor}")


_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_positions=8192, norm_eps=1e-5)

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
    "llama3-1b": (
        ModelConfig(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=128256,
                    max_seq_len=131072, tie_embeddings=True, rope_factor=32.0, **_LLAMA3_ROPE),
        "Llama-3.2-1B shape (GQA 32q/8kv, 128k vocab, tied embeddings, rope theta 500000 with llama3 scaling), "
        "~1.24B params",
    ),
    "llama3-3b": (
        ModelConfig(d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, vocab_size=128256,
                    max_seq_len=131072, tie_embeddings=True, rope_factor=32.0, **_LLAMA3_ROPE),
        "Llama-3.2-3B shape (GQA 24q/8kv, 128k vocab, tied embeddings), ~3.21B params",
    ),
    "llama3-8b": (
        ModelConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
                    max_seq_len=131072, rope_factor=8.0, **_LLAMA3_ROPE),
        "Llama-3.1-8B shape (GQA 32q/8kv, 128k vocab, rope theta 500000 with llama3 scaling), ~8.03B params",
    ),
}


def get_model_config(name: str, **overrides) -> ModelConfig:
    """Look up a preset; ``overrides`` replace fields (e.g. vocab_size from the tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return with_overrides(PRESETS[name][0], **overrides)


def with_overrides(cfg: ModelConfig, **overrides) -> ModelConfig:
    """``cfg`` with the fields in ``overrides`` that are not None replaced, validated."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        cfg = replace(cfg, **overrides)
    cfg.validate()
    return cfg
