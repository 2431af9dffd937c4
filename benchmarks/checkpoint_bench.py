"""Checkpoint benchmark, in one run:

1. save and load time of each engine's sharded checkpoint (DeepSpeed ZeRO-2 shards, FSDP2 DCP)
   against torch.save / torch.load of the same state (model + AdamW moments) to the same disk, and
   the load with every file read weights-only (the default) against plain unpickling (--trust-checkpoint);
2. how long an FSDP async save (dcp.async_save) stalls training, against a synchronous save;
3. what checksums cost: hashing the files at save against the save, verifying them (cold) against the load;
4. peak RSS of launch/convert.py for two model sizes (default small and base, 10x apart), each in
   a fresh process, against torch's own dcp_to_torch_save.

    python benchmarks/checkpoint_bench.py [--model-size small] [--big base] [--shard 512MB]

Goals: save <= 1.2x torch.save; async stall <= 0.2x a synchronous save; checksums <= 10% of a save;
conversion peak <= 2x the
max shard size and flat in model size. Writes benchmarks/results/checkpoint_bench_<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, build_runner  # noqa: E402

from scaletrain.checkpoint.integrity import hash_share, verify_folder  # noqa: E402
from scaletrain.convert import parse_size  # noqa: E402
from scaletrain.data.synthetic import SyntheticLoader  # noqa: E402
from scaletrain.engine import get_engine_class  # noqa: E402
from scaletrain.model import get_model_config, num_params  # noqa: E402


def _one_step(engine, cfg) -> None:
    vocab = get_model_config(cfg.model_size).vocab_size
    loader = SyntheticLoader(vocab, cfg.max_seq_length, cfg.micro_batch_size, 1, 0, 1, 0)
    engine.train_step([next(loader)])  # creates the AdamW moments, so the state is the full 12 bytes/param


def _torch_state(engine):
    """The same tensors as a plain state dict (world size 1: shards are whole tensors)."""
    from torch.distributed.tensor import DTensor

    if engine.name == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(engine.module, engine.optimizer)
    else:
        msd = engine.ds.module.state_dict()
        osd = engine.ds.optimizer.state_dict()

    def local(x):
        if isinstance(x, DTensor):
            return x.to_local()
        if isinstance(x, dict):
            return {k: local(v) for k, v in x.items()}
        if isinstance(x, list):
            return [local(v) for v in x]
        return x

    return {"model": local(msd), "optim": local(osd)}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _drop_cache(path: Path) -> None:
    """Evict written files from the page cache where allowed, so loads read the disk."""
    for p in (path.rglob("*") if path.is_dir() else [path]):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def save_load(kind: str, model_size: str, work: Path, env) -> dict:
    argv = ["--model-size", model_size, "--micro-batch-size", "1", "--max-seq-length", "64",
            "--mixed-precision", "fp32",
            "--max-steps", "10", "--warmup-steps", "1"]
    engine, cfg = build_runner(kind, argv, env)
    _one_step(engine, cfg)
    row = {"engine": kind}
    ours, ref = work / f"{kind}_ckpt", work / f"{kind}_torch.pt"
    for _rep in range(2):  # the second round is reported (first pays one-time costs)
        for p in (ours, ref):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        ours.mkdir()
        t0 = time.perf_counter()
        engine.save(str(ours))
        os.sync()
        row["save_s"] = time.perf_counter() - t0
        state = _torch_state(engine)
        t0 = time.perf_counter()
        torch.save(state, ref)
        os.sync()
        row["torch_save_s"] = time.perf_counter() - t0
        del state
        # every file read without running code (the default) vs plain unpickling (--trust-checkpoint, what
        # loading was before the safe loaders), alternated three times from a cold cache: medians
        times: dict[bool, list[float]] = {False: [], True: []}
        for trust in (False, True) * 3:
            _drop_cache(ours)
            t0 = time.perf_counter()
            engine.load(str(ours), optimizer_steps=1, trust=trust)
            times[trust].append(time.perf_counter() - t0)
        row["load_s"], row["load_trusted_s"] = statistics.median(times[False]), statistics.median(times[True])
        # checksums: what a save adds (hashing the files just written, as the store does) and what the
        # check before a resume adds (a cold read of every file); the integrity.py figures
        t0 = time.perf_counter()
        hash_share(ours, 0, 1)
        row["hash_s"] = time.perf_counter() - t0
        meta = {"files": hash_share(ours, 0, 1)}
        _drop_cache(ours)
        t0 = time.perf_counter()
        assert verify_folder(ours, meta, 0, 1) == []
        row["verify_s"] = time.perf_counter() - t0
        # what a resume pays: verify, then load (its reads now hit the page cache), from a cold cache
        _drop_cache(ours)
        t0 = time.perf_counter()
        assert verify_folder(ours, meta, 0, 1) == []
        engine.load(str(ours), optimizer_steps=1)
        row["verified_load_s"] = time.perf_counter() - t0
        _drop_cache(ref)
        t0 = time.perf_counter()
        torch.load(ref, weights_only=False)
        row["torch_load_s"] = time.perf_counter() - t0
    row.update(bytes=_du(ours), torch_bytes=_du(ref), save_ratio=row["save_s"] / row["torch_save_s"],
               load_ratio=row["load_s"] / row["torch_load_s"], safe_load_ratio=row["load_s"] / row["load_trusted_s"],
               hash_ratio=row["hash_s"] / row["save_s"], verify_ratio=row["verify_s"] / row["load_s"],
               verified_load_ratio=row["verified_load_s"] / row["load_s"])
    if kind == "fsdp":  # async: how long the call blocks training, then wait for the write; the run's first
        # background save makes the host buffers the later ones refill: both are timed, the later one is a run's
        for key in ("async_first", "async"):
            shutil.rmtree(work / "async", ignore_errors=True)
            (work / "async").mkdir()
            t0 = time.perf_counter()
            fut = engine.save_async(str(work / "async"))
            row[f"{key}_stall_s"] = time.perf_counter() - t0
            fut.result()
            row[f"{key}_total_s"] = time.perf_counter() - t0
            row[f"{key}_stall_ratio"] = row[f"{key}_stall_s"] / row["save_s"]
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from scaletrain.engine.fsdp import _Writer

        # the writer's threads: ours (two a rank where it has the cores) against DCP's one, alternating
        for _ in range(3):
            for key, kwargs in (("save_threads_ours_s", {}), ("save_one_thread_s", {"thread_count": 1})):
                shutil.rmtree(work / "threads", ignore_errors=True)
                t0 = time.perf_counter()
                model_sd, optim_sd = get_state_dict(engine.module, engine.base_optimizer)
                dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=_Writer(str(work / "threads"),
                                                                                       **kwargs))
                row.setdefault(key, []).append(time.perf_counter() - t0)
        row["writer_threads"] = _Writer(str(work / "threads")).thread_count
        shutil.rmtree(work / "threads", ignore_errors=True)
        # the baseline of the background save: DCP's default staging, fresh host buffers at every save (what the
        # engine did before), through the same writer
        for key in ("async_default_first", "async_default"):
            shutil.rmtree(work / "async", ignore_errors=True)
            t0 = time.perf_counter()
            model_sd, optim_sd = get_state_dict(engine.module, engine.base_optimizer)
            fut = dcp.async_save({"model": model_sd, "optim": optim_sd}, storage_writer=_Writer(str(work / "async")))
            row[f"{key}_stall_s"] = time.perf_counter() - t0
            fut.result()
            row[f"{key}_total_s"] = time.perf_counter() - t0
        shutil.rmtree(work / "async", ignore_errors=True)
    return row


def _child_env() -> dict:
    """This process's rendezvous variables must not reach the children (they start their own)."""
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def conversion_rss(model_size: str, shard: str, work: Path) -> dict:
    """Save a DCP checkpoint of ``model_size`` (fresh weights), then convert it in fresh processes."""
    ck = work / f"conv_{model_size}"
    # the checkpoint is written the way the FSDP engine lays it out (DCP, keys "model.<name>", COMPLETE.json),
    # from a plain model: wrapping a 1.35B model in FSDP at world size 1 to save it needs ~21 GB here
    code = f"""
import json, os, sys, torch; sys.path.insert(0, {str(ROOT)!r})
import torch.distributed.checkpoint as dcp
from dataclasses import asdict
from scaletrain.model import Llama, get_model_config
from scaletrain.checkpoint import COMPLETE
cfg = get_model_config({model_size!r})
model = Llama(cfg)
os.makedirs({str(ck / 'final')!r}, exist_ok=True)
dcp.save({{"model": model.state_dict()}}, checkpoint_id={str(ck / 'final')!r}, no_dist=True)
meta = {{"step": 0, "tokens_seen": 0, "world_size": 1, "engine": "fsdp", "model_config": asdict(cfg), "config": {{}}}}
open(os.path.join({str(ck / 'final')!r}, COMPLETE), "w").write(json.dumps(meta))
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=_child_env())
    out = {}
    mc = get_model_config(model_size)
    fp32_gib = num_params(mc) * 4 / 2**30
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    for name, cmd in (("convert", [sys.executable, str(ROOT / "launch" / "convert.py"), str(ck / "final"),
                                   str(work / f"hf_{model_size}"), "--dtype", "fp32", "--max-shard-size", shard,
                                   "--overwrite"]),
                      ("dcp_to_torch_save", [sys.executable, "-c",
                                             "import sys; from torch.distributed.checkpoint.format_utils import "
                                             "dcp_to_torch_save; dcp_to_torch_save(sys.argv[1], sys.argv[2])",
                                             str(ck / "final"), str(work / f"full_{model_size}.pt")])):
        if name == "dcp_to_torch_save" and 3.5 * fp32_gib > 0.6 * total_gib:
            out[f"{name}_peak_rss_gib"] = float("nan")  # ~3.2x the model: would not fit this machine
            continue
        t0 = time.perf_counter()
        # a fresh interpreter per measurement: RUSAGE_CHILDREN is the max over finished children
        probe = (f"import resource, subprocess, sys; subprocess.run({cmd!r}, check=True, capture_output=True); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        rss_kib = int(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                                     env=_child_env()).stdout.strip())
        out[f"{name}_peak_rss_gib"] = rss_kib / 2**20
        out[f"{name}_s"] = time.perf_counter() - t0
    out.update(model=model_size, params=num_params(mc), fp32_gib=fp32_gib,
               shard_gib=parse_size(shard) / 2**30)
    shutil.rmtree(ck, ignore_errors=True)
    shutil.rmtree(work / f"hf_{model_size}", ignore_errors=True)
    (work / f"full_{model_size}.pt").unlink(missing_ok=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="small", help="model for the save/load timings")
    p.add_argument("--small", default="small", help="smaller model for the conversion RSS")
    p.add_argument("--big", default="base", help="larger model for the conversion RSS (>= 4x the smaller)")
    p.add_argument("--shard", default="512MB", help="--max-shard-size of the conversions")
    p.add_argument("--engines", nargs="+", default=["fsdp", "zero2"])
    p.add_argument("--no-conversion", action="store_true", help="skip the conversion peak-RSS part")
    p.add_argument("--workdir", help="scratch folder on the disk to measure (default: a temporary one)")
    p.add_argument("--output", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    # conversions first, in fresh processes, while this one holds no model (the big save needs the RAM)
    conv = [] if a.no_conversion else [conversion_rss(m, a.shard, work) for m in (a.small, a.big)]
    env = get_engine_class("deepspeed").init_distributed()
    rows = [save_load(k, a.model_size, work, env) for k in a.engines]
    print(f"\nsave / load, {a.model_size} ({num_params(get_model_config(a.model_size)) / 1e6:,.0f}M params, fp32 "
          f"weights + AdamW moments), world size 1, vs torch.save / torch.load of the same state")
    print(f"{'engine':<8}{'GiB':>7}{'save s':>9}{'torch.save':>12}{'ratio':>8}{'load s':>9}{'torch.load':>12}"
          f"{'ratio':>8}")
    for r in rows:
        print(f"{r['engine']:<8}{r['bytes'] / 2**30:>7.2f}{r['save_s']:>9.2f}{r['torch_save_s']:>12.2f}"
              f"{r['save_ratio']:>7.2f}x{r['load_s']:>9.2f}{r['torch_load_s']:>12.2f}{r['load_ratio']:>7.2f}x")
    for r in rows:
        print(f"safe load ({r['engine']}): {r['load_s']:.2f}s with every file read weights-only vs "
              f"{r['load_trusted_s']:.2f}s with --trust-checkpoint (plain unpickling) = {r['safe_load_ratio']:.2f}x")
    for r in rows:
        print(f"checksums ({r['engine']}, xxh3-128): {r['hash_s']:.2f}s at save = {r['hash_ratio']:.1%} of the save; "
              f"{r['verify_s']:.2f}s to verify from a cold cache = {r['verify_ratio']:.1%} of the load; a cold "
              f"resume verifying then loading {r['verified_load_s']:.2f}s = {r['verified_load_ratio']:.2f}x the load")
    for r in rows:
        if "async_stall_s" in r:
            print(f"async save (fsdp): training blocked {r['async_stall_s']:.2f}s of a {r['save_s']:.2f}s synchronous "
                  f"save = {r['async_stall_ratio']:.2f}x (write finished after {r['async_total_s']:.2f}s); the run's "
                  f"first, which makes the buffers: {r['async_first_stall_s']:.2f}s = "
                  f"{r['async_first_stall_ratio']:.2f}x (write {r['async_first_total_s']:.2f}s); DCP's default "
                  f"staging (fresh buffers each save) blocked {r['async_default_stall_s']:.2f}s = "
                  f"{r['async_default_stall_s'] / r['save_s']:.2f}x (write {r['async_default_total_s']:.2f}s; its "
                  f"first {r['async_default_first_stall_s']:.2f}s)")
            print(f"DCP writer threads (fsdp): {r['writer_threads']} a rank here, saves "
                  f"{', '.join(f'{t:.2f}' for t in r['save_threads_ours_s'])} s against "
                  f"{', '.join(f'{t:.2f}' for t in r['save_one_thread_s'])} s with one (alternating)")
    if conv:
        print(f"\nconversion peak RSS, --max-shard-size {a.shard}, fp32 output, fresh process each")
        print(f"{'model':<8}{'params':>10}{'fp32 GiB':>10}{'convert GiB':>13}{'x shard':>9}"
              f"{'dcp_to_torch_save GiB':>23}")
    for c in conv:
        print(f"{c['model']:<8}{c['params'] / 1e6:>9,.0f}M{c['fp32_gib']:>10.2f}{c['convert_peak_rss_gib']:>13.2f}"
              f"{c['convert_peak_rss_gib'] / c['shard_gib']:>8.2f}x{c['dcp_to_torch_save_peak_rss_gib']:>23.2f}")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"checkpoint_bench_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(a), "save_load": rows, "conversion": conv}, indent=2))
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
