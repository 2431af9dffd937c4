"""Step time with --document-masking against plain causal attention, in the same process on the same rows.

    python benchmarks/document_masking.py [--model-size small] [--seq-len 1024] [--batch 4] [--rounds 5]

Rows are packed from the embedded sample corpus (its documents and EOS tokens, byte-level ids), so the
documents per row are a real corpus's. Each round times one forward+backward+optimizer step of every mode,
modes interleaved (machines here are shared and noisy); the median per mode is reported and its ratio to
causal. Modes: ``causal`` (SDPA, is_causal), ``mask`` (SDPA with the exact boolean document mask: what CPU
runs), and on CUDA ``flex`` (FlexAttention with a block mask, compiled: what a GPU run uses), whose
logits and gradients are also checked against ``mask`` (torch 2.13 has no FlexAttention backward on CPU).
Goal on a GPU: flex <= 1.15x causal. Writes benchmarks/results/<device>/document_masking_<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, sync  # noqa: E402
from scaletrain.cli import parse_config  # noqa: E402
from scaletrain.data.loader import build_loader  # noqa: E402
from scaletrain.data.sample import prepare_sample  # noqa: E402
from scaletrain.model import get_model_config  # noqa: E402
from scaletrain.trainer import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="small")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="autocast to bf16 (default on CUDA)")
    p.add_argument("--output", help="folder for the results (default: benchmarks/results/<device>)")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = a.bf16 or device.type == "cuda"
    shards = prepare_sample(Path(tempfile.mkdtemp()) / "sample", quiet=True)
    cfg = parse_config(["--data-dir", str(shards), "--max-seq-length", str(a.seq_len), "--batch-size", str(a.batch)])
    loader = build_loader(cfg, 0, 1)
    eos = loader.tokenizer.eos_id
    mc = get_model_config(a.model_size, n_layers=a.num_layers, vocab_size=512,
                          max_seq_len=max(a.seq_len, get_model_config(a.model_size).max_seq_len))
    model = build_model(mc, device=device, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    batches = [tuple(t.to(device) for t in next(loader)[:2]) for _ in range(a.rounds + 1)]
    docs_per_row = statistics.mean(float((x == eos).sum(1).float().mean()) + 1 for x, _ in batches)
    modes = {"causal": (None, False), "mask": (eos, False)}
    if device.type == "cuda":
        modes["flex"] = (eos, True)

    def step(mode: str, x, y) -> float:
        model.set_document_masking(modes[mode][0], restart_positions=False, flex=modes[mode][1])
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, labels=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    check = {}
    if "flex" in modes:  # flex against the exact mask: logits and gradients, fp32
        x, y = batches[0]
        for mode in ("mask", "flex"):
            model.set_document_masking(eos, flex=mode == "flex")
            loss = model(x, labels=y)
            loss.backward()
            check[mode] = (loss.item(), torch.cat([q.grad.flatten() for q in model.parameters()]).clone())
            model.zero_grad(set_to_none=True)
        g0, g1 = check["mask"][1], check["flex"][1]
        check = {"loss_gap": abs(check["mask"][0] - check["flex"][0]),
                 "grad_rel_l2": float((g1 - g0).norm() / g0.norm())}
    for mode in modes:  # warm-up (compiles flex)
        step(mode, *batches[0])
    times = {m: [] for m in modes}
    for x, y in batches[1:]:
        for mode in modes:
            times[mode].append(step(mode, x, y))
    med = {m: statistics.median(t) for m, t in times.items()}
    rows = {m: {"median_s": med[m], "x_causal": med[m] / med["causal"], "times_s": times[m]} for m in modes}
    name = device_name(device)
    lines = [f"document_masking: {a.model_size} ({mc.n_layers} layers), {a.batch} x {a.seq_len} tokens, "
             f"{'bf16' if bf16 else 'fp32'}, {name}; {docs_per_row:.1f} documents per row (sample corpus)"]
    lines += [f"  {m:7} {r['median_s'] * 1e3:9.1f} ms/step  {r['x_causal']:.3f}x causal" for m, r in rows.items()]
    if check:
        lines.append(f"  flex vs mask (fp32): loss gap {check['loss_gap']:.2e}, gradient rel. L2 "
                     f"{check['grad_rel_l2']:.2e}")
    print("\n".join(lines))
    folder = f"cpu-{os.cpu_count()}core" if device.type == "cpu" else name.replace(" ", "-").lower()
    out = Path(a.output) if a.output else ROOT / "benchmarks" / "results" / folder
    dest = out / f"document_masking_{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"command": " ".join(sys.argv), "device": name, "docs_per_row": docs_per_row,
                                "modes": rows, "flex_check": check}, indent=1))
    dest.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
