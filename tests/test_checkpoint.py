"""Checkpoints: bit-identical resume, resume on another world size, crash and preemption safety,
keep-last-N, and the errors for bad checkpoints."""

import json
import signal
import subprocess
import time

import psutil
import pytest

from scaletrain.checkpoint import COMPLETE, newest_checkpoint

from .conftest import ROOT, launch, launch_cmd, read_metrics

BASE = ["--data", "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--max-steps", "6",
        "--warmup-steps", "1", "--learning-rate", "2e-3", "--log-interval", "1", "--eval-interval", "0",
        "--no-use-tensorboard", "--mixed-precision", "fp32", "--max-grad-norm", "0.5"]
ENGINES = {"fsdp": ["--engine", "fsdp"], "zero2": ["--ds_config", "ds_configs/zero2_bf16.json"],
           "zero3": ["--ds_config", "ds_configs/zero3_bf16.json"]}


def fp32(kind, tmp_path):
    if kind == "fsdp":
        return ENGINES[kind]
    ds = json.loads((ROOT / ENGINES[kind][1]).read_text())
    ds["bf16"] = {"enabled": "auto"}
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(ds))
    return ["--ds_config", str(path)]


def losses(tmp_path, run):
    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path, run)]


@pytest.mark.parametrize("kind, launcher", [("zero2", "deepspeed"), ("zero3", "torchrun"), ("fsdp", "torchrun")])
def test_resume_is_bit_identical(tmp_path, kind, launcher):
    args = BASE + fp32(kind, tmp_path) + ["--batch-size", "2", "--gradient-accumulation-steps", "2",
                                          "--checkpoint-dir", str(tmp_path / "ck")]
    launch(launcher, args + ["--save-interval", "0"], tmp_path, run_name="straight")
    launch(launcher, args + ["--stop-at-step", "3"], tmp_path, run_name="first")
    launch(launcher, args + ["--resume", "latest"], tmp_path, run_name="resumed")
    straight = losses(tmp_path, "straight")
    assert losses(tmp_path, "first") == straight[:3]
    assert losses(tmp_path, "resumed") == straight[3:]  # same floats: bit-identical continuation


def test_async_checkpoint_resumes_bit_identically(tmp_path):
    args = BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(tmp_path / "ck")]
    launch("python", args + ["--save-interval", "2", "--async-checkpoint"], tmp_path, run_name="straight")
    assert (tmp_path / "ck" / "step_000004" / COMPLETE).exists()
    launch("python", args + ["--resume", str(tmp_path / "ck" / "step_000004")], tmp_path, run_name="resumed")
    assert losses(tmp_path, "resumed") == losses(tmp_path, "straight")[4:]


@pytest.mark.parametrize("kind", ["fsdp", "zero2"])
def test_resume_on_another_world_size(tmp_path, kind):
    """2 ranks -> 1 rank -> 2 ranks against a straight 2-rank run (DeepSpeed via its universal checkpoint)."""
    def run(world, extra, name):  # the same global batch of 4 rows on any world size
        args = BASE + fp32(kind, tmp_path) + ["--batch-size", str(4 // world), "--checkpoint-dir", str(tmp_path / "ck")]
        launch("torchrun" if world > 1 else "python", args + extra, tmp_path, nproc=world, run_name=name)

    run(2, ["--save-interval", "0"], "straight")
    run(2, ["--stop-at-step", "2"], "first")
    run(1, ["--resume", "latest", "--stop-at-step", "4"], "on_one")
    run(2, ["--resume", "latest"], "on_two")
    straight = losses(tmp_path, "straight")
    resumed = losses(tmp_path, "on_one") + losses(tmp_path, "on_two")
    assert [s for s, _, _ in resumed] == [3, 4, 5, 6]
    for (_, a, ga), (_, b, gb) in zip(straight[2:], resumed):
        assert abs(a - b) < 2e-4 and abs(ga - gb) < 2e-3 * max(1, ga)


def _wait_for(cond, timeout=120):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.2)


def test_sigkill_during_save_leaves_the_previous_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    args = BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck)]
    launch("python", args + ["--save-interval", "0"], tmp_path, run_name="straight")
    launch("python", args + ["--stop-at-step", "2"], tmp_path, run_name="first")
    cmd, env = launch_cmd("python", args + ["--resume", "latest", "--save-interval", "2"], tmp_path,
                          run_name="killed")
    env["SCALETRAIN_FAULT"] = "save_pause:60"  # shards written, commit not yet done
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (ck / ".tmp-step_000004").is_dir() and any((ck / ".tmp-step_000004").iterdir()))
        time.sleep(1)
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
    assert (ck / "latest").read_text().strip() == "step_000002"
    assert newest_checkpoint(ck).name == "step_000002" and not (ck / "step_000004").exists()
    launch("python", args + ["--resume", "latest", "--save-interval", "2"], tmp_path, run_name="after")
    assert not list(ck.glob(".tmp-*"))  # the partial save was cleaned up
    assert losses(tmp_path, "after") == losses(tmp_path, "straight")[2:]


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_sigterm_saves_and_exits_zero(tmp_path, launcher):
    ck = tmp_path / "ck"
    args = BASE[:] + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck)]
    args[args.index("--max-steps") + 1] = "100000"
    cmd, env = launch_cmd(launcher, args, tmp_path, nproc=2)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    targets = psutil.Process(proc.pid).children(recursive=True) if launcher == "torchrun" else [proc]
    for p in targets:  # as a scheduler does: every task gets the signal
        p.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted at step" in out
    saved = newest_checkpoint(ck)
    assert saved is not None and saved.name.startswith("step_") and (saved / COMPLETE).exists()


def test_keep_last_n_keeps_the_right_ones(tmp_path):
    ck = tmp_path / "ck"
    launch("python", BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck), "--save-interval",
                             "1", "--keep-last-n-checkpoints", "2", "--eval-interval", "2", "--data", "synthetic"],
           tmp_path)
    names = sorted(p.name for p in ck.iterdir() if p.is_dir())
    assert names == ["best", "final", "step_000004", "step_000005"]
    assert (ck / "latest").read_text().strip() == "final"


def test_bad_checkpoints_give_clear_errors(tmp_path):
    ck = tmp_path / "ck"
    args = BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck)]
    p = launch("python", args + ["--resume", "latest"], tmp_path, check=False)
    assert p.returncode == 1 and "--resume latest: no complete checkpoint in --checkpoint-dir" in p.stderr
    launch("python", args + ["--stop-at-step", "2"], tmp_path)
    p = launch("python", args + ["--resume", "latest", "--num-layers", "2", "--max-seq-length", "32"], tmp_path,
               check=False)
    assert p.returncode == 1
    assert "tensor layers.2.input_layernorm.weight has shape [128] there but [] in this" in p.stderr
    partial = ck / "step_000009"
    partial.mkdir()
    p = launch("python", args + ["--resume", str(partial)], tmp_path, check=False)
    assert p.returncode == 1 and "step_000009: not a complete checkpoint (no COMPLETE.json" in p.stderr
    p = launch("python", args + ["--resume", str(tmp_path / "nowhere")], tmp_path, check=False)
    assert p.returncode == 1 and "no such checkpoint" in p.stderr
    # a full disk: the save fails with a message, the previous checkpoint stays loadable
    p = launch("python", args + ["--resume", "latest", "--save-interval", "2"], tmp_path, check=False,
               extra_env={"SCALETRAIN_FAULT": "save_enospc"})
    assert p.returncode == 1 and "No space left on device" in p.stderr
    assert "the previous checkpoint" in p.stderr and "step_000002 is intact" in p.stderr
    assert newest_checkpoint(ck).name == "step_000002" and not list(ck.glob(".tmp-*"))
