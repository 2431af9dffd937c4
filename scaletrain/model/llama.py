"""Llama-style decoder: RMSNorm, RoPE, grouped-query attention via SDPA, SwiGLU.

Pure ``nn.Module`` with no parallelism in it: sharding lives in ``scaletrain/engine``.
Parameter names follow Hugging Face ``LlamaForCausalLM`` without its ``model.`` prefix,
so export is a rename-free copy (see ``hf_state_dict_key``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .loss import IGNORE_INDEX, cross_entropy_sum
from .presets import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 like HF LlamaRMSNorm, then cast back before the weight
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """RoPE inverse frequencies (head_dim / 2,), with the config's scaling, as Hugging Face computes them
    (``modeling_rope_utils``: default, linear, llama3)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d))
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        old, low, high, factor = (cfg.rope_original_max_positions, cfg.rope_low_freq_factor,
                                  cfg.rope_high_freq_factor, cfg.rope_factor)
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (past old / low) are divided by factor, short ones (below old / high) kept
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_seq_len, head_dim), HF's non-interleaved layout."""
    inv_freq = rope_inv_freq(cfg, device)
    t = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, Q/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, Q)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, Q); cos/sin: (T, Q), or (B, 1, T, Q) with per-row positions; fp32, cast to x's dtype
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) index of the document each token belongs to within its row; an EOS ends (belongs to) its document."""
    eos = (input_ids == eos_id).int()
    return torch.cumsum(eos, dim=1) - eos


def document_positions(doc: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its document (0 at each document's first token)."""
    T = doc.shape[1]
    t = torch.arange(T, device=doc.device).expand_as(doc)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return t - torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values


_flex_attention = None


def flex_attention(q, k, v, block_mask):
    """FlexAttention compiled once per process (uncompiled it materialises the full score matrix)."""
    global _flex_attention
    if _flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention as flex

        _flex_attention = torch.compile(flex, dynamic=False)
    return _flex_attention(q, k, v, block_mask=block_mask)


def document_mask(doc: torch.Tensor, flex: bool):
    """Causal attention within each document: a FlexAttention BlockMask (which skips whole blocks across
    documents), or an exact boolean mask (B, 1, T, T) for SDPA."""
    B, T = doc.shape
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(b, h, q, k):
            return (q >= k) & (doc[b, q] == doc[b, k])

        return create_block_mask(same_document, B, None, T, T, device=doc.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.out_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Q)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, Q)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # expand kv heads for GQA; the flash/efficient kernels then apply unchanged
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Q)
        elif isinstance(mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = flex_attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Decoder-only LM. ``forward(input_ids)`` -> logits (B, T, V); with ``labels`` -> the loss over the
    target tokens (labels other than ``IGNORE_INDEX``): their mean, or with ``reduction="sum"`` their sum
    (the engines divide a whole optimizer step's sum by its target-token count)."""

    def __init__(self, cfg: ModelConfig, init: bool = True) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.gradient_checkpointing = False  # recompute each block in backward (set by the engine)
        self.z_loss = 0.0  # weight of the z-loss added to the training loss (set by the engine)
        self.last_z_loss: torch.Tensor | None = None  # the z-loss term of the last training forward, detached
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.document_eos: int | None = None  # set_document_masking
        self.restart_positions = False
        self.flex_attention = False
        self.initialised = False  # whether the parameters hold values (an engine fills them in when not)
        if init and self.rope_cos.device.type != "meta":  # init=False: the engine fills the weights in later
            self.init_weights()

    def set_document_masking(self, eos_id: int | None, restart_positions: bool = False, flex: bool = False) -> None:
        """Attention in packed rows stays within each document (an ``eos_id`` token ends one); RoPE positions
        restart at each document with ``restart_positions``. ``flex``: FlexAttention (fast on CUDA, compiled),
        else SDPA with an exact boolean mask. ``eos_id=None`` turns it off."""
        self.document_eos, self.restart_positions, self.flex_attention = eos_id, restart_positions, flex

    def init_plan(self) -> list[tuple[str, float | None]]:
        """How each parameter starts, in the order the random draws are made: (name, std of a zero-mean normal)
        or (name, None) for a constant (norm weights 1, biases 0). An engine that holds parameters sharded
        (or on the meta device) fills them in this order from the same random stream, so the weights equal
        ``init_weights()``'s on one process whatever the world size."""
        cfg = self.config
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # residual projections scaled by depth (GPT-2)
        plan: list[tuple[str, float | None]] = [("embed_tokens.weight", cfg.init_std)]
        for i in range(cfg.n_layers):
            b = f"layers.{i}."
            plan += [(b + n + ".weight", cfg.init_std) for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                                  "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
            plan += [(b + "self_attn.o_proj.weight", out_std), (b + "mlp.down_proj.weight", out_std),
                     (b + "input_layernorm.weight", None), (b + "post_attention_layernorm.weight", None)]
            plan += [(b + f"self_attn.{n}.bias", None) for n, on in (("q_proj", cfg.qkv_bias), ("k_proj", cfg.qkv_bias),
                                                                     ("v_proj", cfg.qkv_bias), ("o_proj", cfg.out_bias))
                     if on]
        plan.append(("norm.weight", None))
        if not cfg.tie_embeddings:
            plan.append(("lm_head.weight", cfg.init_std))
        return plan

    @staticmethod
    def initial_value(name: str, std: float | None, shape, device=None) -> torch.Tensor:
        """The full starting tensor of one ``init_plan`` entry (draws from torch's default generator)."""
        if std is None:
            return (torch.ones if name.endswith("norm.weight") else torch.zeros)(shape, device=device)
        return torch.empty(shape, device=device).normal_(0.0, std)

    @torch.no_grad()
    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """RoPE tables (computed, never saved), on ``device`` (default: where they are; meta is not a place)."""
        device = device or self.rope_cos.device
        self.rope_cos, self.rope_sin = rope_tables(self.config, device=device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer of a model whose tensors are whole (not sharded)."""
        self.reset_buffers()
        for name, std in self.init_plan():
            p = self.get_parameter(name)
            p.copy_(self.initial_value(name, std, p.shape, p.device))
        self.initialised = True

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        mask = None
        if self.document_eos is not None:
            doc = document_ids(input_ids, self.document_eos)
            mask = document_mask(doc, self.flex_attention)
            if self.restart_positions:
                pos = document_positions(doc)
                cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, Q)
        h = self.embed_tokens(input_ids)  # (B, T, D)
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(block, h, cos, sin, mask, use_reentrant=False)
            else:
                h = block(h, cos, sin, mask)
        logits = self.lm_head(self.norm(h))  # (B, T, V)
        if labels is None:
            return logits
        # the loss a chunk of rows at a time, their softmax written over the logits (model/loss.py); z-loss (PaLM,
        # Chowdhery et al. 2022, sec. 5): z_loss * log(Z)^2 per target token keeps the softmax normaliser near 1
        # (logits from drifting), inside the training loss, kept apart in last_z_loss for logging
        labels = labels.reshape(B * T)
        z_weight = self.z_loss if self.training else 0.0
        loss, z = cross_entropy_sum(logits.view(B * T, -1), labels, z_weight)
        if reduction == "mean":
            count = (labels != IGNORE_INDEX).sum().clamp(min=1)
            loss, z = loss / count, z / count
        elif reduction != "sum":
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        if z_weight:
            self.last_z_loss = z
        return loss


def hf_state_dict_key(name: str) -> str:
    """Our parameter name -> Hugging Face ``LlamaForCausalLM`` name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_state_dict_key(name: str) -> str:
    """Hugging Face ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` name -> ours."""
    return name[len("model."):] if name.startswith("model.") else name
