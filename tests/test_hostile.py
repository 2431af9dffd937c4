"""A hostile world: two runs in one folder, a save failing on one rank, unwritable folders, damaged checkpoints,
interrupted pruning, impossible resumes. Launch tests are few and small; the rest call the store directly."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaletrain.checkpoint import COMPLETE, CheckpointError, newest_checkpoint
from scaletrain.checkpoint.integrity import hash_share, verify_folder
from scaletrain.checkpoint.lock import LOCK, STALE_S, FolderLock
from scaletrain.checkpoint.recovery import check_writable, recover
from scaletrain.checkpoint.store import CheckpointStore, resolve_resume
from scaletrain.files import process_identity

from .conftest import ROOT, launch, launch_cmd, wait_for
from .test_checkpoint import BASE, fp32


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _biggest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE), key=lambda p: p.stat().st_size)


# ---- 1. two runs, one folder -----------------------------------------------------------------------------------
def test_a_second_run_on_a_locked_folder_stops_and_a_dead_holder_is_taken_over(tmp_path):
    ck = tmp_path / "ck"
    args = BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck), "--save-interval", "2"]
    cmd, env = launch_cmd("python", args, tmp_path, run_name="first")
    env["SCALETRAIN_FAULT"] = "save_pause:60"  # holds the first run inside its first save
    first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (ck / ".tmp-step_000002").is_dir() and any((ck / ".tmp-step_000002").iterdir()))
        second = launch("python", args, tmp_path, run_name="second", check=False)
        assert second.returncode == 1
        assert f"--checkpoint-dir {ck} is in use by run 'first' (pid {first.pid} on {socket.gethostname()}" \
            in second.stderr
        assert (ck / ".tmp-step_000002").is_dir()  # the first run's save in flight was left alone
        # the same --run-name with checkpoints elsewhere: it set the live run's logs aside as superseded and wrote
        # its own into the folder; now the run folder is locked too
        logs = tmp_path / "runs" / "first"
        same_name = launch("python", BASE + ["--checkpoint-dir", str(tmp_path / "ck2")], tmp_path, run_name="first",
                           check=False)
        assert same_name.returncode == 1 and f"the run folder {logs} (--run-dir {tmp_path / 'runs'}, --run-name " \
            f"first) is in use by run 'first' (pid {first.pid}" in same_name.stderr, same_name.stderr[-2000:]
        assert (logs / "metrics.jsonl").is_file() and not list(logs.glob("superseded-*"))
    finally:
        first.kill()
        first.wait()
    after = launch("python", args, tmp_path, run_name="second")
    assert f"took over the lock of {ck / LOCK} held by run 'first' (pid {first.pid}" in after.stderr
    assert f"its process {first.pid} on this host is gone" in after.stderr
    assert not (ck / LOCK).exists()  # released at the end
    # resuming with other settings says what changed
    cmd, env = launch_cmd("python", args + ["--resume", "latest", "--max-steps", "8", "--learning-rate", "1e-3"],
                          tmp_path, run_name="second")
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming final with --learning-rate 0.001; the checkpoint was saved with 0.002" in p.stderr
    assert "resuming final with --max-steps 8; the checkpoint was saved with 6" in p.stderr
    assert "resuming final: the learning-rate schedule changed: step 7 takes lr " in p.stderr


def test_a_fresh_start_on_another_runs_checkpoints_is_refused_unless_told_to_overwrite(tmp_path):
    """The same --run-name again (or a shared --checkpoint-dir) without --resume used to train from scratch over the
    finished run's checkpoints: its final and best replaced, and until the new run's first save `--resume latest`
    would have taken the old run's. Now it stops before writing anything; --overwrite-checkpoints deletes them."""
    ck = tmp_path / "ck"
    args = BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck), "--max-steps", "2"]
    launch("python", args + ["--save-interval", "1"], tmp_path, run_name="first")
    before = {p.relative_to(ck): p.read_bytes() for p in ck.rglob("*") if p.is_file() and p.name != LOCK}
    assert {"final", "step_000001", "latest"} <= {str(p).split("/")[0] for p in before}
    again = launch("python", args, tmp_path, run_name="second", check=False)
    assert again.returncode == 1, again.stderr[-3000:]
    assert (f"{ck} already holds 2 complete checkpoint(s) of run 'first' (newest final, step 2), and this run does "
            f"not resume: continue that run with --resume latest") in again.stderr
    assert "Traceback" not in again.stderr
    after = {p.relative_to(ck): p.read_bytes() for p in ck.rglob("*") if p.is_file() and p.name != LOCK}
    assert after == before  # not a byte changed
    over = launch("python", args + ["--overwrite-checkpoints"], tmp_path, run_name="second")
    assert f"--overwrite-checkpoints: deleted 2 checkpoint(s) of run 'first' from {ck}" in over.stderr
    assert sorted(p.name for p in ck.iterdir() if p.name != LOCK) == ["final", "latest"]  # step_000001 went too
    assert json.loads((ck / "final" / COMPLETE).read_text())["config"]["run_name"] == "second"
    # a run that resumes is not concerned: --resume auto continues the second run (finished: nothing to train)
    done = launch("python", args + ["--resume", "auto"], tmp_path, run_name="second")
    assert "the run is complete at --max-steps 2: nothing to train" in done.stdout and "done, 2 steps" in done.stdout


def test_a_second_preparation_of_a_domain_stops_instead_of_deleting_the_first(tmp_path, capsys):
    """Each prepare deleted every `.<domain>.tmp-*` as a crash's leftovers, a live one's too: two preparations of one
    domain at once crashed the first (FileNotFoundError on its shard). The domain's lock now stops the second,
    naming the first; once the first is gone, its leftovers are cleaned and the lock taken over."""
    from scaletrain.data.prepare import prepare_domain

    (tmp_path / "c.txt").write_text("some text to prepare. " * 200)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from scaletrain.checkpoint.lock import FolderLock; "
                               f"FolderLock(Path({str(out)!r}), 'prepare --domain d', lock_name='.d.lock'); "
                               "print('held', flush=True); time.sleep(120)"],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        work = out / f".d.tmp-{holder.pid}"
        work.mkdir()
        (work / "shard-00000.tar").write_bytes(b"in progress")
        with pytest.raises(CheckpointError, match=rf"--output {out}, domain d, is in use by run 'prepare --domain d' "
                                                  rf"\(pid {holder.pid} on .*two preparations of one domain delete "
                                                  rf"each other's work"):
            prepare_domain("d", [str(tmp_path / "c.txt")], str(out), quiet=True)
        assert (work / "shard-00000.tar").read_bytes() == b"in progress" and not (out / "d").exists()
    finally:
        holder.kill()
        holder.wait()
    prepare_domain("d", [str(tmp_path / "c.txt")], str(out), quiet=True)
    assert f"its process {holder.pid} on this host is gone" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["d"]  # the dead one's leftovers and the lock are gone


def test_lock_rules(tmp_path, monkeypatch):
    held = FolderLock(tmp_path, "a")
    record = json.loads((tmp_path / LOCK).read_text())
    assert record["run_name"] == "a" and record["pid"] == os.getpid()
    # a live holder on another host, refreshed just now: refused, naming it
    (tmp_path / LOCK).write_text(json.dumps(dict(record, host="node-7", pid=1234, run_name="other")))
    with pytest.raises(CheckpointError, match=r"in use by run 'other' \(pid 1234 on node-7"):
        FolderLock(tmp_path, "b")
    # the same Slurm job (a requeued attempt) may take it
    (tmp_path / LOCK).write_text(json.dumps(dict(record, host="node-7", pid=1234, slurm_job_id="99")))
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    assert "earlier attempt of this Slurm job 99" in FolderLock(tmp_path, "b").warning
    monkeypatch.delenv("SLURM_JOB_ID")
    # torchrun's elastic restart put rank 0 on another host: an earlier attempt of the same run id may be taken, the
    # same attempt, another run id and torchrun's default id "none" (no job named) may not
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-5")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    for theirs in ({"run_id": "job-5", "restart": 2}, {"run_id": "job-4", "restart": 0}, None):
        (tmp_path / LOCK).write_text(json.dumps(dict(record, host="node-7", pid=1234, torchelastic=theirs)))
        with pytest.raises(CheckpointError, match=r"in use by run 'a' \(pid 1234 on node-7"):
            FolderLock(tmp_path, "b")
    (tmp_path / LOCK).write_text(json.dumps(dict(record, host="node-7", pid=1234,
                                                 torchelastic={"run_id": "job-5", "restart": 1})))
    lock = FolderLock(tmp_path, "b")
    assert "it is attempt 1 of this torchrun job 'job-5' (this is attempt 2)" in lock.warning
    assert json.loads((tmp_path / LOCK).read_text())["torchelastic"] == {"run_id": "job-5", "restart": 2}
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    (tmp_path / LOCK).write_text(json.dumps(dict(record, host="node-7", pid=1234,
                                                 torchelastic={"run_id": "none", "restart": 0})))
    with pytest.raises(CheckpointError, match=r"in use by run 'a'"):
        FolderLock(tmp_path, "b")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    # not refreshed for longer than STALE_S: a dead holder elsewhere
    (tmp_path / LOCK).write_text(json.dumps(dict(record, host="node-7", pid=1234)))
    old = time.time() - STALE_S - 5
    os.utime(tmp_path / LOCK, (old, old))
    assert "last refreshed 10 minutes ago" in FolderLock(tmp_path, "c").warning
    # a live process on this host keeps its lock however long it is silent (stopped with Ctrl-Z, say); its number
    # given to a later process does not
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        mine = dict(record, pid=sleeper.pid, process=process_identity(sleeper.pid))
        (tmp_path / LOCK).write_text(json.dumps(mine))
        os.utime(tmp_path / LOCK, (old, old))
        with pytest.raises(CheckpointError, match=rf"has not refreshed the lock for 10 minutes but its process "
                                                  rf"{sleeper.pid} is alive on this host, stopped, suspended or stuck"):
            FolderLock(tmp_path, "c")
        (tmp_path / LOCK).write_text(json.dumps(dict(mine, process=mine['process'] + '0')))  # another start tick
        assert f"its process {sleeper.pid} on this host is gone (the number now belongs to a later process)" in \
            FolderLock(tmp_path, "c").warning
    finally:
        sleeper.kill()
        sleeper.wait()
    # a damaged or hand-edited lock on this host names no live process: taken over, not a traceback
    for pid in ("x", None, 0, -1):
        (tmp_path / LOCK).write_text(json.dumps(dict(record, pid=pid)))
        assert "on this host is gone" in FolderLock(tmp_path, "c").warning
    # --force-lock takes a fresh one
    (tmp_path / LOCK).write_text(json.dumps(dict(record, host="node-7", pid=1234)))
    assert "--force-lock was given" in FolderLock(tmp_path, "d", force=True).warning
    held.release()


def test_a_lock_of_an_ended_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """The next job of a chain (--dependency=afterany) after a job killed outright on another node: the lock,
    refreshed seconds ago, is taken over once Slurm says the holder's job ended (or no longer knows it); a job
    that is running, or requeued and pending, keeps its lock; without scontrol the 10 minutes rule stays."""
    standin = tmp_path / "slurm"
    standin.mkdir()
    monkeypatch.setenv("PATH", f"{ROOT / 'tests' / 'slurm'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_STANDIN_DIR", str(standin))
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    folder = tmp_path / "ck"
    folder.mkdir()
    record = {"host": "node-7", "pid": 1234, "run_name": "chain", "slurm_job_id": "100", "started": "earlier"}
    for state in ("RUNNING", "PENDING", "COMPLETING"):
        (standin / "jobstate_100").write_text(state)
        (folder / LOCK).write_text(json.dumps(record))
        with pytest.raises(CheckpointError, match=r"in use by run 'chain' \(pid 1234 on node-7"):
            FolderLock(folder, "chain")
    # a job Slurm suspended (SIGSTOP) stops refreshing its lock: 10 minutes of silence do not make it stale
    (standin / "jobstate_100").write_text("SUSPENDED")
    (folder / LOCK).write_text(json.dumps(record))
    old = time.time() - STALE_S - 60
    os.utime(folder / LOCK, (old, old))
    with pytest.raises(CheckpointError, match=r"has not refreshed the lock for 11 minutes but Slurm says its job 100 "
                                              r"is not over, stopped, suspended or stuck: end it"):
        FolderLock(folder, "chain")
    for state in ("NODE_FAIL", "OUT_OF_MEMORY", "CANCELLED"):
        (standin / "jobstate_100").write_text(state)
        (folder / LOCK).write_text(json.dumps(record))
        lock = FolderLock(folder, "chain")
        assert f"its Slurm job 100 has ended ({state})" in lock.warning
        assert json.loads((folder / LOCK).read_text())["slurm_job_id"] == "101"
        lock.release()
    (standin / "jobstate_100").unlink()  # ended long ago: the controller has forgotten it
    (folder / LOCK).write_text(json.dumps(record))
    lock = FolderLock(folder, "chain")
    assert "its Slurm job 100 is no longer known to Slurm (it ended)" in lock.warning
    lock.release()
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol here: only the age can tell
    (folder / LOCK).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="in use by run 'chain'"):
        FolderLock(folder, "chain")


# ---- 2. a save failing on one rank -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fsdp", "zero2"])
def test_a_save_failing_on_one_rank_stops_every_rank_at_once(tmp_path, kind):
    """Rank 1's disk is full inside the engine's own save: both ranks stop within seconds (not the 30-minute
    process-group timeout) with one line naming rank 1 and the space; the previous checkpoint and latest stay."""
    ck = tmp_path / "ck"
    args = BASE + fp32(kind, tmp_path) + ["--batch-size", "1", "--checkpoint-dir", str(ck)]
    t0 = time.time()  # one run: step_000002 is written, step_000004 fails on rank 1
    p = launch("torchrun", args + ["--save-interval", "2"], tmp_path, check=False, timeout=240,
               extra_env={"SCALETRAIN_FAULT": "save_enospc:1@step_000004"})
    assert p.returncode != 0 and time.time() - t0 < 200
    errors = [x for x in p.stderr.splitlines() if "error: saving checkpoint" in x]
    assert len(errors) == 2, p.stderr[-3000:]  # one line per rank, the same cause
    for line in errors:
        assert "step_000004 failed on rank 1: OSError: [Errno 28] No space left on device" in line
        assert "GiB free on" in line and "this checkpoint needs about" in line
        assert "the previous checkpoint" in line and "step_000002 is intact and latest unchanged" in line
    assert f'File "{ROOT / "scaletrain"}' not in p.stderr  # no traceback through our code (torchrun prints its own)
    assert (ck / "latest").read_text().strip() == "step_000002" and not list(ck.glob(".tmp-*"))


def test_a_full_disk_under_the_logs_warns_and_the_run_trains_on_to_its_checkpoint(tmp_path):
    """metrics.jsonl on a full disk (/dev/full: every write is ENOSPC) while the checkpoints are elsewhere, as with
    logs in a home quota and checkpoints on scratch: the run used to die at its first log line with three tracebacks
    and no checkpoint; now one warning, every step on the console, and its final checkpoint."""
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").symlink_to("/dev/full")
    p = launch("python", BASE + ["--engine", "fsdp", "--batch-size", "2", "--max-steps", "3"], tmp_path)
    assert p.stderr.count("scaletrain: warning: writing metrics.jsonl in") == 1, p.stderr[-3000:]
    assert "failed (OSError: [Errno 28] No space left on device); it is not written for the rest of this run" \
        in p.stderr and "Traceback" not in p.stderr
    assert all(f"step {s:>6d} | loss" in p.stdout for s in (1, 2, 3))
    assert (tmp_path / "checkpoints" / "final" / COMPLETE).is_file()
    # before the first step a run folder that cannot be written stops the run, in one line
    (tmp_path / "runs" / "u").mkdir()
    (tmp_path / "runs" / "u" / "config.json").symlink_to("/dev/full")
    p = launch("python", BASE + ["--engine", "fsdp", "--checkpoint-dir", str(tmp_path / "ck_u")], tmp_path,
               run_name="u", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"error: --run-dir {tmp_path / 'runs'}: the run's folder {tmp_path / 'runs' / 'u'} cannot be written " \
           f"(No space left on device); free space there or give another --run-dir" in p.stderr


def test_tensorboard_and_samples_on_a_full_disk_are_dropped_with_a_warning(tmp_path, capsys, monkeypatch):
    """The logger's other files: TensorBoard's event file (which its writer thread reopens to append each record)
    and samples.jsonl fail with ENOSPC, both pointed at /dev/full after the first step; logging goes on without
    them, close() included. The writer thread's own traceback (threading.excepthook) is not printed on top of the
    one-line warning."""
    import threading

    from scaletrain.cli import parse_config
    from scaletrain.metrics import MetricsLogger

    printed = []  # what threading would print: the exceptions that reach its hook
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.exc_value))

    log = MetricsLogger(parse_config(["--data-kind", "synthetic"]), str(tmp_path), True, {})
    log.log(1, {"loss": 2.0})
    log.tb.flush()
    [events] = tmp_path.glob("events.out.tfevents.*")
    events.unlink()
    events.symlink_to("/dev/full")
    (tmp_path / "samples.jsonl").symlink_to("/dev/full")
    log.log_samples(2, {"general": [("Once", "greedy", " upon a time")]})
    log.log(3, {"loss": 1.5})
    log.close()
    err = capsys.readouterr().err
    assert err.count("writing TensorBoard events in") == 1 and err.count("writing samples.jsonl in") == 1, err
    assert log.tb is None and log.samples_file is None and printed == []
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 3]


def test_small_outputs_on_a_full_disk_are_whole_or_absent_and_one_line(tmp_path, monkeypatch):
    """The tokenizer file and the plot are written beside their name and renamed in (a full disk left a torn
    tokenizer.json and a truncated PNG); any entry point reports ENOSPC in one line (it was a traceback)."""
    from scaletrain.data.tokenizer import train_bpe
    from scaletrain.plot import plot

    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. " * 400)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0, "lr": 0.1}\n')
    monkeypatch.setattr(os, "getpid", lambda: 4242)  # names the temporary file: pointed at /dev/full below
    for name, make in (("tok.json", lambda out: train_bpe([str(corpus)], 300, str(out))),
                       ("p.png", lambda out: plot([str(tmp_path / "runs" / "a")], str(out)))):
        (tmp_path / f".{name}.tmp-4242").symlink_to("/dev/full")
        with pytest.raises(OSError, match="No space left on device"):
            make(tmp_path / name)
        assert not (tmp_path / name).exists() and not (tmp_path / f".{name}.tmp-4242").exists()
        assert make(tmp_path / name) and (tmp_path / name).stat().st_size > 0  # with room, the whole file
    monkeypatch.undo()
    p = subprocess.run([sys.executable, "-c", "from pathlib import Path; from scaletrain.errors import run_entry; "
                        "run_entry(lambda: Path('/dev/full').write_text('x'))"], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 1 and p.stderr == ("error: the disk is full (No space left on device); free space there, "
                                              "or write elsewhere, and run again\n"), p.stderr


# ---- 3. know before the first save ------------------------------------------------------------------------------
def test_an_unwritable_folder_is_found_at_start_and_low_space_is_warned(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=r"--checkpoint-dir .*file/ck is not writable"):
        check_writable(blocker / "ck", 1)
    assert check_writable(tmp_path / "ok", 1) is None
    assert "one checkpoint needs about" in check_writable(tmp_path / "ok", 1 << 60)
    p = launch("python", BASE + ["--engine", "fsdp", "--checkpoint-dir", str(blocker / "ck")], tmp_path, check=False)
    assert p.returncode == 1 and "is not writable" in p.stderr and "step    1" not in p.stdout  # before any step


# ---- 4. damaged checkpoints --------------------------------------------------------------------------------------
def _store(folder: Path) -> CheckpointStore:
    return CheckpointStore(str(folder), keep_last_n=2, rank=0)


def _save(store: CheckpointStore, name: str, step: int, payload: bytes = b"w" * 5000) -> Path:
    def local(tmp: Path) -> None:
        (tmp / "shard.bin").write_bytes(payload + bytes([step]))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "opt.bin").write_bytes(payload[::-1])

    return store.save(local, lambda tmp, bg: None, name, {"step": step})


def test_a_full_disk_that_torch_save_reports_otherwise_still_shows_the_space(tmp_path):
    """torch.save's zip writer turns ENOSPC into "unexpected pos" (seen with --async-checkpoint on a full tmpfs):
    the error still gives the free space against the checkpoint's size when the space is short."""
    store = CheckpointStore(str(tmp_path), keep_last_n=2, rank=0, estimate_bytes=1 << 60)
    _save(store, "step_000001", 1)

    def collective(tmp, background):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(CheckpointError, match=r"saving checkpoint .*step_000002 failed: RuntimeError: \[enforce fail"
                                              r".* GiB free on .*, this checkpoint needs about 1073741824.00 GiB; the "
                                              r"previous checkpoint .*step_000001 is intact and latest unchanged"):
        store.save(lambda tmp: None, collective, "step_000002", {"step": 2})


def test_checksums_find_every_kind_of_damage(tmp_path):
    store = _store(tmp_path)
    path = _save(store, "step_000001", 1)
    meta = json.loads((path / COMPLETE).read_text())
    assert set(meta["files"]) == {"shard.bin", "sub/opt.bin"} and meta["hash"] == "xxh3_128"
    assert meta["files"] == hash_share(path, 0, 1)
    assert verify_folder(path, meta, 0, 1) == []
    _flip(path / "shard.bin")
    assert verify_folder(path, meta, 0, 1) == [f"{path}/shard.bin does not match its checksum (its bytes changed "
                                               f"after the save)"]
    (path / "shard.bin").write_bytes(b"short")
    assert "is 5 bytes, 5,001 when saved (truncated or overwritten)" in verify_folder(path, meta, 0, 1)[0]
    (path / "sub" / "opt.bin").unlink()
    assert f"{path}/sub/opt.bin is missing" in verify_folder(path, meta, 0, 1)
    # the share is dealt out so that every file is checked by exactly one of N ranks
    sizes = {f"f{i}": i * 10 for i in range(7)}
    from scaletrain.checkpoint.integrity import _share

    dealt = [set(_share(sizes, r, 3)) for r in range(3)]
    assert set().union(*dealt) == set(sizes) and sum(map(len, dealt)) == 7


def test_damaged_newest_checkpoint_falls_back_with_latest_and_stops_with_a_path(tmp_path):
    """A flipped byte in final (step 4): --resume latest reports it and falls back to step 2; the explicit path
    stops naming the file."""
    ck = tmp_path / "ck"
    args = BASE + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(ck), "--max-steps", "4",
                   "--save-interval", "2", "--keep-last-n-checkpoints", "0"]
    launch("python", args, tmp_path, run_name="a")
    target = _biggest(ck / "final")
    _flip(target, target.stat().st_size // 2)
    p = launch("python", args + ["--resume", str(ck / "final"), "--max-steps", "6"], tmp_path, check=False)
    assert p.returncode == 1
    assert f"error: --resume {ck / 'final'}: checkpoint {ck / 'final'} is damaged: {target} does not match its " \
           f"checksum" in p.stderr
    p = launch("python", args + ["--resume", "latest", "--max-steps", "6"], tmp_path, run_name="a")
    assert f"checkpoint {ck / 'final'} is damaged: {target} does not match its checksum" in p.stderr
    assert f"resumed from {ck / 'step_000002'} at step 2" in p.stdout



def test_damaged_markers_and_pointers_are_reported_not_fatal(tmp_path, capsys):
    store = _store(tmp_path)
    for step in (1, 2, 3):
        _save(store, f"step_{step:06d}", step)
    (tmp_path / "step_000003" / COMPLETE).write_text("{not json")
    (tmp_path / "latest").write_bytes(b"\x00\xff\xfe binary")
    assert resolve_resume("latest", str(tmp_path))[0].name == "step_000002"
    err = capsys.readouterr().err
    assert "latest is unreadable; taking the newest complete checkpoint instead" in err
    assert "skipping " in err and "step_000003" in err and "COMPLETE.json is damaged" in err
    with pytest.raises(CheckpointError, match=r"step_000003/COMPLETE.json is damaged"):
        resolve_resume(str(tmp_path / "step_000003"), str(tmp_path))


# ---- 5. pruning and leftovers ------------------------------------------------------------------------------------
def test_a_damaged_old_checkpoint_does_not_break_pruning(tmp_path, capsys):
    store = _store(tmp_path)
    _save(store, "step_000001", 1)
    (tmp_path / "step_000001" / COMPLETE).write_bytes(b"\xff\xfe")
    _save(store, "step_000002", 2)
    _save(store, "step_000003", 3)
    _save(store, "step_000004", 4)  # used to crash here, in pruning
    assert newest_checkpoint(tmp_path).name == "step_000004"
    assert not (tmp_path / "step_000002").exists() and (tmp_path / "step_000003").exists()
    assert "skipping" in capsys.readouterr().err


def test_leftovers_of_every_kind_are_cleaned_at_start(tmp_path):
    store = _store(tmp_path)
    _save(store, "step_000001", 1)
    _save(store, "step_000002", 2)
    partial = tmp_path / "step_000001"  # a kill in the middle of an old-style delete: no marker, files left
    (partial / COMPLETE).unlink()
    (tmp_path / ".trash-step_000000-123").mkdir()  # a kill in the middle of a delete
    (tmp_path / ".tmp-step_000003").mkdir()  # a save that never finished
    (tmp_path / ".write-probe-rank1-4242").write_bytes(b"x" * 1000)  # --max-time's write probe, killed midway
    for other in (".tmp-build", ".old-notes", ".trash-x-1"):  # another tool's, in a shared --checkpoint-dir
        (tmp_path / other).mkdir()
    done = recover(tmp_path)
    assert "removed .write-probe-rank1-4242, a write probe that was interrupted" in done
    assert any(f"{partial} (0 MiB) has no COMPLETE.json: not a checkpoint" in d and f"rm -r {partial}" in d
               for d in done)  # reported at every start, never deleted: it may not be ours
    assert any(".trash-step_000000-123" in d for d in done) and any(".tmp-step_000003" in d for d in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".old-notes", ".tmp-build", ".trash-x-1", "latest",
                                                          "step_000001", "step_000002"]


def test_prepare_overwrite_killed_between_renames_leaves_nothing_behind(tmp_path):
    from scaletrain.data.prepare import prepare_domain

    raw = tmp_path / "in.jsonl"
    raw.write_text('{"text": "first version"}\n')
    prepare_domain("d", [str(raw)], str(tmp_path / "out"), quiet=True)
    raw.write_text('{"text": "second version, longer"}\n')
    cmd = [str(Path(os.sys.executable)), "-m", "scaletrain", "prepare", "--domain", "d", "--input", str(raw),
           "--output", str(tmp_path / "out"), "--overwrite"]
    env = dict(os.environ, SCALETRAIN_FAULT="swap_kill")
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == -9 and not (tmp_path / "out" / "d").exists()
    assert list((tmp_path / "out").glob(".d.old-*")) and list((tmp_path / "out").glob(".d.tmp-*"))
    p = subprocess.run(cmd[:-1], cwd=ROOT, capture_output=True, text=True, timeout=120)  # no --overwrite
    assert "committed the new preparation" in p.stderr
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["d"]
    m = json.loads((tmp_path / "out" / "d" / "manifest.json").read_text())
    assert m["tokens"] == len("second version, longer") + 1


# ---- 8. resumes that cannot go on --------------------------------------------------------------------------------
def test_impossible_resumes_are_one_line_errors(tmp_path):
    ck = tmp_path / "ck"
    args = BASE + ["--batch-size", "2", "--checkpoint-dir", str(ck)]
    launch("python", args + ["--engine", "fsdp"], tmp_path)  # final at step 6
    cases = [
        (["--engine", "fsdp", "--max-steps", "4"], "is at step 6, past --max-steps 4: nothing to train"),
        (["--engine", "fsdp", "--max-steps", "9", "--stop-at-step", "5"],
         "--stop-at-step 5 is not after the resumed step 6"),
        (fp32("zero2", tmp_path) + ["--max-steps", "9"],
         "was written by the fsdp engine and this run uses deepspeed; resume it with the engine that wrote it "
         "(--engine fsdp). A checkpoint's optimizer state does not pass between engines; its weights do: start a "
         "new run from them with --init-from"),
    ]
    for extra, expected in cases:
        p = launch("python", args + ["--resume", "latest"] + extra, tmp_path, check=False)
        assert p.returncode == 1 and expected in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr


# ---- 7. workers outlive their launcher ---------------------------------------------------------------------------
def test_workers_exit_when_their_launcher_is_killed(tmp_path):
    import signal

    import psutil

    args = BASE[:] + ["--engine", "fsdp", "--batch-size", "2", "--checkpoint-dir", str(tmp_path / "ck")]
    args[args.index("--max-steps") + 1] = "100000"
    cmd, env = launch_cmd("torchrun", args, tmp_path)
    agent = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
    workers = []
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2)
        workers = psutil.Process(agent.pid).children(recursive=True)
        assert len(workers) == 2 and all(w.pid != agent.pid for w in workers)
        os.killpg(agent.pid, signal.SIGKILL)  # the launcher's whole process group, as `kill -9 -PGID` does
        agent.wait()

        def gone(w):
            try:
                return w.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(lambda: all(gone(w) for w in workers), timeout=30)
    finally:
        for w in workers:  # no orphan outlives a failing test
            try:
                w.kill()
            except psutil.NoSuchProcess:
                pass
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)


def test_a_deepspeed_run_leaves_nothing_in_dev_shm(tmp_path):
    """DeepSpeed's CPU shared-memory allreduce names a 69 MB /dev/shm segment per rank and never removes it;
    the engine unlinks the names once every rank has mapped them."""
    from .conftest import launch_cmd

    cmd, env = launch_cmd("deepspeed", ["--data-kind", "synthetic", "--max-steps", "2", "--max-seq-length", "32",
                                        "--batch-size", "2", "--eval-interval", "0", "--no-use-tensorboard",
                                        "--ds_config", "ds_configs/zero2_bf16.json"], tmp_path)
    port = cmd[cmd.index("--master_port") + 1]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert not left, left


# ---- 9. data that fails mid-run ----------------------------------------------------------------------------------
def test_data_failing_mid_run_saves_the_last_step_and_resumes_exactly(tmp_path):
    """A shard member damaged (or the domain prepared again) after the run started is found on its first read,
    mid-run: the run used to stop with the error and lose every step since its last checkpoint (all of them with
    the default --save-interval 0). Every rank now learns it before the step, the last step done is saved, and once
    the shard is whole the resumed run gives the losses of a run that never failed."""
    from scaletrain.data.prepare import prepare_domain

    text = tmp_path / "c.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 9 + 3)})
                            + "\n" for i in range(30)))
    data = tmp_path / "data"
    prepare_domain("d", [str(text)], str(data), quiet=True, chunk_tokens=512, shard_tokens=1 << 20)
    manifest = json.loads((data / "d" / "manifest.json").read_text())
    [shard] = manifest["shards"]
    name, offset, tokens, _ = shard["members"][-1]  # read last: well after the first step
    shard_path = data / "d" / shard["file"]
    whole = shard_path.read_bytes()
    args = ["--engine", "fsdp", "--data-dir", str(data), "--data-sources", "d", "--data-mix-weights", "1",
            "--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2", "--max-steps", "60",
            "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0", "--no-use-tensorboard",
            "--mixed-precision", "fp32", "--num-workers", "1"]

    def losses(run):
        return {m["step"]: m["loss"] for m in map(json.loads, (tmp_path / "runs" / run / "metrics.jsonl")
                                                  .read_text().splitlines())}

    launch("torchrun", args + ["--checkpoint-dir", str(tmp_path / "clean")], tmp_path, run_name="clean")
    damaged = bytearray(whole)
    damaged[offset: offset + 2 * tokens] = bytes(2 * tokens)  # zeroed in place: same size, so found on reading
    shard_path.write_bytes(bytes(damaged))
    p = launch("torchrun", args, tmp_path, check=False)
    assert p.returncode != 0
    ck = newest_checkpoint(tmp_path / "checkpoints")
    assert ck is not None and ck.name.startswith("step_"), p.stderr[-3000:]
    step = int(json.loads((ck / COMPLETE).read_text())["step"])
    assert 0 < step < 60
    assert f"{name} does not match its checksum" in p.stderr, p.stderr[-5000:]
    assert f"checkpoint {ck} holds step {step}: once the data is whole again, resume with --resume latest" \
        in p.stderr
    assert f'File "{ROOT / "scaletrain"}' not in p.stderr and "Caught" not in p.stderr  # torchrun prints its own
    shard_path.write_bytes(whole)
    launch("torchrun", args + ["--resume", "latest"], tmp_path)
    assert losses("t") == losses("clean")  # steps 1..step before the failure, the rest after the resume


def test_faults_combine(monkeypatch):
    """One variable holds several faults (the restart benchmark crashes a rank and joins as torch does)."""
    from scaletrain.faults import fault

    monkeypatch.setenv("SCALETRAIN_FAULT", "crash:5@1,plain_join")
    assert fault("crash") == "5@1" and fault("plain_join") == "" and fault("spike") is None
    monkeypatch.setenv("SCALETRAIN_FAULT", "")
    assert fault("crash") is None
