"""Past one machine, on paper: tokens/s per GPU and MFU of FSDP2 and ZeRO-3 on 8, 64 and 512 GPUs, predicted
from a measured single-GPU step and a bandwidth/latency model of the collectives, checked against published
multi-GPU figures. Runs on CPU (no GPU, no torch.distributed).

    python benchmarks/scaling_model.py [--measured RESULTS.json ...] [--models base large] [--gpus 8 64 512]
                                       [--target H100] [network flags] [--output DIR]

Inputs
  * Measured steps: ``benchmarks/throughput.py``'s results.json of single-GPU runs (default: the H200 sweeps in
    benchmarks/results/h200-2026-11-26-run2). Each point gives a compute efficiency
        eta = model FLOPs of the step / (step time - optimizer time) / the device's peak
    for its model, engine (ZeRO-3's hooks are in its own measurement) and eager or compiled. Every block then
    computes at that efficiency on the target GPU: a block's time per micro-batch = its FLOPs x tokens /
    (eta x target peak), a third forward and two thirds backward, plus the forward it recomputes under activation
    checkpointing. A model or engine/mode without a measurement borrows one of the same engine and mode (marked *).
    The point used is the one whose tokens per micro-batch are nearest the predicted run's.
  * Shape: ``model/flops.py``'s parameter sizes (bytes moved) and FLOPs per token (time computed).
  * Micro-batch and activation checkpointing: of the measured micro-batches and their halvings, with checkpointing
    off and on, those ``scaletrain estimate`` fits in the target's memory, the one with the most predicted tokens/s
    (``--micro-batch`` and ``--recompute`` to choose).
  * Network: an HGX/DGX H100 cluster by default, every figure a flag (benchmarks/step_model.py cites them).

The step model (collective times, what each engine sends, overlap, optimizer) is benchmarks/step_model.py.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_model import (  # noqa: E402
    DEVICES,
    Case,
    Device,
    Network,
    device,
    implied_eta,
    optimizer_seconds,
    step_time,
)
from scaletrain.model.flops import flops_per_token, num_params  # noqa: E402
from scaletrain.model.presets import ModelConfig, get_model_config  # noqa: E402

RUN2 = ROOT / "benchmarks" / "results" / "h200-2026-11-26-run2"
DEFAULT_MEASURED = [RUN2 / "tp_base" / "results.json", RUN2 / "tp_base_compile" / "results.json",
                    RUN2 / "tp_large_compile" / "results.json"]


@dataclass(frozen=True)
class Measured:
    """A single-GPU point of throughput.py and the compute efficiency it implies."""
    model: str
    engine: str
    compiled: bool
    micro_batch: int
    seq: int
    d_model: int
    eta: float
    mfu: float
    source: str

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq


def load_measured(paths: list[Path]) -> list[Measured]:
    out = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        a = data["args"]
        m = re.search(r"device (.+?), peak", data["header"])
        dev = device(m.group(1) if m else "unknown")
        peak = float(a.get("peak") or dev.peak_tflops) * 1e12
        mc = get_model_config(a["model_size"], n_layers=a.get("num_layers"))
        for r in data["rows"]:
            if r.get("status") != "ok" or r["engine"] == "plain" or r.get("activation_checkpointing"):
                continue
            tokens = r["micro_batch"] * a["seq"] * a["accum"]
            compute = r["step_s"] - optimizer_seconds(num_params(mc), dev)
            eta = flops_per_token(mc, a["seq"]) * tokens / compute / peak
            source = f"{Path(path).parent.name} {r['engine']} mb {r['micro_batch']} on {dev.name}"
            out.append(Measured(a["model_size"], r["engine"], bool(a.get("compile")), r["micro_batch"], a["seq"],
                                mc.d_model, eta, r["mfu"], source))
    return out


def pick(measured: list[Measured], model: str, d_model: int, engine: str, compiled: bool,
         tokens: int) -> tuple[Measured, bool]:
    """The point of this engine and mode for a run of ``tokens`` per micro-batch: of the same model if measured
    (else borrowed, True), the nearest in tokens per micro-batch, then in width."""
    same = [m for m in measured if m.engine == engine and m.compiled == compiled]
    if not same:
        raise LookupError(f"no measurement of {engine} {'compiled' if compiled else 'eager'}")
    own = [m for m in same if m.model == model]
    best = min(own or same, key=lambda m: (abs(math.log(m.tokens / tokens)), abs(math.log(m.d_model / d_model)),
                                           -m.tokens))
    return best, not own


def mpt(d: int, layers: int) -> ModelConfig:
    """An MPT shape (MHA, tied 50432-token embedding, GELU MLP of 4d) as a Llama block of the same parameters and
    FLOPs: SwiGLU's three matrices of width 8d/3 hold what GELU's two of width 4d do."""
    return ModelConfig(d_model=d, n_layers=layers, n_heads=d // 128, n_kv_heads=d // 128, ffn_dim=round(8 * d / 3),
                       vocab_size=50432, tie_embeddings=True)


TORCHTITAN = ("pytorch/torchtitan docs/performance.md (2024-12: Llama 3.1 8B, H100 96 GB at 500 W, NVLink, "
              "400 Gb/s RDMA per GPU, local batch 2, seq 8192, selective op AC)")
FOUNDRY = ("mosaicml/llm-foundry scripts/train/benchmarking/README.md (H100 80GB BF16 table, FSDP FULL_SHARD, "
           "amp_bf16)")
# (name, shape, gpus, micro-batch, seq, accumulation, recompute, compiled, published tokens/s per GPU)
REFERENCES = [
    ("torchtitan Llama-3.1-8B", "llama3-8b", 8, 2, 8192, 1, "selective-op", False, 5762, TORCHTITAN + " Table 1"),
    ("torchtitan Llama-3.1-8B", "llama3-8b", 128, 2, 8192, 1, "selective-op", False, 5605, TORCHTITAN + " Table 3"),
    ("torchtitan Llama-3.1-8B", "llama3-8b", 8, 2, 8192, 1, "selective-op", True, 6667, TORCHTITAN + " Table 1"),
    ("torchtitan Llama-3.1-8B", "llama3-8b", 128, 2, 8192, 1, "selective-op", True, 6514, TORCHTITAN + " Table 3"),
    ("llm-foundry MPT-7B", mpt(4096, 32), 8, 6, 2048, 1, "none", False, 10643, FOUNDRY + ": 46.44% MFU"),
    ("llm-foundry MPT-13B", mpt(5120, 40), 8, 2, 2048, 1, "none", False, 4792, FOUNDRY),
    ("llm-foundry MPT-13B", mpt(5120, 40), 64, 2, 2048, 1, "none", False, 4800, FOUNDRY),
    ("llm-foundry MPT-1B", mpt(2048, 24), 16, 20, 2048, 1, "none", False, 46037, FOUNDRY),
    ("llm-foundry MPT-1B", mpt(2048, 24), 64, 20, 2048, 1, "none", False, 44402, FOUNDRY),
]


def fits(model: str, engine: str, gpus: int, micro_batch: int, seq: int, ac: bool, dev: Device) -> tuple[bool, float]:
    """``scaletrain estimate``'s verdict and peak GiB for the run on ``gpus`` devices of ``dev``'s memory."""
    from benchmarks.common import engine_argv
    from scaletrain.cli import parse_config
    from scaletrain.estimate import estimate_memory

    argv = ["--model-size", model, "--micro-batch-size", str(micro_batch), "--max-seq-length", str(seq),
            "--mixed-precision", "bf16", "--data-kind", "synthetic"] + engine_argv(engine) + \
        (["--gradient-checkpointing"] if ac else [])
    cfg = parse_config(argv).for_world_size(gpus)
    est = estimate_memory(cfg, get_model_config(model), gpus, device_type="cuda", device_memory_gib=dev.memory_gib)
    return bool(est.fits), est.peak_bytes / 2**30


def candidates(sizes: list[int], fixed: int | None) -> list[int]:
    """Micro-batches to try: the measured ones and their halvings down to 1 (or just ``fixed``)."""
    if fixed:
        return [fixed]
    out = set()
    for s in sizes:
        while s >= 1:
            out.add(s)
            s //= 2
    return sorted(out, reverse=True)


def predictions(a, measured: list[Measured], dev: Device, net: Network) -> list[dict]:
    """For each model, engine and mode measured (or borrowed) and each GPU count: the micro-batch and activation
    checkpointing that fit the target and give the most tokens/s, with and without overlap."""
    rows = []
    for model in a.models:
        mc = get_model_config(model)
        for engine, compiled in (("fsdp", False), ("fsdp", True), ("zero3", False)):
            sizes = sorted({m.micro_batch for m in measured if m.engine == engine and m.compiled == compiled})
            if not sizes:
                continue
            for gpus in a.gpus:
                best = None
                for ac in ([a.recompute == "full"] if a.recompute else [False, True]):
                    for mb in candidates(sizes, a.micro_batch):
                        ok, gib = fits(model, engine, gpus, mb, a.seq, ac, dev)
                        if not ok:
                            continue
                        point, borrowed = pick(measured, model, mc.d_model, engine, compiled, mb * a.seq)
                        case = Case(mc, engine, gpus, mb, a.seq, a.accum, "full" if ac else "none")
                        with_o = step_time(case, point.eta, dev, net, True)
                        if best is None or with_o["tokens_per_s_per_gpu"] > best[0]["tokens_per_s_per_gpu"]:
                            best = (with_o, case, point, borrowed, gib)
                if best is None:
                    rows.append({"model": model, "engine": engine, "compiled": compiled, "gpus": gpus,
                                 "status": f"does not fit {dev.memory_gib} GiB at micro-batch 1"})
                    continue
                with_o, case, point, borrowed, gib = best
                rows.append({"model": model, "engine": engine, "compiled": compiled, "gpus": gpus,
                             "nodes": net.nodes(gpus), "micro_batch": case.micro_batch,
                             "checkpointing": case.recompute == "full", "estimate_gib": gib,
                             "global_batch_tokens": case.micro_batch * a.seq * a.accum * gpus,
                             "eta": point.eta, "eta_source": point.source, "borrowed": borrowed,
                             "extrapolated": point.micro_batch != case.micro_batch,
                             "overlap": with_o, "no_overlap": step_time(case, point.eta, dev, net, False),
                             "status": "ok"})
    return rows


def checks(measured: list[Measured], dev: Device, net: Network) -> list[dict]:
    rows = []
    for name, shape, gpus, mb, seq, accum, recompute, compiled, published, source in REFERENCES:
        mc = get_model_config(shape) if isinstance(shape, str) else shape
        point, _ = pick(measured, "", mc.d_model, "fsdp", compiled, mb * seq)
        case = Case(mc, "fsdp", gpus, mb, seq, accum, recompute)
        pred = step_time(case, point.eta, dev, net, True)
        rows.append({"reference": name, "gpus": gpus, "compiled": compiled, "micro_batch": mb, "seq": seq,
                     "recompute": recompute, "published": published, "predicted": pred["tokens_per_s_per_gpu"],
                     "error": pred["tokens_per_s_per_gpu"] / published - 1, "eta_used": point.eta,
                     "eta_source": point.source, "implied_eta": implied_eta(case, published, dev, net),
                     "source": source})
    return rows


def scaling_checks(rows: list[dict]) -> list[dict]:
    """Published and predicted ratios between GPU counts of the same reference: the network model alone (the
    compute efficiency cancels)."""
    out = []
    for i, r in enumerate(rows):
        for s in rows[i + 1:]:
            if s["reference"] == r["reference"] and s["compiled"] == r["compiled"] and s["gpus"] != r["gpus"]:
                pub, pred = s["published"] / r["published"], s["predicted"] / r["predicted"]
                out.append({"reference": r["reference"], "compiled": r["compiled"], "from": r["gpus"],
                            "to": s["gpus"], "published": pub, "predicted": pred, "error": pred / pub - 1})
    return out


def report(a, dev: Device, net: Network, measured, rows, refs, ratios) -> str:
    mode = {False: "eager", True: "compiled"}
    lines = [f"scaling model: target {dev.name} ({dev.peak_tflops} TFLOP/s bf16, {dev.hbm_tbs} TB/s, "
             f"{dev.memory_gib} GiB), {net.gpus_per_node} a node, NVLink ring {net.nvlink_busbw_gbs:.0f} GB/s, "
             f"{net.nics_per_node} x {net.nic_gbps:.0f} Gb/s NICs a node at {net.nic_efficiency:.0%} "
             f"({net.busbw(net.gpus_per_node + 1) / 1e9:.0f} GB/s ring across nodes), latency {net.base_us} us + "
             f"{net.nvlink_hop_us} us a NVLink hop + {net.net_hop_us} us a network hop; seq {a.seq}, bf16",
             "measured single-GPU points (eta: compute efficiency, the optimizer step taken out):"]
    lines += [f"  {m.source:<48} {mode[m.compiled]:>8}  MFU {m.mfu:6.1%}  eta {m.eta:6.1%}" for m in measured]
    lines.append("")
    lines.append(f"{'model':6} {'engine':6} {'mode':8} {'GPUs':>5} {'mb':>4} {'AC':>3} {'GiB':>6} {'batch':>7} "
                 f"{'step ms':>8} {'tok/s/GPU':>10} {'MFU':>6} {'exposed':>8} | {'no overlap':>10} {'MFU':>6}  eta")
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['model']:6} {r['engine']:6} {mode[r['compiled']]:8} {r['gpus']:5d}  {r['status']}")
            continue
        o, w = r["overlap"], r["no_overlap"]
        lines.append(f"{r['model']:6} {r['engine']:6} {mode[r['compiled']]:8} {r['gpus']:5d} {r['micro_batch']:4d} "
                     f"{'on' if r['checkpointing'] else 'off':>3} {r['estimate_gib']:6.1f} "
                     f"{r['global_batch_tokens'] / 1e6:6.1f}M {o['step_s'] * 1e3:8.0f} "
                     f"{o['tokens_per_s_per_gpu']:10,.0f} {o['mfu']:6.1%} {o['exposed_comm_s'] / o['step_s']:8.1%} | "
                     f"{w['tokens_per_s_per_gpu']:10,.0f} {w['mfu']:6.1%}  {r['eta']:.1%} from "
                     f"{r['eta_source'].split(' on ')[0]}{' *' if r['borrowed'] else ''}")
    lines += ["  mb, AC: the micro-batch and activation checkpointing that fit and give the most tokens/s; GiB: "
              "scaletrain estimate's peak per GPU; batch: global tokens per step; exposed: the step's share spent "
              "waiting on collectives; eta: the compute efficiency used and the point it comes from (a micro-batch "
              "below the measured ones takes the nearest one's: optimistic where matmuls get small)",
              "  * no measurement of this model in this engine and mode: eta borrowed from the nearest point of "
              "another model"]
    lines += ["", "check against published figures (FSDP, bf16, H100; eta from our FSDP2 point of the same mode):",
              f"{'reference':24} {'mode':8} {'GPUs':>5} {'mb x seq':>9} {'published':>10} {'predicted':>10} "
              f"{'error':>7} {'eta used':>9} {'implied':>8}"]
    for r in refs:
        implied = f"{r['implied_eta']:.1%}" if r["implied_eta"] else "-"
        lines.append(f"{r['reference']:24} {mode[r['compiled']]:8} {r['gpus']:5d} {r['micro_batch']:>3}x{r['seq']:<5} "
                     f"{r['published']:10,.0f} {r['predicted']:10,.0f} {r['error']:+7.1%} {r['eta_used']:9.1%} "
                     f"{implied:>8}")
    lines.append("  implied: the compute efficiency at which the model gives the published figure")
    lines += ["", "scaling alone (tokens/s per GPU at more GPUs over fewer, same reference: eta cancels):"]
    lines += [f"  {r['reference']:24} {mode[r['compiled']]:8} {r['from']:>4} -> {r['to']:<4} published "
              f"{r['published']:.3f}  predicted {r['predicted']:.3f}  error {r['error']:+.1%}" for r in ratios]
    lines += ["", "sources:"] + sorted({f"  {r['source']}" for r in refs})
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measured", nargs="+", type=Path, default=DEFAULT_MEASURED,
                   help="throughput.py results.json files of single-GPU runs")
    p.add_argument("--models", nargs="+", default=["base", "large"])
    p.add_argument("--gpus", nargs="+", type=int, default=[8, 64, 512])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--micro-batch", type=int, help="default: the largest measured that fits the target")
    p.add_argument("--recompute", choices=["none", "full"], help="default: off unless nothing fits without")
    p.add_argument("--target", default="H100", help=f"target GPU: {', '.join(DEVICES)}")
    p.add_argument("--target-memory-gib", type=float, help="default: the target's")
    n = Network()
    p.add_argument("--gpus-per-node", type=int, default=n.gpus_per_node)
    p.add_argument("--nvlink-busbw", type=float, default=n.nvlink_busbw_gbs, help="GB/s of a ring on one node")
    p.add_argument("--nics-per-node", type=int, default=n.nics_per_node)
    p.add_argument("--nic-gbps", type=float, default=n.nic_gbps, help="line rate of one NIC, Gb/s")
    p.add_argument("--nic-efficiency", type=float, default=n.nic_efficiency)
    p.add_argument("--base-latency-us", type=float, default=n.base_us)
    p.add_argument("--nvlink-hop-us", type=float, default=n.nvlink_hop_us)
    p.add_argument("--net-hop-us", type=float, default=n.net_hop_us)
    p.add_argument("--output", type=Path, help="folder for scaling_model.json and .txt")
    a = p.parse_args(argv)
    net = Network(a.gpus_per_node, a.nvlink_busbw, a.nics_per_node, a.nic_gbps, a.nic_efficiency,
                  a.base_latency_us, a.nvlink_hop_us, a.net_hop_us)
    dev = device(a.target)
    if a.target_memory_gib:
        dev = replace(dev, memory_gib=a.target_memory_gib)
    measured = load_measured(a.measured)
    rows = predictions(a, measured, dev, net)
    refs = checks(measured, dev, net)
    ratios = scaling_checks(refs)
    text = report(a, dev, net, measured, rows, refs, ratios)
    print(text)
    if a.output:
        a.output.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/scaling_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
        (a.output / "scaling_model.txt").write_text(f"$ {command}\n{text}\n")
        (a.output / "scaling_model.json").write_text(json.dumps(
            {"command": command, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "device": asdict(dev),
             "network": asdict(net), "measured": [asdict(m) for m in measured], "predictions": rows,
             "checks": refs, "scaling_checks": ratios}, indent=1))
        print(f"wrote {a.output / 'scaling_model.txt'}")


if __name__ == "__main__":
    main()
