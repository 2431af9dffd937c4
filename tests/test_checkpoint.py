"""Checkpoints: bit-identical resume, resume on another world size, crash and preemption safety,
keep-last-N, and the errors for bad checkpoints."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from scaletrain.checkpoint import COMPLETE, newest_checkpoint
from scaletrain.stop import Deadline

from .conftest import ROOT, clean_env, launch, launch_cmd, read_metrics, wait_for

BASE = ["--data-kind", "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--max-steps", "6",
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


def test_async_checkpoint_resumes_bit_identically(tmp_path):
    """On 2 ranks: a background save's collectives ran on the group the loop uses every step, from another thread,
    and the ranks hung (gloo waits 30 minutes) unless the save happened to miss the loop's."""
    args = BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(tmp_path / "ck")]
    args[args.index("--max-steps") + 1] = "10"
    launch("torchrun", args + ["--save-interval", "1", "--async-checkpoint"], tmp_path, run_name="straight",
           timeout=180)
    assert (tmp_path / "ck" / "step_000008" / COMPLETE).exists()
    launch("torchrun", args + ["--resume", str(tmp_path / "ck" / "step_000008")], tmp_path, run_name="resumed")
    assert losses(tmp_path, "resumed") == losses(tmp_path, "straight")[8:]


def optimizer_invariants(ckpt, tmp_path):
    """(weight decay per param group, the Adam step values, whether two states share one step tensor) as saved
    in a checkpoint: what a load left in memory, read back from the files a user has."""
    import torch

    if (ckpt / "deepspeed").is_dir():
        decays, steps, shared = set(), set(), False
        for f in sorted((ckpt / "deepspeed").glob("*optim_states.pt")):
            outer = torch.load(f, weights_only=False)["optimizer_state_dict"]
            base = outer.get("optimizer_state_dict") or outer["base_optimizer_state"]  # ZeRO-3 / ZeRO-1,2
            decays.add(tuple(g["weight_decay"] for g in base["param_groups"]))
            tensors = [s["step"] for s in base["state"].values()]
            steps |= {float(t) for t in tensors}
            shared |= len({t.untyped_storage().data_ptr() for t in tensors}) < len(tensors)  # torch.save keeps aliasing
        assert len(decays) == 1
        return decays.pop(), steps, shared
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt), str(tmp_path / "flat.pt"))
    optim = torch.load(tmp_path / "flat.pt", weights_only=False)["optim"]
    return (tuple(g["weight_decay"] for g in optim["param_groups"]),
            {float(s["step"]) for s in optim["state"].values()}, False)


@pytest.mark.parametrize("kind, launcher", [("zero2", "deepspeed"), ("zero3", "torchrun"), ("fsdp", "torchrun")])
def test_resume_on_the_same_and_another_world_size(tmp_path, kind, launcher):
    """Against a straight 2-rank run (--global-batch-size 4 of 1-row micro-batches: 2 micro-steps x 2 ranks): its
    step-2 checkpoint resumed on 2 ranks continues bit-identically; resumed on 1 rank to step 4 (the same flags: 4
    micro-steps) and on 2 ranks to the end (DeepSpeed through its universal checkpoint, FSDP2 through DCP) it matches
    to fp32 rounding, and reads the same rows (the data position at the end is the straight run's). After each load
    the optimizer holds this run's weight decays and one step count per parameter (read back from the checkpoints
    written afterwards). ZeRO-3's conversion to the universal format takes longer than DeepSpeed's process-group
    timeout (made 1 minute here; 10 by default, and large's conversion takes about 12): rank 1 waits for it."""
    def run(world, extra, name, ck="ck", via="torchrun", env=None):
        args = BASE + fp32(kind, tmp_path) + ["--batch-size", "1", "--global-batch-size", "4",
                                              "--checkpoint-dir", str(tmp_path / ck)]
        return launch(via if world > 1 else "python", args + extra, tmp_path, nproc=world, run_name=name,
                      extra_env=env)

    run(2, ["--save-interval", "2"], "straight", ck="straight_ck")
    step2 = str(tmp_path / "straight_ck" / "step_000002")
    run(2, ["--resume", step2], "same", ck="same_ck", via=launcher)
    on_one = run(1, ["--resume", step2, "--stop-at-step", "4"], "on_one")
    assert "global batch 4 x 32 tokens (micro-batch 1 x accumulation 4 x world 1)" in on_one.stdout
    assert "accumulation" not in on_one.stderr and "global batch" not in on_one.stderr, on_one.stderr  # as asked
    assert optimizer_invariants(tmp_path / "ck" / "step_000004", tmp_path) == ((0.1, 0.0), {4.0}, False)
    slow = {"DEEPSPEED_TIMEOUT": "1", "SCALETRAIN_FAULT": "universal_pause:62"} if kind == "zero3" else None
    run(2, ["--resume", "latest"], "on_two", env=slow)
    assert optimizer_invariants(tmp_path / "ck" / "final", tmp_path) == ((0.1, 0.0), {6.0}, False)
    data = [torch.load(tmp_path / c / "final" / "train_state_rank0.pt", weights_only=True)["data"]
            for c in ("straight_ck", "ck")]
    assert data[0] == data[1] == {"rows_consumed": 6 * 4}
    straight = losses(tmp_path, "straight")
    assert losses(tmp_path, "same") == straight[2:]  # same floats: bit-identical continuation
    resumed = losses(tmp_path, "on_one") + losses(tmp_path, "on_two")
    assert [s for s, _, _ in resumed] == [3, 4, 5, 6]
    for (_, a, ga), (_, b, gb) in zip(straight[2:], resumed):
        assert abs(a - b) < 2e-4 and abs(ga - gb) < 2e-3 * max(1, ga), (kind, straight, resumed)


def test_a_torchrun_restart_after_a_crash_resumes_exactly(tmp_path):
    """torchrun --max-restarts with --resume auto, what a run on a flaky cluster relies on: rank 1 dies (SIGKILL)
    before step 5; torchrun stops rank 0 and starts both again; they take over the dead run's lock, resume
    step_000004 and finish with the losses of a run that never crashed."""
    args = BASE + ["--engine", "fsdp", "--batch-size", "2", "--save-interval", "2", "--resume", "auto"]
    launch("torchrun", args + ["--checkpoint-dir", str(tmp_path / "ck_straight")], tmp_path, run_name="straight")
    cmd, env = launch_cmd("torchrun", args + ["--checkpoint-dir", str(tmp_path / "ck")], tmp_path, run_name="crashed")
    cmd[1:1] = ["--max-restarts", "1"]
    env["SCALETRAIN_FAULT"] = "crash:5@1"  # the first attempt only
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exitcode: -9" in proc.stderr and "resumed from" in proc.stdout and "step_000004 at step 4" in proc.stdout
    assert (tmp_path / "ck" / "final" / COMPLETE).is_file()
    assert losses(tmp_path, "crashed") == losses(tmp_path, "straight")


def test_sigkill_during_save_leaves_the_previous_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    args = BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck)]
    launch("python", args[:-1] + [str(tmp_path / "straight_ck"), "--save-interval", "0"], tmp_path,
           run_name="straight")
    launch("python", args + ["--stop-at-step", "2"], tmp_path, run_name="first")
    cmd, env = launch_cmd("python", args + ["--resume", "latest", "--save-interval", "2"], tmp_path,
                          run_name="killed")
    env["SCALETRAIN_FAULT"] = "save_pause:60"  # shards written, commit not yet done
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (ck / ".tmp-step_000004").is_dir() and any((ck / ".tmp-step_000004").iterdir()))
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


@pytest.mark.parametrize("launcher, sig, code", [
    ("python", signal.SIGTERM, 0), ("python", signal.SIGUSR1, 0),
    ("python", signal.SIGHUP, 0),  # the terminal closed: it killed the run, nothing saved
    # torchrun forwards the signal to its workers (USR1 only when named in --signals_to_handle), waits for them
    # (--shutdown_timeout, 30 s by default), then re-raises it: exit 1 however cleanly the workers saved
    ("torchrun", signal.SIGTERM, 1), ("torchrun", signal.SIGUSR1, 1),
    # the deepspeed runner dies of it (no handler on one node); the workers see it gone, save and exit
    ("deepspeed", signal.SIGTERM, -signal.SIGTERM),
])
def test_a_signal_to_the_launcher_saves_on_every_rank(tmp_path, launcher, sig, code):
    """The signal goes to the process the user (or scheduler) started, not to the workers."""
    ck = tmp_path / "ck"
    engine = ["--engine", "deepspeed"] if launcher == "deepspeed" else ["--engine", "fsdp"]
    args = BASE[:] + engine + ["--batch-size", "2", "--checkpoint-dir", str(ck)]
    args[args.index("--max-steps") + 1] = "100000"
    cmd, env = launch_cmd(launcher, args, tmp_path, nproc=2)
    if launcher == "torchrun":
        cmd[1:1] = ["--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
    # started as from a terminal: SIGHUP at its default even when the tests run under nohup (a run started under
    # nohup keeps going through a hangup, by design)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out[-3000:]
    assert "preempted at step" in out, out[-3000:]
    saved = newest_checkpoint(ck)
    assert saved is not None and saved.name.startswith("step_") and (saved / COMPLETE).exists()
    ranks = 2 if launcher != "python" else 1
    assert len(list(saved.glob("train_state_rank*.pt"))) == ranks
    if launcher == "deepspeed":
        wait_for(lambda: not [p for p in psutil.process_iter(["cmdline"])
                               if str(ck) in " ".join(p.info["cmdline"] or [])], timeout=60)  # nothing left behind


def test_max_time_keeps_a_step_and_a_save_free_and_always_takes_a_step():
    now = [100.0]
    deadline = Deadline(60.0, clock=lambda: now[0])
    assert not deadline.near() and not Deadline(None).near()  # past the limit, but no step measured yet
    now[0] = 103.0
    deadline.step_done(0.0, 0.0)  # a 3 s step
    assert deadline.near()  # 103 s: this run started past its limit, and took one step
    deadline = Deadline(60.0, clock=lambda: now[0])
    for t, saved, longest in ((10.0, 0.0, 0.0), (12.0, 0.0, 0.0), (19.0, 5.0, 5.0), (21.0, 0.0, 5.0)):
        now[0] = t  # steps of 2 s; one with a save of 5 s
        deadline.step_done(saved, longest)
    assert (deadline.longest_step, deadline.longest_save) == (2.0, 5.0)
    now[0] = 52.9
    assert not deadline.near()  # 52.9 + 2 + 5 < 60
    now[0] = 53.1
    assert deadline.near()
    # the next step writes an interval checkpoint, so a stop after it is a second save: both are kept free (the stop
    # came one save late, past the limit, when the step before an interval save went on)
    now[0] = 23.0
    deadline.step_done(0.0, 5.0, next_saves=True)
    now[0] = 47.9
    assert not deadline.near()  # 47.9 + 2 + 2 x 5 < 60
    now[0] = 48.1
    assert deadline.near()


def test_max_time_counts_an_estimated_save_until_one_is_measured(tmp_path):
    """A job whose limit comes before its first interval save: the stop's save is counted from a write probe in the
    checkpoint folder (this rank's share of a checkpoint at the speed probed, doubled) until a save is measured."""
    from scaletrain.checkpoint.recovery import write_speed

    now = [0.0]
    deadline = Deadline(600.0, clock=lambda: now[0])
    said = deadline.estimate_first_save(4e9, write_speed(tmp_path, 0))
    assert said.startswith("--max-time: no save measured yet; 4.00 GB a rank at the ") and "MB/s written here" in said
    assert deadline.save_estimate > 0 and not list(tmp_path.iterdir())  # the probe is gone
    deadline.save_estimate = 100.0  # what this folder's speed gives is the machine's: fix it for the arithmetic
    now[0] = 10.0
    deadline.step_done(0.0, 0.0)  # a 10 s step, no save measured
    assert deadline.longest_save == 100.0 and "a save 100.0 s (estimated)" in deadline.describe()
    now[0] = 489.0
    assert not deadline.near()  # 489 + 10 + 100 < 600
    now[0] = 491.0
    assert deadline.near()  # before: counted no save, so the stop's save of 100 s would run 1 s past the limit
    deadline.step_done(3.0, 3.0)  # the first save measured: 3 s
    assert deadline.longest_save == 3.0 and "(estimated)" not in deadline.describe()
    assert Deadline(None).estimate_first_save(4e9, 1e9) is None  # without --max-time: no estimate


def test_max_time_counts_from_torchruns_start_so_that_a_restart_keeps_the_clock():
    """A torchrun worker's clock starts with its agent (its parent), not with itself: the workers a restart after a
    crash starts would otherwise get the whole --max-time again, past the job's own limit."""
    code = "import time; from scaletrain.stop import run_age; time.sleep(1); print(run_age())"
    time.sleep(1.5)  # this process (the stand-in agent) is older than its child by this much, at least

    def age(**env):
        done = subprocess.run([sys.executable, "-c", code], env={**clean_env(), **env}, cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=True)
        return float(done.stdout)

    alone, worker = age(), age(TORCHELASTIC_RUN_ID="job")
    assert 1 <= alone < worker - 1.4, (alone, worker)


def test_max_time_saves_and_stops_in_time(tmp_path):
    """--max-time: the run stops before the step that would not end in time, with its checkpoint, and exits 0
    before the limit (each save here takes 1 s longer, as a large model's would)."""
    ck = tmp_path / "ck"
    args = BASE[:] + ["--engine", "fsdp", "--checkpoint-dir", str(ck), "--save-interval", "25", "--max-time", "20s"]
    args[args.index("--max-steps") + 1] = "100000"
    args[args.index("--log-interval") + 1] = "25"
    cmd, env = launch_cmd("python", args, tmp_path)
    env["SCALETRAIN_FAULT"] = "save_pause:1"
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = re.search(r"stopped at step (\d+) \(--max-time 20s: ([\d.]+) s of 20 s since the start; a "
                     r"step took up to [\d.]+ s, a save ([\d.]+) s\); checkpoint (\S+) saved", done.stdout)
    assert said, done.stdout[-3000:]
    step, t, save = int(said.group(1)), float(said.group(2)), float(said.group(3))
    assert t <= 20 and save >= 1, said.group(0)  # saved and out in time; the interval saves measured the save
    saved = newest_checkpoint(ck)
    assert saved is not None and saved.name == f"step_{step:06d}" and str(saved) == said.group(4)
    record = json.loads((saved / COMPLETE).read_text())
    assert record["step"] == step and record["stopped_for"] == "time_limit"  # what launch/slurm/requeue.sh reads
    assert record["save_seconds"] >= 1  # how long its save took, slowed as it was
    # resumed without the slowdown: the estimate starts from the record's save time, not from none (the stop's own
    # save here takes a fraction of a second; the longest save said is the record's)
    env.pop("SCALETRAIN_FAULT")
    args[args.index("--max-time") + 1] = "1s"  # past it at once: one step, then the stop
    again = subprocess.run(launch_cmd("python", args + ["--resume", "latest"], tmp_path)[0], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    said = re.search(r"stopped at step (\d+) \(--max-time 1s: .* a save ([\d.]+) s\)", again.stdout)
    assert again.returncode == 0 and said, again.stdout[-3000:] + again.stderr[-3000:]
    assert int(said.group(1)) == step + 1 and float(said.group(2)) >= 1, said.group(0)


def test_a_stop_at_a_step_just_saved_keeps_the_measured_save_time(tmp_path):
    """A stop right after an interval save re-records that checkpoint (the same files) with why the run stopped; its
    record lost the save's measured time, so a resume from it started --max-time's estimate from none (and the test
    above failed whenever its stop fell on an interval step)."""
    ck = tmp_path / "ck"
    args = BASE[:] + ["--engine", "fsdp", "--checkpoint-dir", str(ck), "--save-interval", "1", "--max-time", "1s"]
    done = launch("python", args, tmp_path)
    assert "stopped at step 1 (--max-time 1s" in done.stdout, done.stdout[-3000:]
    record = json.loads((ck / "step_000001" / COMPLETE).read_text())
    assert record["stopped_for"] == "time_limit" and record["save_seconds"] > 0, record


def test_a_run_started_with_nohup_goes_on_through_a_hangup(tmp_path):
    """nohup (SIGHUP ignored) is how a run is kept alive past the terminal: a hangup must not stop it."""
    args = BASE[:] + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(tmp_path / "ck")]
    args[args.index("--max-steps") + 1] = "100000"
    cmd, env = launch_cmd("python", args, tmp_path, nproc=1)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    proc.send_signal(signal.SIGHUP)
    seen = len(metrics.read_text().splitlines())
    wait_for(lambda: len(metrics.read_text().splitlines()) >= seen + 5)  # still training
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "preempted at step" in out, out[-3000:]


def _ctrl_c_run(tmp_path, launcher, extra_env=None):
    """A run started as from a terminal, in its own process group (the terminal's foreground group), training until
    stopped; with DataLoader workers under plain python (Ctrl-C reaches them too)."""
    from scaletrain.data.prepare import prepare_domain
    from scaletrain.data.sample import create_sample_pretraining_data

    args = BASE[:] + ["--engine", "deepspeed" if launcher == "deepspeed" else "fsdp", "--batch-size", "2",
                      "--checkpoint-dir", str(tmp_path / "ck")]
    args[args.index("--max-steps") + 1] = "100000"
    if launcher == "python":
        raw = create_sample_pretraining_data(tmp_path / "raw", scale=0.02)
        prepare_domain("general", [str(raw["general"])], str(tmp_path / "data"), quiet=True, shard_tokens=8192,
                       chunk_tokens=1024)
        args = [a for a in args if a not in ("--data-kind", "synthetic")] + [
            "--data-dir", str(tmp_path / "data"), "--data-sources", "general", "--data-mix-weights", "1",
            "--num-workers", "2"]
    cmd, env = launch_cmd(launcher, args, tmp_path, nproc=2)
    env.update(extra_env or {})
    # SIGINT at its default, as under a terminal, even when the tests run as a background job (which ignores it, and
    # so do the runs it starts: a run started so keeps ignoring it, by design)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, timeout=300)
    return proc


@pytest.mark.parametrize("launcher", ["python", "deepspeed"])
def test_ctrl_c_saves_then_stops(tmp_path, launcher):
    """Ctrl-C (SIGINT to the terminal's foreground process group: the launcher, the workers, their DataLoader
    workers) ended the run with "interrupted" and nothing saved since the last checkpoint. Now it saves the step
    it is at, on every rank, says so, and exits 130 (a `train && convert` chain stops)."""
    proc = _ctrl_c_run(tmp_path, launcher)
    if launcher == "python":  # a worker ended by it left the main process to fail once the prefetched rows ran out
        metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        for w in workers:
            w.send_signal(signal.SIGINT)
        seen = len(metrics.read_text().splitlines())
        wait_for(lambda: len(metrics.read_text().splitlines()) >= seen + 12)  # more rows than were prefetched
        assert all(w.is_running() for w in workers) and proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert "scaletrain: Ctrl-C: saving a checkpoint after this step" in out, out[-3000:]
    assert "interrupted (Ctrl-C) at step" in out and "exited unexpectedly" not in out, out[-3000:]
    if launcher == "python":
        assert proc.returncode == 130, out[-3000:]
    saved = newest_checkpoint(tmp_path / "ck")
    assert saved is not None and saved.name.startswith("step_") and (saved / COMPLETE).exists()
    assert len(list(saved.glob("train_state_rank*.pt"))) == (2 if launcher == "deepspeed" else 1)


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    proc = _ctrl_c_run(tmp_path, "python", {"SCALETRAIN_FAULT": "save_pause:60"})  # the save waits to commit
    os.killpg(proc.pid, signal.SIGINT)
    wait_for(lambda: any((tmp_path / "ck").glob(".tmp-step_*")))
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted\n" in out and time.time() - t0 < 30, out[-3000:]
    assert newest_checkpoint(tmp_path / "ck") is None  # the save was not committed; the next start cleans it


def test_keep_last_n_keeps_the_right_ones(tmp_path):
    ck = tmp_path / "ck"
    launch("python", BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck), "--save-interval",
                             "1", "--keep-last-n-checkpoints", "2", "--eval-interval", "2", "--data-kind", "synthetic"],
           tmp_path)
    names = sorted(p.name for p in ck.iterdir() if p.is_dir())
    assert names == ["best", "final", "step_000004", "step_000005"]
    assert (ck / "latest").read_text().strip() == "final"


def test_a_run_with_default_flags_ends_with_a_final_checkpoint(tmp_path):
    """No --save-interval, no --checkpoint-dir, no --warmup-steps: what a newcomer runs. It must leave something to
    convert (and a 3-step run must not trip on a default warmup longer than the run)."""
    proc = launch("python", ["--data-kind", "synthetic", "--max-steps", "3", "--max-seq-length", "32", "--batch-size",
                             "2", "--no-use-tensorboard"], tmp_path, cwd=tmp_path)
    assert "schedule: lr warms up to 0.0003 over 1 step (the default: 1% of --max-steps, at least 1 and at most " \
           "2000; set --warmup-steps to choose), then cosine to 3e-05 at step 3" in proc.stdout
    final = tmp_path / "runs" / "t" / "checkpoints" / "final"  # the run's own folder
    assert (final / COMPLETE).is_file() and json.loads((final / COMPLETE).read_text())["step"] == 3
    assert (final.parent / "latest").read_text().strip() == "final"
    assert f"python launch/convert.py {final} exports/t" in proc.stdout
    # a checkpoint every 1000 steps by default (it was none: without a validation split, nothing until final)
    assert "; step_N every 1000 steps (the last 3 kept)" in proc.stdout


def test_best_survives_a_resume_from_an_earlier_step(tmp_path):
    """step_N and final remember the best validation loss of their run, so the first evaluation after a
    resume replaces best only when it is better."""
    ck = tmp_path / "ck"
    args = BASE[:] + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck), "--eval-interval", "2",
                      "--eval-steps", "2", "--save-interval", "2"]
    launch("python", args + ["--stop-at-step", "4"], tmp_path, run_name="first")
    best = json.loads((ck / "best" / COMPLETE).read_text())
    assert json.loads((ck / "step_000004" / COMPLETE).read_text())["best_val_loss"] == best["best_val_loss"]
    # resumed with a learning rate that wrecks the model: later validation losses are all worse
    launch("python", args + ["--resume", "latest", "--learning-rate", "1.0"], tmp_path, run_name="wrecked")
    val = [m["val_loss"] for m in read_metrics(tmp_path, "wrecked") if "val_loss" in m]
    assert val and min(val) > best["best_val_loss"]
    after = json.loads((ck / "best" / COMPLETE).read_text())
    assert (after["step"], after["best_val_loss"]) == (best["step"], best["best_val_loss"])


def test_rolling_back_sets_the_later_checkpoints_aside(tmp_path):
    """Resumed from an earlier checkpoint than the folder's newest (rolling back past a bad stretch), the run takes a
    new course: the later checkpoints are moved aside at once, so a crash before its first save resumes the new
    course, not the one left (``latest`` named step 6 until then), and keep-last-N counts only the new course's."""
    ck = tmp_path / "ck"
    args = BASE[:] + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck), "--save-interval", "2",
                      "--max-steps", "8"]
    launch("python", args + ["--stop-at-step", "6"], tmp_path, run_name="r")
    first = losses(tmp_path, "r")
    # the new course dies at its first save (a full disk)
    proc = launch("python", args + ["--resume", str(ck / "step_000002")], tmp_path, run_name="r", check=False,
                  extra_env={"SCALETRAIN_FAULT": "save_enospc:0@step_000004"})
    assert proc.returncode != 0 and "saving checkpoint" in proc.stderr
    aside = [p for p in ck.iterdir() if p.name.startswith("superseded-by-step_000002-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_000004", "step_000006"]
    assert f"moved step_000004, step_000006 to {aside[0]}" in proc.stderr
    assert newest_checkpoint(ck) == ck / "step_000002"  # what --resume auto takes now
    launch("python", args + ["--resume", "auto"], tmp_path, run_name="r")
    assert losses(tmp_path, "r") == first + losses(tmp_path, "r")[6:]  # steps 3-6 again, equal: an exact resume
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith(("step_", "final"))) == \
        ["final", "step_000002", "step_000004", "step_000006"]  # the new course's, keep-last-N 3
    assert all((aside[0] / n / COMPLETE).is_file() for n in ("step_000004", "step_000006"))  # nothing deleted


def test_a_crash_between_the_renames_of_final_loses_nothing(tmp_path):
    """Re-saving final (a finished run resumed with more steps) moves the old copy aside, then renames the new one
    in: killed in between, the next start puts a complete final back instead of deleting both."""
    ck = tmp_path / "ck"
    args = BASE[:] + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck), "--max-steps", "2"]
    launch("python", args, tmp_path, run_name="one")
    args += ["--max-steps", "3", "--resume", "latest"]
    proc = launch("python", args, tmp_path, run_name="one", check=False, extra_env={"SCALETRAIN_FAULT": "swap_kill"})
    assert proc.returncode == -signal.SIGKILL
    assert not (ck / "final").exists() and (ck / ".old-final" / COMPLETE).is_file()
    assert (ck / ".tmp-final" / COMPLETE).is_file()
    proc = launch("python", args, tmp_path, run_name="one")
    assert "final: committed the new copy" in proc.stdout
    assert (ck / "final" / COMPLETE).is_file() and not list(ck.glob(".old-*")) and not list(ck.glob(".tmp-*"))
    assert json.loads((ck / "final" / COMPLETE).read_text())["step"] == 3  # the new copy, resumed: nothing to train


def test_bad_run_state_is_an_error_not_a_traceback(tmp_path):
    import torch

    ck = tmp_path / "ck"
    args = BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck)]
    launch("python", args + ["--stop-at-step", "2"], tmp_path)
    args += ["--no-verify-checkpoint"]  # the checksums would catch these first: the loaders' own errors here
    state_file = ck / "step_000002" / "train_state_rank0.pt"
    good = torch.load(state_file, weights_only=True)
    torch.save(dict(good, data={"global_row": 0}), state_file)  # a data state without positions
    p = launch("python", args + ["--resume", "latest"], tmp_path, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "error: the checkpoint's data state {'global_row': 0} is not a synthetic-data state" in p.stderr
    state_file.write_bytes(b"not a torch file")
    p = launch("python", args + ["--resume", "latest"], tmp_path, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "step_000002: cannot read train_state_rank0.pt" in p.stderr
    torch.save(good, state_file)
    (ck / "step_000002" / ".metadata").write_bytes(b"garbage")  # the engine's own state
    p = launch("python", args + ["--resume", "latest"], tmp_path, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "step_000002/.metadata is damaged or not a checkpoint file" in p.stderr


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


def test_wsd_stable_checkpoint_anneals_with_a_new_max_steps(tmp_path):
    """WSD: a run planned for 40 steps stops in its stable phase at step 6; resumed with --max-steps 10
    --decay-steps 4 it decays at once from the peak to --min-learning-rate (annealing), its loss stream continuing
    the stable run's."""
    ck = tmp_path / "ck"
    args = BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck), "--lr-schedule", "wsd",
                   "--min-learning-rate", "2e-4"]
    args[args.index("--max-steps") + 1] = "40"
    stable = launch("python", args + ["--stop-at-step", "6"], tmp_path, run_name="stable")
    assert "stays there to step 32, then decays (linear) to 0.0002 at step 40 (wsd, 8 decay steps)" in stable.stdout
    args[args.index("--max-steps") + 1] = "10"
    annealed = launch("python", args + ["--resume", "latest", "--decay-steps", "4"], tmp_path, run_name="stable")
    assert "stays there to step 6, then decays (linear) to 0.0002 at step 10 (wsd, 4 decay steps)" in annealed.stdout
    lrs = {m["step"]: m["lr"] for m in read_metrics(tmp_path, "stable")}
    assert lrs[1] == pytest.approx(2e-3) and all(lrs[s] == pytest.approx(2e-3) for s in range(1, 7))  # stable
    assert [lrs[s] for s in range(7, 11)] == pytest.approx([2e-3, 1.55e-3, 1.1e-3, 6.5e-4])  # 4 decay steps
    assert sorted(lrs) == list(range(1, 11))  # one line a step: the resumed run continues the same log


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it():
    """A background job of a script starts with SIGINT ignored: Ctrl-C in that terminal is not meant for it."""
    from scaletrain.stop import INTERRUPT, StopSignals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        StopSignals(None, True).close()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stops = StopSignals(None, False)
        assert signal.getsignal(signal.SIGINT) == stops._interrupt
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a flag, and the next one raises
        time.sleep(0.1)
        assert stops.flag == INTERRUPT and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        stops.close()
    finally:
        for s, h in before.items():
            signal.signal(s, h)
