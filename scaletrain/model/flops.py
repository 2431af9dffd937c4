"""Parameter counts and training FLOPs per token, the numbers MFU is built on.

Convention (PaLM appendix B, as torchtitan and nanoGPT use it):

    flops_per_token = 6 * N_matmul + 12 * L * H * Q * T

* ``N_matmul``: weights that take part in a matmul per token: every Linear in the
  blocks plus the output projection (lm_head). The embedding table is a lookup, not a
  matmul, and is left out; with tied embeddings the shared matrix is counted once,
  as lm_head. Norm weights are elementwise and left out.
* ``12 * L * H * Q * T``: attention scores and the weighted sum (2 matmuls of
  ``T x Q`` by ``Q x T`` per head, x2 for multiply-add, x3 for forward + backward),
  with the full ``T x T`` square, not halved for the causal mask (PaLM's choice).
* 6 = 2 (multiply-add) x 3 (forward, backward w.r.t. inputs, backward w.r.t. weights).
  Activation recomputation is not counted: MFU measures model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

from .presets import ModelConfig


def block_tensor_sizes(cfg: ModelConfig) -> list[int]:
    """Elements of each parameter tensor of one transformer block (weights, norms, biases)."""
    d, q, h, kv, f = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim
    sizes = [d * h * q, d * kv * q, d * kv * q, h * q * d, d * f, d * f, f * d, d, d]
    if cfg.qkv_bias:
        sizes += [h * q, kv * q, kv * q]
    if cfg.out_bias:
        sizes.append(d)
    return sizes


def root_tensor_sizes(cfg: ModelConfig) -> list[int]:
    """Elements of each parameter tensor outside the blocks: the embedding, lm_head unless tied, the final norm."""
    return [cfg.vocab_size * cfg.d_model] * (1 if cfg.tie_embeddings else 2) + [cfg.d_model]


def num_params(cfg: ModelConfig) -> int:
    """Exact number of trainable parameters of ``Llama(cfg)``."""
    return cfg.n_layers * sum(block_tensor_sizes(cfg)) + sum(root_tensor_sizes(cfg))


def num_matmul_params(cfg: ModelConfig) -> int:
    """Weights used in a matmul per token (blocks' Linears + lm_head), see module doc."""
    d, q = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * q + 2 * d * cfg.n_kv_heads * q + cfg.n_heads * q * d
    mlp = 3 * d * cfg.ffn_dim
    return cfg.n_layers * (attn + mlp) + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training (forward + backward) model FLOPs per token at sequence length ``seq_len``."""
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6 * num_matmul_params(cfg) + attn
