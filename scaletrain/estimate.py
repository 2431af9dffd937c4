"""Will it fit? Bytes per device of a training run, from its config alone (no torch, no model built).

The peak of a step is the largest of three moments (Megatron's ``report_theoretical_memory`` and DeepSpeed's
``estimate_zero*_model_states_mem_needs`` cover the first one's model states):

    backward start: states + gathered parameters + activations of every block + the loss's buffers
    backward end:   states + gradients + the root (embedding, lm_head) gathered with its unsharded gradients
                    (FSDP2: and their reduce-scatter's fp32 input 4·P_r, kept with its output to the end)
    optimizer step: states + gradients + the optimizer's temporaries (+ the engine's gradient buffers)

Symbols: P parameters (a tied embedding counted once), N world size, a bytes of the compute dtype (2 for
bf16/fp16, 4 for fp32), S = micro-batch x sequence length tokens, D width, F FFN width, H heads, Q head
dim (H·Q the attention width), L layers, V vocabulary, P_b one block's parameters, P_r the root's
(embedding, final norm, lm_head).

States (persistent from the first optimizer step on):
  * FSDP2: fp32 parameter shards 4P/N and AdamW's two moments 8P/N; fp32 gradient shards 4P/N from the
    backward to the step (``zero_grad(set_to_none=True)`` frees them). Gathered parameters in the compute
    dtype: at world 1 every block stays gathered from forward to its backward (a·P); above 1 the root, the
    last block (kept gathered for backward) and the block prefetched next, a·(P_r + 2·P_b).
    Temporaries of the step: torch's foreach AdamW makes one fp32 tensor list the size of the shards,
    4P/N (the fused CUDA AdamW makes none).
  * DeepSpeed ZeRO-1/2: the model's parameters whole in the compute dtype a·P (in a flat buffer), fp32
    master partition 4P/N, moments 8P/N; the gradients' reduce buckets, a·B each (B = reduce_bucket_size
    elements, two with overlap_comm), the partition's gradients a·P/N, and at the step their fp32 copy
    4P/N (none in fp32, where ``.to(float32)`` returns the same tensor) and the optimizer's temporary 4P/N.
    In bf16/fp16 with ``data_types.grad_accum_dtype`` fp32 (our configs) the partition's gradients are a
    flat fp32 buffer 4P/N from the first reduce on (so no copy at the step), and backward ends in reduces,
    one rank's part at a time (m = min(B, P/N) elements a call), that flatten it (a·m) and cast it to
    ``communication_data_type`` (c·m, when c ≠ a); gloo copies that again on CPU, c·m·(1 + 1/N) at N > 1
    (measured, small at world 2: 405 MiB that the estimate lacked before).
  * DeepSpeed ZeRO-3: parameter partitions a·P/N, fp32 master 4P/N, moments 8P/N, the flat fp32 gradient
    partition 4P/N (allocated at initialisation, so present at both moments) and the reduce bucket c·B (c the
    bytes of ``communication_data_type``, fp32 in our configs: the bucket is allocated in it);
    parameters under stage3_param_persistence_threshold elements stay whole (a each); gathered in forward and
    backward: a parameter is kept while its next use is within stage3_max_reuse_distance elements, up to
    stage3_max_live_parameters, so with both at or above P (the shipped 1e9 for models below 1B) every
    parameter stays gathered from its forward to its backward, a·P, else the block in use and the prefetch
    bucket, a·(P_b + prefetch). Backward ends in a reduce of the bucket (``__avg_scatter_grads``): its
    gradients are interleaved by rank into one more buffer (``reduce_scatter_coalesced``'s torch.cat,
    c·min(B, P)) while the gradient that did not fit, up to the largest tensor whole (a·P_max, the
    embedding), waits; gloo's reduce_scatter_tensor (CPU, N > 1) copies its input and output again,
    c·min(B, P)·(1 + 1/N) (measured: +288 MiB for a 191 MiB input at N = 2). The step goes sub-group by
    sub-group (sub_group_size elements G): the sub-group's gradients flattened into fp32 4·min(G, P/N), and
    foreach's temporary as much again.

Activations, saved for backward, bytes per token of each block (``model/llama.py``):
  * each RMSNorm (2 a block): its fp32 input 4D, the normalised value a·D, its output a·D, its fp32 rstd 4:
    (4 + 2a)·D + 4
  * attention: q, k, v (k and v repeated to H heads for GQA) and the SDPA output, 4a·H·Q (the output
    projection's input is a view of SDPA's output), SDPA's fp32 log-sum-exp 4H
  * MLP: gate output, its SiLU, up output and their product: 4a·F
  -> per block  2(4 + 2a)·D + 8 + 4a·H·Q + 4H + 4a·F, times S tokens, times L blocks.
  With activation checkpointing each block keeps only its input (a·D per token); one block's activations
  are rebuilt at a time in backward, once the loss's buffers are freed, with its MLP's two gradients 2a·F
  alive at once: the peak holds L·a·D + max(loss, block + 2a·F).
Loss: the final norm (4 + 2a)·D + 4, the int64 token ids and labels 16, and the logits a·V, over which the
loss writes their softmax for backward (``model/loss.py``; ``tests/test_estimate.py`` checks these saved bytes
against autograd's own, exactly): (4 + 2a)·D + 20 + a·V per token. The loss goes through the logits C rows
at a time (C·V = 2^24): at the end of the forward a chunk's exp temporary in fp32 and, for bf16/fp16 logits,
its fp32 copy are alive too, 4·min(C, S)·V or 8·min(C, S)·V more, counted in the loss (so in the max above).

``resident=True`` estimates resident memory on a CPU, where a buffer counts only the part written (a reduce
bucket larger than the gradients it holds is not touched past them); on a GPU the allocator reserves it whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GiB = 2**30
MOMENTS = ("backward start", "backward end", "optimizer step")


@dataclass
class MemoryEstimate:
    """Bytes per device, by kind, at the run's peak moment, and what it means for a device of ``device_bytes``."""

    engine: str  # fsdp, zero2, zero3 (zero1 counts as zero2: gradients whole until reduced)
    rows: dict[str, tuple[int, int, int]]  # kind -> bytes at each of MOMENTS
    activation_bytes_per_row: int  # what one more row of micro-batch adds
    device_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    checkpointing: bool = False  # whether the run recomputes activations
    other_activation_bytes: int = 0  # the activations with activation checkpointing the other way

    @property
    def totals(self) -> tuple[int, int, int]:
        """Bytes at each of MOMENTS (backward start, backward end, optimizer step)."""
        return tuple(sum(v[i] for v in self.rows.values()) for i in range(3))

    @property
    def peak_bytes(self) -> int:
        return max(self.totals)

    @property
    def moment(self) -> str:
        """The moment of the peak."""
        return MOMENTS[self.totals.index(self.peak_bytes)]

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.peak_bytes <= self.device_bytes

    def largest_micro_batch(self, micro_batch: int) -> int | None:
        """The largest micro-batch whose estimate fits the device (0: not even one row); None without a device."""
        if self.device_bytes is None or not self.activation_bytes_per_row:
            return None
        backward_start, *after = self.totals
        if max(after) > self.device_bytes:
            return 0
        fixed = backward_start - self.activation_bytes_per_row * micro_batch
        return max(0, int(self.device_bytes - fixed) // self.activation_bytes_per_row)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "rows": dict(self.rows), "peak_bytes": self.peak_bytes, "moment": self.moment,
                **dict(zip(("backward_bytes", "end_bytes", "step_bytes"), self.totals)),
                "device_bytes": self.device_bytes,
                "activation_bytes_per_row": self.activation_bytes_per_row, "notes": self.notes}

    def table(self, micro_batch: int) -> str:
        unit, div = ("GiB", GiB) if self.peak_bytes >= GiB else ("MiB", 2**20)
        lines = [f"memory per device, estimated ({self.engine}):",
                 f"  {'':<18}" + "".join(f" {m:>15}" for m in MOMENTS)]
        for k, values in list(self.rows.items()) + [("total", self.totals)]:
            lines.append(f"  {k:<18}" + "".join(f" {v / div:11.2f} {unit}" for v in values))
        lines[-1] += f"   peak {self.peak_bytes / div:.2f} {unit} at the {self.moment}"
        other = "without" if self.checkpointing else "with --gradient-checkpointing"
        lines.append(f"  activations {other}: {self.other_activation_bytes / div:.2f} {unit}")
        if self.device_bytes is not None:
            best = self.largest_micro_batch(micro_batch)
            verdict = "fits" if self.fits else "does NOT fit"
            share = self.peak_bytes / self.device_bytes
            lines.append(f"  {verdict} in {self.device_bytes / GiB:.1f} GiB ({share:.0%}); largest micro-batch that "
                         f"fits: {best}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def activation_bytes_per_token(mc, a: int, checkpointing: bool, loss_temporary: float = 0) -> tuple[float, float]:
    """(bytes per token held by the blocks at the start of backward, bytes per token of the loss's peak);
    ``loss_temporary``: the loss's chunk temporaries at the end of the forward, per token."""
    d, f, h, q = mc.d_model, mc.ffn_dim, mc.n_heads, mc.head_dim
    block = 2 * (4 + 2 * a) * d + 8 + 4 * a * h * q + 4 * h + 4 * a * f
    loss = (4 + 2 * a) * d + 4 + 16 + a * mc.vocab_size + loss_temporary
    if not checkpointing:
        return mc.n_layers * block, loss
    # one block rebuilt in backward (after the loss's buffers are gone) with its MLP's two gradients 2a·F:
    # whichever of that and the loss's backward is larger is the peak
    return mc.n_layers * a * d + max(0, block + 2 * a * f - loss), loss


def _ds_engine(ds_config: dict | None) -> tuple[str, dict]:
    zero = (ds_config or {}).get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 2))
    return ("zero3" if stage == 3 else "zero2"), zero


def estimate_memory(cfg, model_config, world_size: int, resident: bool = False, ds_config: dict | None = None,
                    device_type: str = "cuda", device_memory_gib: float | None = None) -> MemoryEstimate:
    """The estimate for a resolved run config (``PreTrainingConfig``) and its model shape on ``world_size``
    ranks. ``ds_config``: the resolved DeepSpeed config for the deepspeed engine (read from --ds_config when
    not given). See the module doc for every term."""
    mc, n = model_config, world_size
    from scaletrain.model.flops import block_tensor_sizes, num_params, root_tensor_sizes

    p, pb, pr = num_params(mc), sum(block_tensor_sizes(mc)), sum(root_tensor_sizes(mc))
    a = 4 if cfg.mixed_precision == "fp32" else 2
    fused = device_type == "cuda"  # torch's fused AdamW on CUDA: no full-size temporaries
    notes: list[str] = []
    if cfg.resolved_engine == "fsdp":
        engine = "fsdp"
        zero: dict = {}
    else:
        if ds_config is None:
            from scaletrain.engine.ds_config import load_ds_config, resolve_ds_config

            ds_config, _ = resolve_ds_config(load_ds_config(cfg.ds_config), cfg, world_size, device_type=device_type)
        engine, zero = _ds_engine(ds_config)
    offload = bool(cfg.fsdp_cpu_offload) if engine == "fsdp" else \
        (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    if offload:
        notes.append("optimizer offload: the fp32 states live in host memory; the device rows count what stays")

    tokens = cfg.micro_batch_size * cfg.max_seq_length
    from scaletrain.model.loss import chunk_rows

    chunk = (4 if a == 4 else 8) * min(chunk_rows(mc.vocab_size), tokens) * mc.vocab_size
    blocks_pt, loss_pt = activation_bytes_per_token(mc, a, cfg.gradient_checkpointing, chunk / tokens)
    activations, loss = int(blocks_pt * tokens), int(loss_pt * tokens)

    def bucket(elements: float, dtype_bytes: int, holds: float) -> int:
        """A buffer of ``elements``: on a GPU allocated whole; resident on a CPU only where written."""
        return int(dtype_bytes * (min(elements, holds) if resident else elements))

    shard = math.ceil(p / n)
    grads_bwd = 0  # gradients that exist when backward starts (ZeRO-3's flat partition buffer)
    grads_end = None  # at the end of backward (default: those of the step)
    if engine == "fsdp":
        params = 4 * shard
        optim = 8 * shard
        grads = 4 * shard
        gathered = a * p if n == 1 else a * min(p, pr + 2 * pb)
        temp = 0 if fused else 4 * shard
        if cfg.gradient_accumulation_steps > 1:
            gathered_grads = a * p  # unsharded gradients kept across micro-steps (no reduce until the last)
        else:
            gathered_grads = (a + 4) * pb  # one block's, before its reduce-scatter
        buffers_bwd, buffers_step = gathered + gathered_grads, temp
        # the backward ends in the root (lm_head first, the embedding last): it is gathered, with its gradients
        # unsharded until they are copied into the reduce-scatter's input (fp32, the reduce dtype), which is
        # kept, with its output 4·P_r/N, to the end of backward (with accumulation, every unsharded gradient
        # until the last one)
        rs_in = 4 * pr
        buffers_end = max(2 * a * pr + rs_in, a * pr + rs_in + rs_in // n) \
            + (a * p if cfg.gradient_accumulation_steps > 1 else 0)
        if offload:
            params, optim, grads, temp = 0, 0, 0, 0
            buffers_step = 0
    elif engine == "zero2":
        b = float(zero.get("reduce_bucket_size", 5e8))
        n_buckets = 2 if zero.get("overlap_comm", False) else 1
        params = a * p + 4 * shard  # the model whole in the compute dtype + fp32 master partition
        optim = 8 * shard
        buckets = sum(bucket(b, a, max(0.0, p - i * b)) for i in range(n_buckets))
        temp = 0 if fused else 4 * shard
        buffers_bwd, buffers_step, buffers_end = buckets, buckets + temp, buckets
        accum = str(((ds_config or {}).get("data_types") or {}).get("grad_accum_dtype") or "").lower()
        if a != 4 and accum in ("fp32", "float32"):
            # bf16/fp16 with grad_accum_dtype fp32: the partition's gradients live in a flat fp32 buffer from the
            # first reduce on (so the step makes no fp32 copy), and each reduce flattens its gradients (a·m, m
            # elements a call: up to the bucket, and the part one rank owns) and casts them to the communication
            # dtype (c·m); gloo copies that again on CPU. Measured (small, 2 CPU ranks): the peak is there, 405
            # MiB above the model without these terms
            grads = grads_end = 4 * shard
            c = _comm_bytes(ds_config, a)
            m = min(b, shard)
            buffers_end += int(a * m + (c * m if c != a else 0)
                               + (c * m * (1 + 1 / n) if device_type == "cpu" and n > 1 else 0))
        else:
            # the partition's gradients, and at the step their fp32 copy (``.to(float32)``: none when they are fp32)
            grads = a * shard + (4 * shard if a != 4 else 0)
            grads_end = a * shard
        if offload:
            params, optim = a * p, 0
            grads, buffers_step = a * shard, buckets
    else:  # zero3
        b = float(zero.get("reduce_bucket_size", 5e8))
        prefetch = float(zero.get("stage3_prefetch_bucket_size", 5e7))
        persist = float(zero.get("stage3_param_persistence_threshold", 1e5))
        group = float(zero.get("sub_group_size", 1e9))
        live = float(zero.get("stage3_max_live_parameters", 1e9))
        reuse = float(zero.get("stage3_max_reuse_distance", 1e9))
        small = _persistent_elements(mc, persist)
        params = a * shard + a * small * (n - 1) // n + 4 * shard
        optim = 8 * shard
        grads = grads_bwd = 4 * shard  # the flat fp32 gradient partition, allocated at initialisation
        # a parameter is not released while its next use is within max_reuse_distance elements (the backward of a
        # forward it served), up to max_live_parameters: past the model's size, all stay gathered
        gathered = a * (p - small) if min(live, reuse) >= p else int(a * min(p - small, pb + prefetch))
        sub = int(min(group, shard))
        temp = 4 * sub + (0 if fused else 4 * sub)  # a sub-group's flattened fp32 gradients (+ foreach's temporary)
        c = _comm_bytes(ds_config, a)
        reduce_bucket = bucket(b, c, p)
        interleaved = int(c * min(b, p))  # reduce_scatter_coalesced's copy, written whole
        gloo = int(c * min(b, p) * (1 + 1 / n)) if device_type == "cpu" and n > 1 else 0
        waiting = a * max(block_tensor_sizes(mc) + root_tensor_sizes(mc))
        buffers_bwd = gathered + reduce_bucket
        buffers_end = gathered + reduce_bucket + interleaved + gloo + waiting
        buffers_step = temp + reduce_bucket
        if offload:
            params, optim, grads, grads_bwd = a * shard + a * small * (n - 1) // n, 0, 0, 0
            buffers_step = reduce_bucket

    # each kind's bytes at the three moments (the gradients of the step do not exist yet when backward starts)
    grads_end = grads if grads_end is None else grads_end
    rows = {"parameters": (params, params, params), "gradients": (grads_bwd, grads_end, grads),
            "optimizer state": (optim, optim, optim), "activations": (activations, 0, 0),
            "loss and logits": (loss, 0, 0), "buffers": (buffers_bwd, buffers_end, buffers_step)}
    device_bytes = int(device_memory_gib * GiB) if device_memory_gib else None
    other = int(activation_bytes_per_token(mc, a, not cfg.gradient_checkpointing, chunk / tokens)[0] * tokens)
    return MemoryEstimate(engine, rows, int((blocks_pt + loss_pt) * cfg.max_seq_length), device_bytes, notes,
                          cfg.gradient_checkpointing, other)


_COMM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # the names DeepSpeed accepts for communication_data_type


def _comm_bytes(ds_config: dict | None, a: int) -> int:
    """Bytes an element of ``communication_data_type`` (unset: the compute dtype's, ``a``)."""
    return _COMM_BYTES.get(str((ds_config or {}).get("communication_data_type") or "").lower(), a)


def _persistent_elements(mc, threshold: float) -> int:
    """Elements of the parameters ZeRO-3 keeps whole (those with fewer than ``threshold`` elements)."""
    from scaletrain.model.flops import block_tensor_sizes, root_tensor_sizes

    return (mc.n_layers * sum(s for s in block_tensor_sizes(mc) if s < threshold)
            + sum(s for s in root_tensor_sizes(mc) if s < threshold))


def run_estimate(cfg, model_config, world_size: int, device_type: str, device_memory_gib: float | None = None,
                 resident: bool = False, ds_config: dict | None = None) -> MemoryEstimate:
    """The estimate of a resolved run on ``device_type``; the device's memory from ``device_memory_gib`` or, on
    CUDA, the GPU's."""
    if device_memory_gib is None and device_type == "cuda":
        import torch

        if torch.cuda.is_available():
            device_memory_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    return estimate_memory(cfg, model_config, world_size, resident=resident, ds_config=ds_config,
                           device_type=device_type, device_memory_gib=device_memory_gib)


def build_parser():
    """The estimate's own flags; every other flag is a training flag (``scaletrain train --help``)."""
    import argparse

    p = argparse.ArgumentParser(prog="scaletrain estimate", add_help=False,
                                description="Memory per device of a training run before launching it: the training "
                                            "flags, plus these")
    p.add_argument("--world-size", type=int, default=1, help="ranks the run will have (default: 1)")
    p.add_argument("--device-memory-gib", type=float, help="memory of one device, GiB (default: this machine's GPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="where it runs (default: cuda; cpu counts resident memory)")
    p.add_argument("-h", "--help", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    """``scaletrain estimate [training flags] --world-size N [--device-memory-gib G] [--device cuda|cpu]``."""
    import sys

    from scaletrain.errors import run_entry

    p = build_parser()
    own, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if own.help:
        p.print_help()
        print("\nand every training flag (scaletrain train --help): --model-size, --engine/--ds_config, "
              "--micro-batch-size, --max-seq-length, --mixed-precision, --gradient-checkpointing, ...")
        return

    def run() -> None:
        from scaletrain.cli import parse_config
        from scaletrain.config import ConfigError

        if own.world_size <= 0:
            raise ConfigError(f"--world-size: must be a positive integer, got {own.world_size}")
        if own.device_memory_gib is not None and not 0 < own.device_memory_gib < math.inf:  # nan was a traceback
            raise ConfigError(f"--device-memory-gib: must be a positive number, got {own.device_memory_gib}")
        cfg = parse_config(rest).for_world_size(own.world_size)
        mc, vocab_note = _model_config(cfg)
        est = run_estimate(cfg, mc, own.world_size, own.device, own.device_memory_gib, resident=own.device == "cpu")
        from scaletrain.model import num_params

        print(f"scaletrain estimate: {cfg.model_config or cfg.init_from or cfg.model_size} "
              f"({num_params(mc) / 1e6:,.1f}M params{vocab_note}), {cfg.mixed_precision}, world {own.world_size}, "
              f"micro-batch {cfg.micro_batch_size} x {cfg.max_seq_length} tokens"
              + (", activation checkpointing" if cfg.gradient_checkpointing else ""))
        print(est.table(cfg.micro_batch_size))

    run_entry(run)


def _model_config(cfg):
    """The run's model shape; a preset takes the vocabulary of the prepared data when --data-dir has it."""
    from scaletrain.run import data_tokenizer, model_config_for

    vocab, note = None, ""
    if cfg.data_kind == "shards" and not cfg.init_from:
        try:
            tok, _ = data_tokenizer(cfg)
            from scaletrain.data.loader import model_vocab_size

            vocab = model_vocab_size(tok.vocab_size) if not cfg.model_config else tok.vocab_size
            note = f", vocab {vocab} from {cfg.data_dir}"
        except Exception:
            note = ", the preset's vocab (no prepared data at --data-dir)"
    source = None
    if cfg.init_from:
        from scaletrain.checkpoint.init_from import open_init_source

        source = open_init_source(cfg.init_from, cfg.trust_checkpoint).model_config
    return model_config_for(cfg, vocab, source), note
