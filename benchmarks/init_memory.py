"""Peak memory per rank while building and initialising a model: the sharded build (FSDP2 on the meta device,
ZeRO-3 under ``deepspeed.zero.Init``, each rank filling only its part) against the whole-model build every rank
did before, from random weights and from ``--init-from`` a Hugging Face folder (safetensors, or the older
pytorch_model*.bin), all in the same run.

    python benchmarks/init_memory.py [--model-size base] [--engines fsdp zero3] [--world 2] [--modes random hf bin]

Each case is a fresh torchrun of this file's worker on CPU (gloo). A worker resets its peak RSS once torch,
the engine and the process group are up (``/proc/self/clear_refs``), builds and fills the model, and reports
its peak RSS above where it started:
  * ``build+init``: model built, sharded and its weights filled (ZeRO-3: read as ``deepspeed.initialize`` is
    entered; FSDP2: the engine's construction, whose optimizer state is allocated at the first step);
  * ``engine``: once the engine exists (ZeRO-3 adds its fp32 partition copies and buckets).
against the model's fp32 bytes. Goal: build+init <= 0.6x the full model per rank at world 2 (1.0x or more
for a whole model per rank). The Hugging Face folders are written once, in bf16 as models ship, into a temp dir.
Writes benchmarks/results/cpu-<N>core/init_memory_<time>.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_env, engine_argv, free_port, rss_mib  # noqa: E402


def worker(a: argparse.Namespace) -> None:
    import torch.distributed as dist

    from scaletrain.cli import parse_config
    from scaletrain.engine import get_engine_class
    from scaletrain.model import num_params
    from scaletrain.model.weights import RandomWeights
    from scaletrain.run import model_config_for
    from scaletrain.trainer import build_model

    cfg = parse_config(a.args)
    cls = get_engine_class(cfg.resolved_engine)
    env = cls.init_distributed()
    cfg = cls.resolve_config(cfg, env.world_size, env.device.type)
    cfg = cfg.replace(warmup_steps=cfg.warmup)
    source = None
    if a.init_from:
        from scaletrain.checkpoint.init_from import open_init_source

        source = open_init_source(a.init_from)
    mc = model_config_for(cfg, None, source.model_config if source else None)
    peaks = {}
    if cls.name == "deepspeed":
        import deepspeed

        real = deepspeed.initialize

        def initialize(*args, **kwargs):
            peaks["build+init"] = rss_mib("VmHWM")
            return real(*args, **kwargs)

        deepspeed.initialize = initialize
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = rss_mib("VmRSS")
    t0 = time.perf_counter()
    if a.mode == "whole":  # what every rank did before: the whole model, initialised, then handed to the engine
        model = build_model(mc, seed=cfg.seed)
        weights = source
    else:
        model = cls.build_model(mc, cfg, env)
        weights = source or RandomWeights(cfg.seed)
    engine = cls(model, cfg, env, weights=weights)
    seconds = time.perf_counter() - t0
    peaks["engine"] = rss_mib("VmHWM")
    peaks.setdefault("build+init", peaks["engine"])
    out = {"rank": env.rank, "start_mib": start, "seconds": seconds, "full_model_mib": num_params(mc) * 4 / 2**20,
           **{f"{k}_mib": v - start for k, v in peaks.items()}}
    Path(a.out).with_suffix(f".rank{env.rank}.json").write_text(json.dumps(out))
    engine.close()


def write_hf_folder(model_size: str, folder: Path) -> None:
    """A Hugging Face folder of the preset, bf16, written tensor by tensor (no full model in memory)."""
    import torch

    from scaletrain.convert import write_safetensors
    from scaletrain.model import Llama, get_model_config, hf_state_dict_key
    from scaletrain.model.config_io import to_hf_config

    mc = get_model_config(model_size)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        items = [(hf_state_dict_key(n), tuple(p.shape), n) for n, p in Llama(mc).named_parameters()]
    torch.manual_seed(0)
    write_safetensors(folder / "model.safetensors", items, lambda n: torch.randn(
        dict((k, s) for _, s, k in items)[n]) * 0.02, torch.bfloat16)
    (folder / "config.json").write_text(json.dumps(to_hf_config(mc, "bf16", mc.max_seq_len, None, None, None)))


def write_bin_folder(model_size: str, folder: Path, files: int = 2) -> None:
    """The same preset as a ``pytorch_model-0000i-of-0000N.bin`` folder (the format older Hugging Face models ship
    in: torch.save'd state dicts, bf16, with ``pytorch_model.bin.index.json``). Written one file at a time."""
    import torch

    from scaletrain.model import Llama, get_model_config, hf_state_dict_key
    from scaletrain.model.config_io import to_hf_config

    mc = get_model_config(model_size)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = [(hf_state_dict_key(n), tuple(p.shape)) for n, p in Llama(mc).named_parameters()]
    torch.manual_seed(0)
    weight_map, total = {}, 0
    for i in range(files):
        name = f"pytorch_model-{i + 1:05d}-of-{files:05d}.bin"
        part = {k: (torch.randn(shape) * 0.02).to(torch.bfloat16) for k, shape in shapes[i::files]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * 2 for t in part.values())
        del part
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(to_hf_config(mc, "bf16", mc.max_seq_len, None, None, None)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="base")
    p.add_argument("--engines", nargs="+", default=["fsdp", "zero3"])
    p.add_argument("--modes", nargs="+", default=["random", "hf", "bin"], choices=["random", "hf", "bin"],
                   help="random weights, --init-from a safetensors folder (hf) or a pytorch_model*.bin one (bin)")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--init-from", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    tmp = Path(tempfile.mkdtemp(prefix="init_memory_"))
    if "hf" in a.modes:
        t0 = time.perf_counter()
        write_hf_folder(a.model_size, tmp / "hf")
        print(f"wrote a {a.model_size} Hugging Face folder (bf16) in {time.perf_counter() - t0:.0f} s", flush=True)
    if "bin" in a.modes:
        t0 = time.perf_counter()
        write_bin_folder(a.model_size, tmp / "bin")
        print(f"wrote a {a.model_size} pytorch_model*.bin folder (bf16) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    rows = []
    for engine in a.engines:
        for source in a.modes:
            for mode in ("whole", "sharded"):
                out = tmp / f"{engine}_{source}_{mode}"
                args = ["--data-kind", "synthetic", "--mixed-precision", "fp32", "--max-seq-length", "256",
                        "--batch-size", "1", *engine_argv(engine, str(tmp))]
                if source == "random":
                    args += ["--model-size", a.model_size]
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.world),
                       "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker", "--mode", mode,
                       "--out", str(out)] + (["--init-from", str(tmp / source)] if source != "random" else [])
                cmd += ["--", *args]
                proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
                ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(a.world)]
                full = ranks[0]["full_model_mib"]
                row = {"engine": engine, "weights": source, "build": mode, "full_model_mib": full,
                       "build_init_mib": max(r["build+init_mib"] for r in ranks),
                       "engine_mib": max(r["engine_mib"] for r in ranks),
                       "seconds": max(r["seconds"] for r in ranks)}
                row["build_init_x"] = row["build_init_mib"] / full
                row["engine_x"] = row["engine_mib"] / full
                rows.append(row)
                print(f"{engine:6} {source:6} {mode:8} build+init {row['build_init_mib']:8,.0f} MiB "
                      f"({row['build_init_x']:.2f}x)  engine {row['engine_mib']:8,.0f} MiB ({row['engine_x']:.2f}x)  "
                      f"{row['seconds']:.1f} s", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = ROOT / "benchmarks" / "results" / f"cpu-{os.cpu_count()}core" / f"init_memory_{stamp}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    head = (f"init_memory: {a.model_size}, {a.world} CPU ranks, fp32 ({rows[0]['full_model_mib']:,.0f} MiB of "
            f"weights); peak RSS per rank above its start, as a multiple of the full model")
    table = "\n".join([head] + [f"{r['engine']:6} {r['weights']:6} {r['build']:8} build+init {r['build_init_x']:.2f}x "
                                f"engine {r['engine_x']:.2f}x {r['seconds']:.1f} s" for r in rows])
    dest.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    dest.with_suffix(".txt").write_text(table + "\n")
    print(f"\n{table}\nwrote {dest}")
    shutil.rmtree(tmp, ignore_errors=True)  # the Hugging Face folders: gigabytes for base


if __name__ == "__main__":
    main()
