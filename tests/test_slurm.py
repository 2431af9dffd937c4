"""Slurm: tasks started by srun without a launcher form one world from Slurm's variables; a launcher's world smaller
than its step is refused; each sbatch template in launch/slurm/ runs end to end with stand-in srun, scontrol and
sbatch (tests/slurm/) that execute here: the time-limit signal to the batch shell gives a checkpoint on every rank,
the job requeues itself and the second start resumes and finishes."""

import json
import os
import signal
import subprocess
import sys

import pytest

from scaletrain.cluster import LaunchError, check_world, first_host, slurm_world

from .conftest import ROOT, clean_env, free_port, wait_for

TINY = ("--data-kind synthetic --model-size tiny --max-seq-length 32 --micro-batch-size 1 --global-batch-size 2 "
        "--log-interval 1 --eval-interval 0 --no-use-tensorboard --mixed-precision fp32 --learning-rate 2e-3")


def test_slurm_variables_give_rank_world_and_master():
    assert first_host("gpu-[003-005,9],cpu1") == "gpu-003" and first_host("node7,node8") == "node7"
    assert first_host("a[10]") == "a10" and first_host("localhost") == "localhost"
    env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu-[003-004]", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}
    assert slurm_world(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                "MASTER_PORT")} == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                                    "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu-003",
                                                    "MASTER_PORT": "23456"}
    assert not slurm_world({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})  # one task: a world of one, as before
    launched = {"SLURM_STEP_NUM_TASKS": "2", "RANK": "0", "WORLD_SIZE": "4"}
    assert not slurm_world(launched) and launched["WORLD_SIZE"] == "4"  # a launcher's variables win
    with pytest.raises(LaunchError, match="this Slurm step runs 4 tasks but lacks"):
        slurm_world({"SLURM_STEP_NUM_TASKS": "4"})
    with pytest.raises(LaunchError, match="runs 8 tasks but the launcher made a world of 1"):
        check_world({"SLURM_STEP_NUM_TASKS": "8", "WORLD_SIZE": "1"})  # srun of torchrun --standalone per task
    check_world({"SLURM_STEP_NUM_TASKS": "2", "WORLD_SIZE": "16"})  # one torchrun per node: fine


def test_two_tasks_with_only_slurm_variables_form_one_world(tmp_path):
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = clean_env(SLURM_JOB_ID="77", SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_PROCID=str(rank),
                        SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_STEP_NODELIST="localhost",
                        SLURM_STEP_TASKS_PER_NODE="2", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch" / "pretrain.py"), *TINY.split(),
                                       "--max-steps", "3", "--checkpoint-dir", str(tmp_path / "ck"), "--run-dir",
                                       str(tmp_path / "runs"), "--run-name", "slurm"],
                                      env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "engine fsdp, world 2" in outs[0] and "accumulation 1 x world 2" in outs[0]
    final = tmp_path / "ck" / "final"
    assert (final / "COMPLETE.json").is_file()
    assert sorted(p.name for p in final.glob("train_state_rank*.pt")) == ["train_state_rank0.pt",
                                                                          "train_state_rank1.pt"]


def test_fsdp_template_gives_each_job_its_own_rendezvous_port(tmp_path):
    """Two jobs on one node with one fixed port: the second's torchrun cannot bind it, joins the first job's c10d
    store as a client, and dies when the first job ends (seen with torch 2.13). The port comes from the job id, as
    cluster.py's MASTER_PORT does; RDZV_PORT still wins."""
    def endpoint(job, **extra):
        env = clean_env(PATH=f"{ROOT / 'tests' / 'slurm'}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES="1",
                        SLURM_STANDIN_DIR=str(tmp_path), SLURM_STANDIN_JOB_ID=job, PYTHON="echo",
                        CHECKPOINT_DIR=str(tmp_path / job), **extra)  # echo: the torchrun line srun would start
        out = subprocess.run(["sbatch", "launch/slurm/fsdp.sbatch"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60).stdout
        return out.split("--rdzv_endpoint ")[1].split()[0]

    env = {"SLURM_JOB_ID": "123457", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2"}
    assert slurm_world(env)
    assert endpoint("123457") == f"localhost:{env['MASTER_PORT']}" == "localhost:23457"
    assert endpoint("123458") == "localhost:23458"
    assert endpoint("123458", RDZV_PORT="29511") == "localhost:29511"


@pytest.mark.parametrize("template, nodes, extra", [
    ("fsdp.sbatch", "2", {"GPUS_PER_NODE": "1"}),  # two "nodes" of one process: torchrun's c10d rendezvous
    ("deepspeed.sbatch", "1", {"GPUS_PER_NODE": "2", "DS_CONFIG": "ds_configs/zero2_bf16.json"}),
])
def test_sbatch_template_saves_on_the_time_limit_signal_requeues_and_resumes(tmp_path, template, nodes, extra):
    standin = tmp_path / "standin"
    standin.mkdir()
    env = clean_env(PATH=f"{ROOT / 'tests' / 'slurm'}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES=nodes,
                    SLURM_STANDIN_DIR=str(standin), SLURM_STANDIN_JOB_ID="4242", PYTHON=sys.executable,
                    RUN_NAME="cluster", CHECKPOINT_DIR=str(tmp_path / "ck"), RDZV_PORT=str(free_port()),
                    PYTHONUNBUFFERED="1", **extra,
                    TRAIN_ARGS=f"{TINY} --max-steps 40 --run-dir {tmp_path / 'runs'}"
                               + (" --mixed-precision bf16" if "deepspeed" in template else ""))
    job = subprocess.Popen(["sbatch", f"launch/slurm/{template}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "runs" / "cluster" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, timeout=300)
    batch = int((standin / "batch.pid").read_text())
    os.kill(batch, signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@300 does before the time limit
    out, _ = job.communicate(timeout=400)
    assert job.returncode == 0, out[-5000:]
    assert "got the time-limit signal; the step saves and exits" in out
    assert out.count(", world 2,") == 2, out[-5000:]  # both starts: one world of 2, not 2 worlds of one
    assert "requeueing job 4242" in out and "starting it again (restart 1)" in out
    assert "preempted at step" in out and "resumed from" in out, out[-5000:]
    saved = int(out.split("preempted at step ")[1].split(":")[0])
    assert 3 <= saved < 40 and f"at step {saved}" in out.split("resumed from")[1].splitlines()[0]
    assert "run cluster is complete" in out and (tmp_path / "ck" / "final" / "COMPLETE.json").is_file()
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))  # one run, one log: every step once


@pytest.mark.parametrize("command, restarts, final, said, requeued, code", [
    ("true", "0", True, "run cluster is complete", False, 0),
    ("true", "0", False, "stopped before the end of the run without a signal; not requeued", False, 0),
    ("true", "0", "stop_at_step", "stopped before the end of the run without a signal; not requeued", False, 0),
    ("true", "0", "time_limit", "the run stopped at --max-time", True, 0),  # it was not requeued
    ("true", "0", "time_limit compact", "the run stopped at --max-time", True, 0),  # JSON written without spaces
    ("false", "0", False, "step failed with status 1 (failure 1 of 3 since checkpoint none); requeueing job 7", True,
     0),
    # three time-limit requeues before do not count against a failure (SLURM_RESTART_COUNT counts them all)
    ("false", "3", "time_limit", "failure 1 of 3 since checkpoint step_000007); requeueing job 7", True, 0),
])
def test_requeue_decides_from_the_checkpoint_folder_and_the_status(tmp_path, command, restarts, final, said,
                                                                     requeued, code):
    """launch/slurm/requeue.sh without a signal: a finished run ends, a step stopped on purpose is not requeued, one
    stopped at --max-time is, a failed one is requeued up to MAX_RESTARTS times."""
    if final is True:
        (tmp_path / "ck" / "final").mkdir(parents=True)
        (tmp_path / "ck" / "final" / "COMPLETE.json").write_text("{}")
    elif final:  # a checkpoint of a run that stopped itself, and why, written as the trainer writes it
        (tmp_path / "ck" / "step_000007").mkdir(parents=True)
        reason, _, compact = final.partition(" ")
        (tmp_path / "ck" / "step_000007" / "COMPLETE.json").write_text(
            json.dumps({"stopped_for": reason}, separators=(",", ":")) if compact else
            json.dumps({"stopped_for": reason}, indent=1))
        (tmp_path / "ck" / "latest").write_text("step_000007\n")
    env = clean_env(PATH=f"{ROOT / 'tests' / 'slurm'}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="7",
                    SLURM_RESTART_COUNT=restarts, MAX_RESTARTS="3", CHECKPOINT_DIR=str(tmp_path / "ck"),
                    RUN_NAME="cluster", SLURM_STANDIN_DIR=str(tmp_path))
    p = subprocess.run(["bash", "-c", f"source launch/slurm/requeue.sh; run_step {command}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == code and said in p.stdout, p.stdout + p.stderr
    assert (tmp_path / "requeued").exists() == requeued


def test_failures_in_a_row_without_a_new_checkpoint_end_the_chain(tmp_path):
    """A failed step is requeued MAX_RESTARTS times in a row without a new checkpoint, counted in the checkpoint
    folder across the job's starts: a new checkpoint starts the count again, a fourth failure at the same one ends."""
    ck = tmp_path / "ck"

    def attempt(restarts: int, latest: str | None) -> subprocess.CompletedProcess:
        if latest:
            (ck / latest).mkdir(parents=True, exist_ok=True)
            (ck / latest / "COMPLETE.json").write_text("{}")
            (ck / "latest").write_text(latest + "\n")
        (tmp_path / "requeued").unlink(missing_ok=True)
        env = clean_env(PATH=f"{ROOT / 'tests' / 'slurm'}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="7",
                        SLURM_RESTART_COUNT=str(restarts), MAX_RESTARTS="2", CHECKPOINT_DIR=str(ck),
                        RUN_NAME="cluster", SLURM_STANDIN_DIR=str(tmp_path))
        return subprocess.run(["bash", "-c", "source launch/slurm/requeue.sh; run_step false"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    said = [attempt(0, None), attempt(1, None), attempt(2, "step_000100"), attempt(3, "step_000200"),
            attempt(4, None), attempt(5, None)]
    assert [p.returncode for p in said] == [0, 0, 0, 0, 0, 1], [p.stdout for p in said]
    assert [p.stdout.split("(")[1].split(")")[0] for p in said] == [
        "failure 1 of 2 since checkpoint none", "failure 2 of 2 since checkpoint none",
        "failure 1 of 2 since checkpoint step_000100", "failure 1 of 2 since checkpoint step_000200",
        "failure 2 of 2 since checkpoint step_000200",
        "3 failures in a row since checkpoint step_000200, MAX_RESTARTS 2"]
    assert not (tmp_path / "requeued").exists()
    assert (ck / ".slurm_failures").read_text() == "step_000200 3\n"


def test_a_stop_signal_to_every_process_of_the_job_saves_with_dataloader_workers(tmp_path):
    """Slurm signals every process of a job step (scancel, the time limit, --signal without B:), DataLoader workers
    included: torch's handler in a worker dies of a SIGTERM from anyone but its parent, and the main process raised
    "DataLoader worker ... is killed by signal: Terminated" before saving, losing every step since the last
    checkpoint. Workers now leave the stop signals to the main process, which saves, stops and ends them."""
    from scaletrain.checkpoint import COMPLETE, newest_checkpoint
    from scaletrain.data.prepare import prepare_domain
    from scaletrain.data.sample import create_sample_pretraining_data

    raw = create_sample_pretraining_data(tmp_path / "raw", scale=0.02)
    prepare_domain("general", [str(raw["general"])], str(tmp_path / "data"), quiet=True, shard_tokens=8192,
                   chunk_tokens=1024)
    args = [*TINY.replace("--data-kind synthetic ", "").split(), "--data-dir", str(tmp_path / "data"),
            "--data-sources", "general", "--data-mix-weights", "1", "--num-workers", "2", "--max-steps", "100000",
            "--checkpoint-dir", str(tmp_path / "ck"), "--run-dir", str(tmp_path / "runs"), "--run-name", "w"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "pretrain.py"), *args], env=clean_env(),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = tmp_path / "runs" / "w" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, timeout=300)
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and both workers
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "preempted at step" in out, out[-3000:]
    assert "killed by signal" not in out
    saved = newest_checkpoint(tmp_path / "ck")
    assert saved is not None and saved.name.startswith("step_") and (saved / COMPLETE).is_file()
