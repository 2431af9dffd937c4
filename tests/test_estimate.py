"""`scaletrain estimate`: the activation formula against autograd's saved tensors, the CLI's table and verdict,
the largest micro-batch that fits, and the out-of-memory stop of a run that hits a memory cap."""

import dataclasses
import re
import resource
import subprocess
import sys

import pytest
import torch

from scaletrain.cli import parse_config
from scaletrain.estimate import activation_bytes_per_token, estimate_memory, main
from scaletrain.model import Llama, get_model_config

from .conftest import ROOT, clean_env


def _saved_bytes_per_token(mc, dtype, checkpointing: bool, B: int = 2, T: int = 48) -> float:
    """Bytes autograd keeps for backward in one forward with loss (parameters and buffers excluded), per token."""
    torch.manual_seed(0)
    model = Llama(mc).to(dtype)
    model.gradient_checkpointing = checkpointing
    kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids, labels = torch.randint(0, mc.vocab_size, (B, T)), torch.randint(0, mc.vocab_size, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=labels, reduction="sum")
    return sum(v for k, v in seen.items() if k not in kept) / (B * T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["gqa", "mha_tied"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_is_what_autograd_saves(dtype, shape, checkpointing):
    mc = get_model_config("tiny")  # 4 heads over 2 KV heads
    if shape == "mha_tied":
        mc = dataclasses.replace(mc, n_kv_heads=mc.n_heads, tie_embeddings=True, ffn_dim=256)
    a = 4 if dtype == torch.float32 else 2
    blocks, loss = activation_bytes_per_token(mc, a, checkpointing)
    # what forward keeps: the blocks' (with checkpointing their inputs only: the block rebuilt in backward is not
    # held in forward) and the loss's: the final norm's, the ids and labels, and the logits (holding their softmax)
    held = (mc.n_layers * a * mc.d_model if checkpointing else blocks) + loss
    assert _saved_bytes_per_token(mc, dtype, checkpointing) == pytest.approx(held, abs=1)  # + a few scalars


def _estimate(*flags, world=8, gib=None, device="cuda"):
    cfg = parse_config(["--data-kind", "synthetic", *flags]).for_world_size(world)
    return estimate_memory(cfg, get_model_config(cfg.model_size), world, device_type=device,
                           device_memory_gib=gib)


def test_largest_micro_batch_is_the_edge_of_fitting():
    est = _estimate("--model-size", "base", "--max-seq-length", "2048", "--micro-batch-size", "1", gib=40)
    best = est.largest_micro_batch(1)
    assert best and best > 1
    at = _estimate("--model-size", "base", "--max-seq-length", "2048", "--micro-batch-size", str(best), gib=40)
    over = _estimate("--model-size", "base", "--max-seq-length", "2048", "--micro-batch-size", str(best + 1), gib=40)
    assert at.fits and not over.fits
    # activation checkpointing and more ranks each make room; ZeRO-3 shards what ZeRO-2 keeps whole
    ckpt = _estimate("--model-size", "base", "--max-seq-length", "2048", "--micro-batch-size", str(best + 1),
                     "--gradient-checkpointing", gib=40)
    assert ckpt.fits and ckpt.largest_micro_batch(best + 1) > best
    assert _estimate("--model-size", "base", world=64).peak_bytes < _estimate("--model-size", "base").peak_bytes


def test_zero3_reduce_buffers_follow_the_communication_dtype_and_the_backend(tmp_path):
    """ZeRO-3 allocates its reduce bucket in communication_data_type (fp32 in our bf16 configs, not the compute
    dtype), and backward ends in a reduce that interleaves the bucket into one more buffer while the gradient
    that did not fit (the embedding) waits; on CPU, gloo's reduce-scatter copies the input again (1 + 1/N)."""
    import json

    from scaletrain.model.flops import block_tensor_sizes, num_params, root_tensor_sizes

    ds = json.loads((ROOT / "ds_configs" / "zero3_bf16.json").read_text())
    b, mc = ds["zero_optimization"]["reduce_bucket_size"], get_model_config("base")
    used, waiting = min(b, num_params(mc)), 2 * max(block_tensor_sizes(mc) + root_tensor_sizes(mc))
    buffers = {}
    for comm, c in (("fp32", 4), ("bf16", 2)):
        ds["communication_data_type"] = comm
        (tmp_path / f"{comm}.json").write_text(json.dumps(ds))
        for device, world in (("cuda", 8), ("cpu", 2)):
            est = _estimate("--model-size", "base", "--ds_config", str(tmp_path / f"{comm}.json"), world=world,
                            device=device)
            start, end, _ = est.rows["buffers"]
            gloo = c * used * (1 + 1 / world) if device == "cpu" else 0
            assert end - start == pytest.approx(c * used + gloo + waiting, abs=2)
            buffers[comm, device] = start
    assert buffers["fp32", "cuda"] - buffers["bf16", "cuda"] == 2 * b  # the bucket: 4 bytes an element, not 2



def test_zero2_with_fp32_gradient_accumulation_counts_its_reduce(tmp_path):
    """ZeRO-2 in bf16 with grad_accum_dtype fp32 (our configs): the partition's gradients live in fp32 from the
    first reduce on (no fp32 copy at the step), and backward ends in reduces that flatten each rank's part (a·m)
    and cast it to communication_data_type (c·m), which gloo copies again on CPU. Without grad_accum_dtype the
    gradients stay bf16 and the step copies them to fp32, as before. (Measured against 2 CPU ranks by
    benchmarks/memory_estimate.py --precision bf16: small 0.83 -> 0.99.)"""
    import json
    import math

    from scaletrain.model.flops import num_params

    ds = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    p = num_params(get_model_config("base"))
    for comm, c in (("fp32", 4), ("bf16", 2)):
        ds["communication_data_type"] = comm
        (tmp_path / f"{comm}.json").write_text(json.dumps(ds))
        for device, world in (("cuda", 8), ("cpu", 2)):
            shard = math.ceil(p / world)
            m = min(ds["zero_optimization"]["reduce_bucket_size"], shard)
            est = _estimate("--model-size", "base", "--ds_config", str(tmp_path / f"{comm}.json"), world=world,
                            device=device)
            start, end, _ = est.rows["buffers"]
            gloo = c * m * (1 + 1 / world) if device == "cpu" else 0
            assert end - start == pytest.approx(2 * m + (c * m if c != 2 else 0) + gloo, abs=2)
            assert est.rows["gradients"][1:] == (4 * shard, 4 * shard)
    del ds["data_types"]
    (tmp_path / "plain.json").write_text(json.dumps(ds))
    est = _estimate("--model-size", "base", "--ds_config", str(tmp_path / "plain.json"))
    shard = math.ceil(p / 8)
    assert est.rows["gradients"][1:] == (2 * shard, 6 * shard) and est.rows["buffers"][0] == est.rows["buffers"][1]


def test_fsdp_backward_ends_in_the_roots_reduce_scatter():
    """FSDP2's last reduce-scatter is the root's (embedding, lm_head): its parameters gathered, its unsharded
    gradients and their copy into the reduce-scatter's fp32 input at once; the input, with its output, is kept to
    the end of backward. (Measured on 2 CPU ranks by benchmarks/memory_estimate.py: small in bf16 at world 2
    0.88 -> 0.95.)"""
    from scaletrain.model.flops import root_tensor_sizes

    pr = sum(root_tensor_sizes(get_model_config("base")))
    for precision, a in (("bf16", 2), ("fp32", 4)):
        est = _estimate("--model-size", "base", "--engine", "fsdp", "--mixed-precision", precision)
        assert est.rows["buffers"][1] == 2 * a * pr + 4 * pr

def test_the_cli_prints_the_table_and_the_verdict(capsys, tmp_path):
    ds = ROOT / "ds_configs" / "zero3_bf16.json"
    main(["--model-size", "large", "--ds_config", str(ds), "--world-size", "8", "--batch-size", "2",
          "--max-seq-length", "2048", "--gradient-checkpointing", "--device-memory-gib", "80",
          "--data-kind", "synthetic"])
    out = capsys.readouterr().out
    assert "large (6,738.4M params), bf16, world 8, micro-batch 2 x 2048 tokens, activation checkpointing" in out
    assert "memory per device, estimated (zero3)" in out
    for row in ("parameters", "gradients", "optimizer state", "activations", "loss and logits", "buffers", "total"):
        assert f"\n  {row} " in out
    assert "fits in 80.0 GiB" in out and "largest micro-batch that fits:" in out
    assert re.search(r"largest micro-batch that fits: \d+\n", out), out  # a count of rows ("2.0" before)
    main(["--model-size", "large", "--engine", "fsdp", "--world-size", "1", "--device-memory-gib", "80",
          "--max-seq-length", "2048", "--data-kind", "synthetic"])
    assert "does NOT fit in 80.0 GiB" in capsys.readouterr().out  # 6.7B x 16 bytes of states alone
    for gib in ("0", "nan", "inf"):  # nan was a ValueError traceback
        proc = subprocess.run([sys.executable, "-m", "scaletrain", "estimate", "--model-size", "tiny", "--world-size",
                               "1", "--device-memory-gib", gib, "--data-kind", "synthetic"], capture_output=True,
                              text=True, timeout=120, cwd=ROOT, env=clean_env())
        assert proc.returncode == 1 and proc.stderr == \
            f"error: --device-memory-gib: must be a positive number, got {float(gib)}\n", proc.stderr


def test_a_run_out_of_memory_stops_with_what_to_change(tmp_path):
    """A memory cap (RLIMIT_DATA, 1.5 GiB) the first forward passes: the run stops with the message, not a
    traceback, and writes no checkpoint."""
    cap = int(1.5 * 2**30)

    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    args = ["--data-kind", "synthetic", "--model-size", "tiny", "--max-seq-length", "512", "--micro-batch-size",
            "256", "--max-steps", "2", "--mixed-precision", "fp32", "--run-dir", str(tmp_path / "runs"),
            "--run-name", "oom", "--eval-interval", "0"]
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), *args], capture_output=True,
                          text=True, env=clean_env(), cwd=tmp_path, timeout=300, preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: out of memory in step 1 (micro-batch 256 x 512 tokens, activation checkpointing "
                          "off): "), proc.stderr[-3000:]
    assert "the estimate for this run is" in err and "a smaller --micro-batch-size than 256" in err
    assert "--gradient-checkpointing" in err and "Traceback" not in proc.stderr
    assert not list((tmp_path / "runs" / "oom" / "checkpoints").glob("*/COMPLETE"))
