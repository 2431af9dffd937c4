import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This environment without the pytest process's rendezvous variables (a child starts its own group)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def launch_cmd(launcher: str, args: list[str], tmp_path: Path, nproc: int = 2, run_name: str = "t",
               checkpoints_in_tmp: bool = True):
    """(command, environment) of a launch/pretrain.py run on CPU (gloo)."""
    port = str(free_port())
    script = str(ROOT / "launch" / "pretrain.py")
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, script]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, script]
    else:
        cmd = [sys.executable, script]
    env = clean_env(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    if "--checkpoint-dir" not in args and checkpoints_in_tmp:  # every completed run writes final: not into the repo
        args = args + ["--checkpoint-dir", str(tmp_path / "checkpoints")]
    return cmd + args + ["--run-dir", str(tmp_path / "runs"), "--run-name", run_name], env


def launch(launcher: str, args: list[str], tmp_path: Path, nproc: int = 2, timeout: int = 400,
           check: bool = True, run_name: str = "t", extra_env: dict | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run launch/pretrain.py under torchrun, the deepspeed launcher or plain python (CPU, gloo)."""
    full, env = launch_cmd(launcher, args, tmp_path, nproc, run_name, checkpoints_in_tmp=cwd is None)
    env.update(extra_env or {})
    proc = subprocess.run(full, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(full)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def wait_for(cond, timeout: float = 120) -> None:
    """Poll ``cond`` every 0.2 s until it holds (TimeoutError after ``timeout`` seconds)."""
    import time

    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.2)


def read_metrics(tmp_path: Path, run_name: str = "t") -> list[dict]:
    lines = (tmp_path / "runs" / run_name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


@pytest.fixture
def root() -> Path:
    return ROOT
