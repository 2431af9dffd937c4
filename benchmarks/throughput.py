"""Find the fastest micro-batch per engine for a model size: tokens/s, MFU and peak memory.

    python benchmarks/throughput.py --model-size large --num-layers 4 --engines fsdp zero2 zero3 \\
        --activation-checkpointing off on --seq 2048

For each engine x activation-checkpointing setting, micro-batch sizes double from
``--min-micro-batch`` until the device runs out of memory (caught; the sweep goes on with
the next configuration), ``--max-micro-batch``, a point that ``scaletrain estimate`` says cannot
fit the device (skipped without running: the device's memory, or ``--max-memory-gib``), or two
doublings in a row that did not beat the best tokens/s so far. Each point runs ``--warmup`` then
``--steps`` measured optimizer steps on synthetic data. ``--num-layers K`` keeps the
model's width and heads with fewer layers so a large shape fits one GPU: per-layer
throughput and MFU carry over; memory and the best micro-batch of the full depth differ.

Defaults follow the device: on a GPU the large preset, seq 2048, micro-batches up to 64, 2 warm-up and 3
measured steps; on a CPU the tiny preset, seq 256, up to 16, 1 and 2, fp32 (small's points take a minute
each on 2 cores: 25 minutes for the six configurations).
Each point's table row holds the estimate beside the measured peak.

Writes to ``--output`` (default benchmarks/results/<timestamp>): results.json, table.txt,
throughput.png (tokens/s and MFU against micro-batch, one line per configuration),
best_command.sh and, when a DeepSpeed configuration ran, best_ds_config.json.
``--max-memory-gib`` caps memory: on CUDA via the allocator (a real OOM); on a CPU the
growth of peak RSS over the start of the point is checked after each step (simulated OOM).
With one rank every point runs in a fresh process (engines do not hand all memory back when
dropped; DeepSpeed's kept up to 60 GiB between points on an H200). Launch under
torchrun/deepspeed for several GPUs; then points run in-process and rank 0 writes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_runner, device_name, sync  # noqa: E402

from scaletrain.engine import get_engine_class  # noqa: E402
from scaletrain.metrics import mfu, peak_tflops  # noqa: E402
from scaletrain.model import flops_per_token, get_model_config, num_params  # noqa: E402


class OutOfMemory(Exception):
    pass


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _is_oom(e: BaseException) -> bool:
    from scaletrain.observe import is_oom

    return isinstance(e, OutOfMemory) or is_oom(e) or "out of memory" in str(e).lower()


_RESULT = "THROUGHPUT_POINT_RESULT "


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def point_argv(ac: bool, mbs: int, a) -> list[str]:
    """The training flags of one point (the engine's are added by whoever builds it)."""
    return (["--model-size", a.model_size, "--micro-batch-size", str(mbs), "--max-seq-length", str(a.seq),
             "--gradient-accumulation-steps", str(a.accum), "--mixed-precision", a.precision,
             "--max-steps", "100000", "--warmup-steps", "10", "--seed", "0"]
            + (["--num-layers", str(a.num_layers)] if a.num_layers else [])
            + (["--gradient-checkpointing"] if ac else []) + (["--compile"] if a.compile else []))


def measure(kind: str, ac: bool, mbs: int, a, env) -> dict:
    """One point of the sweep in this process: build, warm up, time ``a.steps`` optimizer steps."""
    argv = point_argv(ac, mbs, a)
    base_rss = _peak_rss_gib()
    runner = cfg = None
    try:
        runner, cfg = build_runner(kind, argv, env)
        vocab = get_model_config(a.model_size).vocab_size
        g = torch.Generator().manual_seed(0)
        step_tokens = mbs * a.accum * a.seq * env.world_size
        batches = [(x.to(env.device), x.to(env.device), step_tokens) for x in
                   (torch.randint(vocab, (mbs, a.seq), generator=g) for _ in range(a.accum))]

        def step(runner=runner):
            runner.train_step(batches)
            if env.device.type == "cpu" and a.max_memory_gib and _peak_rss_gib() - base_rss > a.max_memory_gib:
                raise OutOfMemory(f"peak RSS grew by {_peak_rss_gib() - base_rss:.2f} GiB > --max-memory-gib "
                                  f"{a.max_memory_gib}")

        for _ in range(a.warmup):
            step()
        sync(env.device)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync(env.device)
        dt = (time.perf_counter() - t0) / a.steps
        tokens = mbs * a.accum * a.seq * env.world_size
        mem = (torch.cuda.max_memory_allocated(env.device) / 2**30 if env.device.type == "cuda"
               else _peak_rss_gib() - base_rss)  # CPU: what the point added to the process's peak
        row = {"status": "ok", "step_s": dt, "tokens_per_s": tokens / dt,
               "tokens_per_s_per_device": tokens / dt / env.world_size, "peak_memory_gib": mem}
        if a.peak:
            row["mfu"] = mfu(flops_per_token(runner_model_cfg(a), a.seq), row["tokens_per_s_per_device"], a.peak)
        if hasattr(runner, "ds_config"):
            row["ds_config"] = runner.ds_config
        return row
    except Exception as e:  # noqa: BLE001 - OOM is an expected outcome of the sweep
        if not _is_oom(e):
            raise
        return {"status": "oom", "error": str(e).splitlines()[0][:200]}
    finally:
        del runner, cfg
        _release(env.device)


def run_point(kind: str, ac: bool, mbs: int, a, env) -> dict:
    """A point in a fresh process (default with one rank: engines, DeepSpeed's above all, do not give
    all memory back when dropped, which skews later points), or in this one."""
    if env is not None:
        return measure(kind, ac, mbs, a, env)
    point = json.dumps({"kind": kind, "ac": ac, "mbs": mbs})
    proc = subprocess.run([sys.executable, __file__, "--point", point] + sys.argv[1:], capture_output=True,
                          text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    if _is_oom(RuntimeError(proc.stderr[-20000:])):
        return {"status": "oom", "error": "process died out of memory"}
    raise RuntimeError(f"point {point} failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}")


def device_memory_gib(a, device: torch.device) -> float | None:
    """What a point may use: --max-memory-gib, else the GPU's memory, else this machine's RAM over its ranks."""
    if a.max_memory_gib:
        return a.max_memory_gib
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    import psutil

    return psutil.virtual_memory().total / 2**30 / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def estimate_point(kind: str, ac: bool, mbs: int, a, world: int, device: torch.device, memory: float | None):
    """``scaletrain estimate`` for one point (None for the plain loop, which no engine runs)."""
    if kind == "plain":
        return None
    from common import engine_argv

    from scaletrain.cli import parse_config
    from scaletrain.estimate import estimate_memory

    cfg = parse_config(point_argv(ac, mbs, a) + ["--data-kind", "synthetic"] + engine_argv(kind))
    return estimate_memory(cfg, runner_model_cfg(a), world, resident=device.type == "cpu",
                           device_type=device.type, device_memory_gib=memory)


def runner_model_cfg(a):
    return get_model_config(a.model_size, n_layers=a.num_layers)


def sweep_sizes(a) -> list[int]:
    if a.micro_batches:
        return sorted(a.micro_batches)
    sizes, m = [], a.min_micro_batch
    while m <= a.max_micro_batch:
        sizes.append(m)
        m *= 2
    return sizes


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_mfu = any("mfu" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_mfu else 1, figsize=(12 if has_mfu else 6, 4.5), squeeze=False)
    for label in dict.fromkeys(r["config"] for r in rows):
        ok = [r for r in rows if r["config"] == label and r["status"] == "ok"]
        if not ok:
            continue
        xs = [r["micro_batch"] for r in ok]
        axes[0][0].plot(xs, [r["tokens_per_s"] for r in ok], marker="o", label=label)
        if has_mfu:
            axes[0][1].plot(xs, [100 * r["mfu"] for r in ok], marker="o", label=label)
    axes[0][0].set(xlabel="micro-batch", ylabel="tokens/s (all devices)", xscale="log", title=title)
    axes[0][0].set_xscale("log", base=2)
    axes[0][0].legend()
    if has_mfu:
        axes[0][1].set(xlabel="micro-batch", ylabel="MFU %", title="MFU")
        axes[0][1].set_xscale("log", base=2)
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_command(best: dict, a, world: int, ds_path: Path) -> str:
    flags = (f"--model-size {a.model_size} --micro-batch-size {best['micro_batch']} --max-seq-length {a.seq} "
             f"--gradient-accumulation-steps {a.accum} --mixed-precision {a.precision}")
    flags += " --gradient-checkpointing" if best["activation_checkpointing"] else ""
    flags += " --compile" if a.compile else ""
    n = max(world, 1)
    if best["engine"] == "fsdp":
        return f"torchrun --nproc_per_node {n} launch/pretrain.py --engine fsdp {flags}"
    return f"deepspeed --num_gpus {n} launch/pretrain.py --ds_config {ds_path} {flags}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", help="default: large on a GPU, tiny on a CPU")
    p.add_argument("--num-layers", type=int, help="fewer layers, same width (to fit one GPU)")
    p.add_argument("--engines", nargs="+", default=["fsdp", "zero2", "zero3"])
    p.add_argument("--activation-checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--micro-batches", type=int, nargs="+", help="explicit list instead of doubling")
    p.add_argument("--min-micro-batch", type=int, default=1)
    p.add_argument("--max-micro-batch", type=int, help="default: 64 on a GPU, 16 on a CPU")
    p.add_argument("--seq", type=int, help="default: 2048 on a GPU, 256 on a CPU")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--warmup", type=int, help="default: 2 on a GPU, 1 on a CPU")
    p.add_argument("--steps", type=int, help="default: 3 on a GPU, 2 on a CPU")
    p.add_argument("--patience", type=int, default=2,
                   help="stop a configuration's sweep after this many doublings without a better tokens/s")
    p.add_argument("--precision", default=None, help="bf16 on CUDA, fp32 on CPU by default")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: from the GPU name)")
    p.add_argument("--max-memory-gib", type=float, help="memory cap (CUDA allocator; CPU: peak-RSS growth)")
    p.add_argument("--output", help="default: benchmarks/results/<timestamp>")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure every point in this process (always so under a multi-rank launcher)")
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: measure one point and print it
    a = p.parse_args()
    gpu = torch.cuda.is_available()
    for name, on_gpu, on_cpu in (("model_size", "large", "tiny"), ("max_micro_batch", 64, 16), ("seq", 2048, 256),
                                 ("warmup", 2, 1), ("steps", 3, 2), ("precision", "bf16", "fp32")):
        if getattr(a, name) is None:
            setattr(a, name, on_gpu if gpu else on_cpu)

    uses_ds = any(k.startswith("zero") for k in a.engines)
    isolate = not a.no_isolate and int(os.environ.get("WORLD_SIZE", "1")) == 1 and a.point is None
    env = None if isolate else get_engine_class("deepspeed" if uses_ds else "fsdp").init_distributed()
    device = env.device if env else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = device_name(device)
    a.peak = a.peak_tflops or (peak_tflops(dev, a.precision) if device.type == "cuda" else None)
    if device.type == "cuda" and a.max_memory_gib and env is not None:
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.max_memory_gib / total), device)
    if a.point:
        pt = json.loads(a.point)
        print(_RESULT + json.dumps(measure(pt["kind"], pt["ac"], pt["mbs"], a, env)), flush=True)
        sys.stdout.flush()
        os._exit(0)
    is_main = env is None or env.is_main
    world = env.world_size if env else 1
    out = Path(a.output or Path(__file__).resolve().parent / "results" / time.strftime("%Y%m%d-%H%M%S"))
    mcfg = runner_model_cfg(a)
    header = (f"throughput: {a.model_size}" + (f" truncated to {a.num_layers} layers" if a.num_layers else "")
              + f" ({num_params(mcfg) / 1e6:,.1f}M params, d_model {mcfg.d_model}, {mcfg.n_heads} heads), seq {a.seq}, "
              f"{a.precision}, accumulation {a.accum}, world {world}, device {dev}, "
              f"peak {a.peak or '-'} TFLOP/s; {a.warmup} warm-up + {a.steps} measured steps per point")
    if device.type == "cpu":
        header += ("\nnote: on CPU 'memory GiB' is the growth of the peak RSS of the point's fresh process, the "
                   "libraries' one-time set-up and the whole-model build included; 'estimate' is the run's tensors "
                   "(benchmarks/memory_estimate.py compares the two like for like)")
    if a.num_layers:
        header += ("\nnote: --num-layers keeps width and heads; per-layer throughput and MFU carry over to the "
                   "full depth, memory and the largest micro-batch that fits do not")
    if is_main:
        print(header, flush=True)
    rows = []
    memory = device_memory_gib(a, device)
    if is_main:
        print(f"memory per device for the estimate: {memory:.1f} GiB" if memory else
              "memory per device for the estimate: unknown (give --max-memory-gib)", flush=True)
    for kind in a.engines:
        for ac in a.activation_checkpointing:
            best, since_best = 0.0, 0
            for mbs in sweep_sizes(a):
                est = estimate_point(kind, ac == "on", mbs, a, world, device, memory)
                config = f"{kind}{' +AC' if ac == 'on' else ''}"
                if est is not None and est.fits is False:
                    r = {"status": "skipped", "error": f"the estimate, {est.peak_bytes / 2**30:.2f} GiB, does not fit "
                                                       f"{memory:.1f} GiB"}
                else:
                    r = run_point(kind, ac == "on", mbs, a, env)
                r.update(engine=kind, activation_checkpointing=ac == "on", micro_batch=mbs, config=config,
                         estimate_gib=est.peak_bytes / 2**30 if est is not None else None)
                rows.append(r)
                if is_main:
                    if r["status"] == "ok":
                        m = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else "    -"
                        print(f"  {r['config']:<16} mb {mbs:>4}  {r['tokens_per_s']:>12,.0f} tok/s  MFU {m}  "
                              f"{r['peak_memory_gib']:7.2f} GiB (estimate {r['estimate_gib']:.2f})  "
                              f"{r['step_s'] * 1e3:8.1f} ms/step", flush=True)
                    else:
                        what = "skipped" if r["status"] == "skipped" else "out of memory"
                        print(f"  {r['config']:<16} mb {mbs:>4}  {what}: {r['error']}", flush=True)
                if r["status"] != "ok":
                    break  # larger micro-batches will not fit either
                if r["tokens_per_s"] > best:
                    best, since_best = r["tokens_per_s"], 0
                else:
                    since_best += 1
                    if since_best >= a.patience:
                        if is_main:
                            print(f"  {config:<16} stops: no better tokens/s in {a.patience} doublings", flush=True)
                        break
    if is_main:
        write_outputs(rows, a, world, out, header)
    sys.stdout.flush()
    os._exit(0)  # see launch/pretrain.py: skip teardown with live gloo threads


def write_outputs(rows: list[dict], a, world: int, out: Path, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = (f"{'config':<16}{'micro-batch':>12}{'tokens/s':>14}{'MFU':>8}{'memory GiB':>12}{'estimate':>10}"
               f"{'ms/step':>10}")
    lines = [header, "", columns]
    for r in rows:
        est = f"{r['estimate_gib']:.2f}" if r.get("estimate_gib") is not None else "-"
        if r["status"] == "ok":
            m = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
            lines.append(f"{r['config']:<16}{r['micro_batch']:>12}{r['tokens_per_s']:>14,.0f}{m:>8}"
                         f"{r['peak_memory_gib']:>12.2f}{est:>10}{r['step_s'] * 1e3:>10.1f}")
        else:
            what = "skipped" if r["status"] == "skipped" else "OOM"
            lines.append(f"{r['config']:<16}{r['micro_batch']:>12}{what:>14}{'':>8}{'':>12}{est:>10}")
    ok = [r for r in rows if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["tokens_per_s"]) if ok else None
    if best:
        cmd = best_command(best, a, world, out / "best_ds_config.json")
        lines += ["", f"best: {best['config']} micro-batch {best['micro_batch']}: {best['tokens_per_s']:,.0f} tokens/s"
                  + (f", MFU {100 * best['mfu']:.1f}%" if "mfu" in best else ""), f"command: {cmd}"]
        (out / "best_command.sh").write_text("#!/usr/bin/env bash\n# " + header.replace("\n", "\n# ") + f"\n{cmd}\n")
        ds_rows = [r for r in ok if "ds_config" in r]
        if "ds_config" in best:
            ds_rows = [best]
        if ds_rows:
            best_ds = max(ds_rows, key=lambda r: r["tokens_per_s"])
            (out / "best_ds_config.json").write_text(json.dumps(best_ds["ds_config"], indent=2) + "\n")
            lines.append(f"best DeepSpeed configuration ({best_ds['config']}, micro-batch {best_ds['micro_batch']}) "
                         f"-> {out / 'best_ds_config.json'}")
    else:
        lines += ["", "no configuration fitted in memory"]
    table = "\n".join(lines)
    print("\n" + table)
    (out / "table.txt").write_text(table + "\n")
    clean = [{k: v for k, v in r.items() if k != "ds_config"} for r in rows]
    (out / "results.json").write_text(json.dumps({"header": header, "args": {k: v for k, v in vars(a).items()},
                                                  "rows": clean, "best": best and {k: v for k, v in best.items()
                                                                                   if k != "ds_config"}},
                                                 indent=2, default=str))
    plot(rows, out / "throughput.png", f"{a.model_size}" + (f" ({a.num_layers} layers)" if a.num_layers else ""))
    print(f"wrote {out}/(results.json, table.txt, throughput.png, best_command.sh)")


if __name__ == "__main__":
    main()
