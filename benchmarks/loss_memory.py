"""The loss's memory and time at a large vocabulary: ``model/loss.py`` (chunks, the gradient written over the
logits) against ``F.cross_entropy(logits.float(), labels)`` (what the model did before, and what most loops do),
on the same model, rows and weights, in one run.

    python benchmarks/loss_memory.py [--vocab 128256] [--width 512] [--layers 2] [--tokens 4096]
                                     [--precision bf16 fp32] [--repeats 3] [--output DIR]

Each case is a fresh process: the model (Llama-3's vocabulary by default, few narrow layers so the loss is most
of the memory), one warm-up forward and backward, then ``--repeats`` timed ones; memory is the peak above the
start of the timed part: on CPU resident memory (``VmHWM`` after ``/proc/self/clear_refs``, with glibc giving
every block of 64 KiB or more its own mapping so a freed tensor leaves it at once), on a GPU
``torch.cuda.max_memory_allocated``. Both paths produce the same loss and gradients (``tests/test_model.py``);
the run checks the losses agree. Writes benchmarks/results/<device>/loss_memory_<time>.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_env, own_mappings, rss_mib  # noqa: E402


def worker(a: argparse.Namespace) -> None:
    import dataclasses

    import torch
    import torch.nn.functional as F

    from scaletrain.model import Llama, get_model_config

    own_mappings()  # freed tensors leave the resident set
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    mc = dataclasses.replace(get_model_config("small"), vocab_size=a.vocab, d_model=a.width, n_layers=a.layers,
                             n_heads=a.width // 64, n_kv_heads=a.width // 64, ffn_dim=a.width * 8 // 3 // 64 * 64)
    model = Llama(mc).to(device=device, dtype=dtype)
    rows = a.tokens // 1024
    ids = torch.randint(0, a.vocab, (rows, 1024), device=device)
    labels = torch.randint(0, a.vocab, (rows, 1024), device=device)

    def step() -> float:
        if a.path == "chunked":
            loss = model(ids, labels=labels, reduction="sum")
        else:
            logits = model(ids)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        loss.backward()
        return float(loss)

    step()
    model.zero_grad(set_to_none=False)  # the gradients' memory stays allocated, outside the measured part
    own_mappings()  # what the warm-up freed into the heap goes back
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = rss_mib("VmRSS")
    times, loss = [], 0.0
    for _ in range(a.repeats):
        t = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=False)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mib("VmHWM")) - start
    name = torch.cuda.get_device_name() if cuda else "cpu-2core"
    print(json.dumps({"peak_mib": peak, "step_s": sorted(times)[len(times) // 2], "loss": loss, "device": name}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per forward, in rows of 1024")
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--worker", choices=["chunked", "plain"], dest="path", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.path:
        a.precision = a.precision[0]
        return worker(a)
    results, lines = [], []
    for precision in a.precision:
        got = {}
        for path in ("plain", "chunked"):
            cmd = [sys.executable, __file__, "--worker", path, "--precision", precision, "--vocab", str(a.vocab),
                   "--width", str(a.width), "--layers", str(a.layers), "--tokens", str(a.tokens),
                   "--repeats", str(a.repeats)]
            env = {**child_env(), "OMP_NUM_THREADS": "2"}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            got[path] = json.loads(out.stdout.strip().splitlines()[-1])
        plain, chunked = got["plain"], got["chunked"]
        if abs(plain["loss"] - chunked["loss"]) > 1e-4 * abs(plain["loss"]):
            raise SystemExit(f"{precision}: the losses differ: {plain['loss']} against {chunked['loss']}")
        row = {"precision": precision, "vocab": a.vocab, "tokens": a.tokens, "plain": plain, "chunked": chunked,
               "memory_ratio": chunked["peak_mib"] / plain["peak_mib"],
               "time_ratio": chunked["step_s"] / plain["step_s"]}
        results.append(row)
        lines.append(f"{precision:5} vocab {a.vocab} x {a.tokens} tokens: peak above start "
                     f"{plain['peak_mib']:,.0f} MiB (F.cross_entropy on fp32 logits) -> "
                     f"{chunked['peak_mib']:,.0f} MiB (chunked) = "
                     f"{row['memory_ratio']:.2f}x; forward+backward {plain['step_s']:.2f} s -> "
                     f"{chunked['step_s']:.2f} s = {row['time_ratio']:.2f}x")
    device = results[0]["plain"]["device"].replace(" ", "-").lower()
    header = (f"loss memory and time, model width {a.width}, {a.layers} layers, on {results[0]['plain']['device']} "
              f"(median of {a.repeats}; python benchmarks/loss_memory.py)")
    text = "\n".join([header, *lines])
    print(text)
    out = Path(a.output) / device
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"loss_memory_{stamp}.json").write_text(json.dumps(results, indent=1))
    (out / f"loss_memory_{stamp}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
