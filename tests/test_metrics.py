"""MFU arithmetic, the GPU peak table, TensorBoard/W&B output of a real run, throughput.py outputs."""

import json
import subprocess
import sys

import pytest

from scaletrain.metrics import mfu, peak_tflops
from scaletrain.model import flops_per_token, get_model_config

from .conftest import ROOT, clean_env, launch, read_metrics

RUN = ["--data-kind", "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2", "--max-steps",
        "4", "--warmup-steps", "1", "--log-interval", "2", "--save-interval", "0", "--eval-interval", "2",
        "--eval-steps", "2"]


def test_mfu_equals_hand_computation():
    cfg = get_model_config("large")
    fpt = flops_per_token(cfg, 2048)
    # by hand: 6 * (32 layers * (4 * 4096^2 + 3 * 4096 * 11008) + 32000 * 4096) + 12 * 32 * 32 * 128 * 2048
    by_hand = 6 * (32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32000 * 4096) + 12 * 32 * 32 * 128 * 2048
    assert fpt == by_hand
    # 3,000 tokens/s per device on a 989.4 TFLOP/s part
    assert mfu(fpt, 3000.0, 989.4) == pytest.approx(by_hand * 3000 / 989.4e12)
    assert 0.1 < mfu(fpt, 3000.0, 989.4) < 0.2


@pytest.mark.parametrize(
    "name, precision, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "fp16", 835.0),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA L40S", "bf16", 362.05),
        ("NVIDIA B200", "bf16", 2250.0),
        ("NVIDIA H100 80GB HBM3", "fp32", 494.7),  # TF32 tensor cores
        ("Tesla T4", "bf16", None),
    ],
)
def test_peak_table(name, precision, expected):
    assert peak_tflops(name, precision) == expected


def test_fp32_without_tf32_uses_the_plain_fp32_peak():
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "fp32", tf32=False) == 19.5


def test_tensorboard_events_hold_the_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    launch("python", RUN + ["--peak-tflops", "1.0"], tmp_path)
    acc = EventAccumulator(str(tmp_path / "runs" / "t"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "memory_gib", "data_wait"} <= tags
    assert all(0 <= e.value <= 1 for e in acc.Scalars("data_wait"))
    assert [e.step for e in acc.Scalars("loss")] == [2, 4]
    # what TensorBoard holds is what metrics.jsonl holds
    jsonl = read_metrics(tmp_path)
    assert acc.Scalars("loss")[-1].value == pytest.approx(jsonl[-1]["loss"])
    # MFU on CPU only with --peak-tflops, and then by the formula
    m = jsonl[-1]
    cfg = get_model_config("tiny")
    assert m["mfu"] == pytest.approx(flops_per_token(cfg, 32) * m["tokens_per_s_per_device"] / 1e12)


def test_a_fresh_start_of_a_run_sets_the_earlier_logs_aside(tmp_path):
    """A run started over under its name (its checkpoints deleted by --overwrite-checkpoints, or none saved before a
    crash) appended its steps to the earlier start's metrics.jsonl and TensorBoard events, so every reader drew
    steps 2, 4, 2, 4 as one course, and W&B, continuing the same run id, dropped the steps it had already seen. The
    earlier start's logs are moved, not deleted, into a folder of their own; the run's folder holds one course."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "t"
    launch("python", RUN + ["--seed", "1"], tmp_path)
    (run / "wandb_id").write_text("abc123\n")  # as a --use-wandb start leaves it, with its offline runs
    (run / "wandb" / "offline-run-1").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")  # not a log of ours: it stays
    first = read_metrics(tmp_path)
    again = launch("python", RUN + ["--seed", "2", "--overwrite-checkpoints"], tmp_path)
    second = read_metrics(tmp_path)
    assert [m["step"] for m in second] == [2, 4] and second[-1]["loss"] != first[-1]["loss"]
    aside = [p for p in run.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and f"moved to {aside[0]}" in again.stdout, again.stdout
    assert [json.loads(x) for x in (aside[0] / "metrics.jsonl").read_text().splitlines()] == first
    assert (aside[0] / "wandb_id").read_text() == "abc123\n" and not (run / "wandb_id").exists()
    assert (aside[0] / "wandb" / "offline-run-1").is_dir() and (run / "notes.txt").read_text() == "mine"
    assert len(list(aside[0].glob("events.out.tfevents.*"))) == 1
    assert json.loads((aside[0] / "config.json").read_text())["seed"] == 1
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(m["step"], pytest.approx(m["loss"])) for m in second]
    assert (tmp_path / "checkpoints" / "final").is_dir()
    # a start after a crash that saved nothing: the same (the checkpoints gone as if none had been written)
    import shutil

    shutil.rmtree(tmp_path / "checkpoints")
    launch("python", RUN + ["--seed", "3"], tmp_path)
    assert len([p for p in run.iterdir() if p.name.startswith("superseded-")]) == 2
    assert [m["step"] for m in read_metrics(tmp_path)] == [2, 4]
    # a resume continues the logs in place
    launch("python", RUN + ["--max-steps", "6", "--resume", "latest"], tmp_path)
    assert [m["step"] for m in read_metrics(tmp_path)] == [2, 4, 6]
    assert len([p for p in run.iterdir() if p.name.startswith("superseded-")]) == 2


def test_data_wait_is_the_loaders_share_of_the_window(monkeypatch):
    import scaletrain.metrics as metrics

    clock = iter([100.0, 110.0, 112.0])  # start; report after 10 s; then a window of 2 s
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = metrics.Throughput()
    for _ in range(4):
        meter.add(1000)
        meter.waited(0.5)
    assert meter.report() == pytest.approx((400.0, 2.5, 0.2))  # 4 x 0.5 s of 10 s waited for the loader
    meter.add(10)
    assert meter.report() == pytest.approx((5.0, 2.0, 0.0))  # a new window


def test_padded_runs_count_real_tokens(tmp_path):
    """--no-packing: tokens_seen, tokens/s and MFU count target tokens, not padding."""
    from scaletrain.cli import parse_config
    from scaletrain.data.loader import build_loader
    from scaletrain.data.prepare import prepare_domain
    from scaletrain.data.sample import create_sample_pretraining_data

    raw = create_sample_pretraining_data(tmp_path / "raw", scale=0.02)
    for d in ("arxiv", "general"):
        prepare_domain(d, [str(raw[d])], str(tmp_path / "pre"), quiet=True, shard_tokens=8192, chunk_tokens=1024)
    args = ["--data-dir", str(tmp_path / "pre"), "--no-packing", "--max-seq-length", "1024", "--batch-size", "2",
            "--gradient-accumulation-steps", "2", "--max-steps", "4", "--warmup-steps", "1", "--log-interval", "1",
            "--eval-interval", "0", "--no-use-tensorboard", "--peak-tflops", "1.0", "--mixed-precision", "fp32",
            "--checkpoint-dir",
            str(tmp_path / "ck")]
    proc = launch("python", args, tmp_path)
    loader = build_loader(parse_config(args), 0, 1)
    real = []
    for _ in range(4):
        micro = [next(loader) for _ in range(2)]
        real.append(sum(int((y != -100).sum()) for _, y, _ in micro))
        if not real[1:]:  # the run says at its first log what cutting documents to a row dropped
            assert f"scaletrain: warning: {loader.cut_warning()}" in proc.stderr and "in the first 1 step," in \
                proc.stderr, proc.stderr[-3000:]
    got = read_metrics(tmp_path)
    assert [m["tokens_seen"] for m in got] == [sum(real[: i + 1]) for i in range(4)]
    assert sum(real) < 0.9 * 4 * 2 * 2 * 1024  # padding was there to be left out
    for m, n in zip(got, real):
        assert m["tokens_per_s"] == pytest.approx(n / m["step_time_s"], rel=1e-6)
        assert m["mfu"] == pytest.approx(flops_per_token(get_model_config("tiny", vocab_size=320), 1024)
                                         * m["tokens_per_s_per_device"] / 1e12, rel=1e-9)


def test_no_mfu_on_cpu_without_a_peak(tmp_path):
    launch("python", RUN + ["--no-use-tensorboard"], tmp_path)
    assert all("mfu" not in m for m in read_metrics(tmp_path))


def test_wandb_offline_writes_a_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    launch("python", RUN + ["--use-wandb", "--wandb-project", "p", "--no-use-tensorboard"], tmp_path)
    runs = list((tmp_path / "runs" / "t" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_wandb_without_key_or_mode_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    proc = launch("python", RUN + ["--use-wandb", "--no-use-tensorboard"], tmp_path)
    where = tmp_path / "runs" / "t" / "wandb"
    assert f"logging offline to {where} (upload later with `wandb sync {where}`)" in proc.stderr  # not ./wandb
    assert list(where.glob("offline-run-*"))


def _throughput(tmp_path, *args):
    env = clean_env()
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "throughput.py"),
            "--model-size",
            "tiny",
            "--seq",
            "64",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--output",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )


def test_throughput_sweep_outputs_and_best_config(tmp_path):
    proc = _throughput(
        tmp_path,
        "--engines",
        "fsdp",
        "zero2",
        "--activation-checkpointing",
        "off",
        "on",
        "--micro-batches",
        "2",
        "--peak-tflops",
        "0.5",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fsdp +AC" in proc.stdout and "best:" in proc.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["rows"]) == 4 and all(r["status"] == "ok" and r["mfu"] > 0 for r in res["rows"])
    best = max(res["rows"], key=lambda r: r["tokens_per_s"])
    assert res["best"]["tokens_per_s"] == best["tokens_per_s"]
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    command = (tmp_path / "best_command.sh").read_text()
    assert f"--micro-batch-size {best['micro_batch']}" in command and "launch/pretrain.py" in command
    ds = json.loads((tmp_path / "best_ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and isinstance(ds["train_micro_batch_size_per_gpu"], int)


def test_throughput_stops_the_doubling_where_memory_runs_out(tmp_path):
    """A 0.15 GiB cap: the sweep stops at the first point the estimate says cannot fit (not run) or, had the
    estimate let one through, at its out-of-memory; larger sizes are not tried."""
    proc = _throughput(
        tmp_path,
        "--engines",
        "fsdp",
        "--activation-checkpointing",
        "off",
        "--min-micro-batch",
        "4",
        "--max-micro-batch",
        "1024",
        "--max-memory-gib",
        "0.15",
        "--patience",
        "100",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["status"] == "ok" and rows[-1]["status"] in ("oom", "skipped")
    assert rows[-1]["micro_batch"] < 1024  # stopped at the first point that does not fit, larger sizes not tried
    assert all(r["estimate_gib"] > 0 for r in rows)
    if rows[-1]["status"] == "skipped":
        assert f"mb {rows[-1]['micro_batch']:>4}  skipped: the estimate, " in proc.stdout
        assert rows[-1]["estimate_gib"] > 0.15 and rows[-2]["estimate_gib"] <= 0.15
    else:
        assert "out of memory" in proc.stdout


def test_one_folder_per_run_and_a_resumed_run_continues_its_logs(tmp_path, monkeypatch):
    """No --checkpoint-dir: run `a` keeps config, metrics, TensorBoard events, W&B files and checkpoints in runs/a.
    Rolled back to its step-2 checkpoint, the steps after 2 are logged once, in metrics.jsonl and in TensorBoard,
    and to a new W&B run of the same group; resumed from its newest, the same W&B run goes on. Run `b` with --resume
    auto does not take `a`'s checkpoints; --resume latest without a run name asks which run. A line the crash cut
    short is dropped, not joined to the next one logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = RUN + ["--max-steps", "6", "--log-interval", "1", "--save-interval", "2", "--eval-interval", "0",
                  "--use-wandb"]
    launch("python", args, tmp_path, run_name="a", cwd=tmp_path)
    run = tmp_path / "runs" / "a"
    assert {"config.json", "metrics.jsonl", "checkpoints", "wandb", "wandb_id"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "final" / "COMPLETE.json").is_file() and list(run.glob("events.out.tfevents.*"))
    with open(run / "metrics.jsonl", "a") as f:  # the crash after step 6 cut a line short
        f.write('{"step": 7, "loss": 4.1, "l')
    again = launch("python", args + ["--resume", str(run / "checkpoints" / "step_000002")], tmp_path, run_name="a",
                   cwd=tmp_path)
    assert "resumed from" in again.stdout and "at step 2" in again.stdout
    assert [m["step"] for m in read_metrics(tmp_path, "a")] == [1, 2, 3, 4, 5, 6]
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]  # purged, then logged again: once each
    # a rollback (step 2 resumed, step 6 the newest checkpoint): W&B ignores steps below its last one, so the
    # new course goes to a new W&B run of the group `a`; the first keeps steps 1-6 of the abandoned course
    first_id = sorted((run / "wandb").glob("offline-run-*"))[0].name.rsplit("-", 1)[1]
    run_id = (run / "wandb_id").read_text().strip()
    assert run_id != first_id and sorted(p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")) \
        == sorted([first_id, run_id])
    assert f"scaletrain: resumed at step 2, before step 6 that W&B run {first_id} has already recorded" in again.stdout
    assert f"logs to a new W&B run {run_id} in group 'a'" in again.stdout
    # a crash after step 7 was logged, resumed from the newest checkpoint (6): the steps logged again are those
    # W&B has (an exact resume), and the W&B run goes on
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 4.1}\n')
    crash = launch("python", args + ["--max-steps", "8", "--resume", "latest"], tmp_path, run_name="a", cwd=tmp_path)
    assert "at step 6" in crash.stdout and "new W&B run" not in crash.stdout
    assert (run / "wandb_id").read_text().strip() == run_id
    assert [m["step"] for m in read_metrics(tmp_path, "a")] == [1, 2, 3, 4, 5, 6, 7, 8]
    other = launch("python", args + ["--resume", "auto"], tmp_path, run_name="b", cwd=tmp_path)
    assert "resumed" not in other.stdout and (tmp_path / "runs" / "b" / "checkpoints" / "final").is_dir()
    ask = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), *RUN, "--resume", "latest",
                          "--run-dir", str(tmp_path / "runs")], cwd=tmp_path, env=clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert ask.returncode == 1 and f"--resume latest: which run? Give its name, --run-name NAME (runs with " \
        f"checkpoints in {tmp_path / 'runs'}/: a, b), or the folder, --checkpoint-dir" in ask.stderr


def test_a_torn_last_line_is_cut_or_ended(tmp_path):
    """A line without its newline: cut off when it is not whole JSON (a kill mid-write), ended when it is (a
    writer that never added the newline); a file that ends well is left as it is."""
    from scaletrain.metrics import _end_torn_line

    cases = {"torn": ('{"step": 1}\n{"step": 2, "lo', '{"step": 1}\n'),
             "whole": ('{"step": 1}\n{"step": 2}', '{"step": 1}\n{"step": 2}\n'),
             "only": ('{"st', ''), "fine": ('{"step": 1}\n', '{"step": 1}\n')}
    for name, (before, after) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(before)
        _end_torn_line(path)
        assert path.read_text() == after, name
    _end_torn_line(tmp_path / "missing.jsonl")  # nothing to mend


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    """Without --run-name a run is named by the time it starts: a sweep started by a loop got one name for all,
    and every run but one stopped at the checkpoint folder's lock. Each claim now makes its folder, so the next
    takes <timestamp>-2, -3."""
    from scaletrain import run

    monkeypatch.setattr(run.time, "strftime", lambda fmt: "20261128-071331")
    names = [run._claim_new_name(tmp_path / "runs") for _ in range(3)]
    assert names == ["20261128-071331", "20261128-071331-2", "20261128-071331-3"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(names)
