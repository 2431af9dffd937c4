"""One training step per GPU of FSDP2 or ZeRO-3 on N GPUs: compute at a given efficiency, the collectives each
engine issues at NCCL's ring cost, with or without overlap, and the optimizer step (benchmarks/scaling_model.py
feeds it measured efficiencies and checks it against published figures).

Network defaults, an HGX/DGX H100 cluster (every figure a field of Network and a flag of scaling_model.py):
  * NVLink 4: 900 GB/s per GPU both ways (H100 SXM datasheet), 450 one way; ring bus bandwidth taken as 80% of
    that, 360 GB/s (--nvlink-busbw); 8 GPUs a node.
  * Across nodes: one 400 Gb/s InfiniBand NDR or RoCE NIC per GPU (DGX H100: eight ConnectX-7; torchtitan's
    Grand Teton hosts: "400 Gb/s per GPU"), at 90% of line rate (--nic-gbps, --nics-per-node, --nic-efficiency).
  * Latencies: NCCL's own cost model for ring all-gather/reduce-scatter, Simple protocol (NVIDIA/nccl
    src/graph/tuning.cc, ncclTopoTuneModel: baseLat 8.4 us, NVLink hop 3.4 us, network hop 9.6 us).

Collective time (NCCL's ring model), N ranks on n nodes, S the gathered (all-gather) or input (reduce-scatter)
bytes:
    t(S) = base + (N - n) hop_nvlink + (n - 1) hop_net + (N - 1)/N x S / busbw
busbw is NVLink's on one node and min(NVLink, NICs per node x NIC rate x efficiency) across nodes: every ring
channel leaves a node through one NIC, so the node's NICs carry the ring together (NCCL: nChannels x speedInter).

What moves, per micro-batch, for a block of P_b parameters (the root, embedding + final norm + lm_head, P_r):
  * FSDP2 (engine/fsdp.py): an all-gather in bf16 before the forward (2 P_b) and again before the backward
    (resharded after the forward; the last block is not), a reduce-scatter of fp32 gradients (4 P_b,
    MixedPrecisionPolicy reduce_dtype) on the last micro-batch of a step only (set_requires_gradient_sync).
  * ZeRO-3 (ds_configs/zero3_bf16.json): the same bytes gathered (past 1e9 parameters stage3_max_reuse_distance
    keeps nothing gathered until the backward; scaletrain/estimate.py), but one all-gather per submodule it fetches
    (each Linear: 7 a block; norms under stage3_param_persistence_threshold stay whole), and a reduce-scatter of
    fp32 gradients (communication_data_type fp32) on every micro-batch, in reduce_bucket_size pieces: each
    collective pays the ring's latency.
Step time per micro-batch, with overlap (both engines prefetch one block ahead; all-gathers and reduce-scatters
share the links, so in backward they add):
    forward  = AG_root + AG_1 + sum_i max(F_i, AG_i+1) + F_root
    backward = B_root + sum_i max(B_i, AG_i-1 + RS_i+1) + RS_1 + RS_root
Without overlap every term adds. Then the optimizer step over the shard: 40 bytes per parameter / HBM bandwidth
(fused AdamW reads parameter, gradient and both moments in fp32 and writes three of them; clipping reads the
gradients and scales them), P/N parameters.

Not modelled: NCCL's kernels slowing compute by sharing SMs, stragglers and jitter, the data loader, tensor or
pipeline parallelism, hierarchical or tree algorithms, power caps (torchtitan's H100s ran at 500 W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scaletrain.model.flops import block_tensor_sizes, flops_per_token, num_matmul_params, num_params, root_tensor_sizes
from scaletrain.model.presets import ModelConfig

# dense bf16 TFLOP/s, HBM TB/s, usable memory GiB (NVIDIA H100 SXM5 and H200 SXM datasheets; memory as torch
# reports it)
DEVICES = {"H100": (989.4, 3.35, 79.1), "H200": (989.4, 4.8, 139.8)}
OPTIMIZER_BYTES_PER_PARAM = 40

@dataclass(frozen=True)
class Network:
    gpus_per_node: int = 8
    nvlink_busbw_gbs: float = 360.0
    nics_per_node: int = 8
    nic_gbps: float = 400.0
    nic_efficiency: float = 0.9
    base_us: float = 8.4
    nvlink_hop_us: float = 3.4
    net_hop_us: float = 9.6

    def nodes(self, n: int) -> int:
        return math.ceil(n / self.gpus_per_node)

    def busbw(self, n: int) -> float:
        """Bytes/s of a ring over ``n`` GPUs."""
        nvlink = self.nvlink_busbw_gbs * 1e9
        if self.nodes(n) == 1:
            return nvlink
        return min(nvlink, self.nics_per_node * self.nic_gbps / 8 * 1e9 * self.nic_efficiency)

    def collective(self, nbytes: float, n: int, pieces: int = 1) -> float:
        """Seconds of a ring all-gather (``nbytes`` gathered) or reduce-scatter (``nbytes`` in) over ``n`` GPUs,
        issued as ``pieces`` collectives."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        nodes = self.nodes(n)
        latency = (self.base_us + (n - nodes) * self.nvlink_hop_us + (nodes - 1) * self.net_hop_us) * 1e-6
        return pieces * latency + (n - 1) / n * nbytes / self.busbw(n)


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float
    hbm_tbs: float
    memory_gib: float


def device(name: str) -> Device:
    for key, (peak, hbm, mem) in DEVICES.items():
        if key.lower() in name.lower():
            return Device(name, peak, hbm, mem)
    raise SystemExit(f"unknown device {name!r}: known {', '.join(DEVICES)} (add its datasheet figures to DEVICES)")


def optimizer_seconds(params: float, dev: Device) -> float:
    return params * OPTIMIZER_BYTES_PER_PARAM / (dev.hbm_tbs * 1e12)


@dataclass(frozen=True)
class Case:
    mc: ModelConfig
    engine: str  # fsdp or zero3
    gpus: int
    micro_batch: int
    seq: int
    accum: int = 1
    recompute: str = "none"  # none, full, selective-op (torchtitan's: every second matmul recomputed)
    reduce_bucket: float = 5e7  # ZeRO-3 reduce_bucket_size, elements
    persistence: float = 1e5  # ZeRO-3 stage3_param_persistence_threshold, elements


def step_time(case: Case, eta: float, dev: Device, net: Network, overlap: bool) -> dict:
    """Seconds of one optimizer step per GPU and its parts (see the module doc)."""
    mc, n = case.mc, case.gpus
    tokens = case.micro_batch * case.seq
    rate = eta * dev.peak_tflops * 1e12
    bs, rsz = block_tensor_sizes(mc), root_tensor_sizes(mc)
    pb, pr = sum(bs), sum(rsz)
    # flops_per_token's terms (model/flops.py): lm_head is the root's matmul, the rest is L equal blocks
    root_matmul = mc.vocab_size * mc.d_model
    block_matmul = (num_matmul_params(mc) - root_matmul) / mc.n_layers
    root_flops = 6 * root_matmul
    block_flops = (flops_per_token(mc, case.seq) - root_flops) / mc.n_layers
    recompute = {"none": 0.0, "full": block_flops / 3, "selective-op": block_matmul}[case.recompute]
    f_b, b_b = block_flops / 3 * tokens / rate, (2 * block_flops / 3 + recompute) * tokens / rate
    f_r, b_r = root_flops / 3 * tokens / rate, 2 * root_flops / 3 * tokens / rate

    def ag(p, sizes):
        pieces = sum(1 for x in sizes if x >= case.persistence) if case.engine == "zero3" else 1
        return net.collective(2 * p, n, pieces)

    def rs(p):
        pieces = math.ceil(p / case.reduce_bucket) if case.engine == "zero3" else 1
        return net.collective(4 * p, n, pieces)

    L = mc.n_layers
    total = compute = comm = 0.0
    for micro in range(case.accum):
        sync = case.engine == "zero3" or micro == case.accum - 1
        ag_f = [ag(pb, bs)] * L
        ag_b = [ag(pb, bs) if i < L - 1 or case.engine == "zero3" else 0.0 for i in range(L)]
        rs_b = [rs(pb) if sync else 0.0] * L
        ag_r, rs_r = ag(pr, rsz), rs(pr) if sync else 0.0
        comm += ag_r + rs_r + sum(ag_f) + sum(ag_b) + sum(rs_b)
        compute += L * (f_b + b_b) + f_r + b_r
        if not overlap:
            continue
        fwd = ag_r + ag_f[0] + sum(max(f_b, ag_f[i + 1] if i + 1 < L else 0.0) for i in range(L)) + f_r
        bwd = b_r + sum(max(b_b, (ag_b[i - 1] if i > 0 else 0.0) + (rs_b[i + 1] if i + 1 < L else 0.0))
                        for i in reversed(range(L))) + rs_b[0] + rs_r
        total += fwd + bwd
    if not overlap:
        total = compute + comm
    opt = optimizer_seconds(num_params(mc) / n, dev)
    total += opt
    tokens_step = tokens * case.accum
    mfu = flops_per_token(mc, case.seq) * tokens_step / total / (dev.peak_tflops * 1e12)
    return {"step_s": total, "compute_s": compute, "comm_s": comm, "optimizer_s": opt,
            "exposed_comm_s": total - compute - opt, "tokens_per_s_per_gpu": tokens_step / total, "mfu": mfu,
            "block_compute_s": f_b + b_b, "block_allgather_s": ag(pb, bs), "block_reduce_scatter_s": rs(pb)}


def implied_eta(case: Case, published: float, dev: Device, net: Network) -> float | None:
    """The compute efficiency that makes the model predict ``published`` tokens/s per GPU (bisection)."""
    lo, hi = 1e-3, 1.0
    if step_time(case, hi, dev, net, True)["tokens_per_s_per_gpu"] < published:
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if step_time(case, mid, dev, net, True)["tokens_per_s_per_gpu"] < published else (lo, mid)
    return (lo + hi) / 2
