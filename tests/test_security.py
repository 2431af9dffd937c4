"""Nothing runs from a file: checkpoints carrying a pickle payload are refused on every load path (resume on
the same and on another world size, conversion), naming the file, and the payload never runs; secrets in
the environment reach no file a run writes."""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaletrain.checkpoint import COMPLETE
from scaletrain.checkpoint.safe import UnsafeCheckpointError, load_run_state
from scaletrain.convert import convert

from .conftest import ROOT, launch

RUN = ["--data-kind", "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2",
       "--max-steps", "2", "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0",
       "--no-use-tensorboard", "--mixed-precision", "fp32"]


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poison_torch_file(path, marker):
    obj = torch.load(path, weights_only=False)
    obj["extra"] = Payload(marker)
    torch.save(obj, path)


def poison_dcp_metadata(path, marker):
    md = pickle.loads(path.read_bytes())
    md.__dict__["extra"] = Payload(marker)
    path.write_bytes(pickle.dumps(md))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    launch("python", RUN + ["--engine", "fsdp", "--checkpoint-dir", str(root / "fsdp")], root, run_name="f")
    launch("python", RUN + ["--engine", "deepspeed", "--checkpoint-dir", str(root / "ds")], root, run_name="d")
    return root


def copy(checkpoints, kind, tmp_path):
    shutil.copytree(checkpoints / kind, tmp_path / kind)
    return tmp_path / kind


def forge_checksums(folder: Path) -> None:
    """What an attacker does next: record the poisoned files' checksums, so only the loaders stand in the way."""
    from scaletrain.checkpoint.integrity import hash_share

    meta = json.loads((folder / COMPLETE).read_text())
    meta["files"] = hash_share(folder, 0, 1)
    (folder / COMPLETE).write_text(json.dumps(meta))


def test_run_state_file_is_never_unpickled_with_code(checkpoints, tmp_path):
    ck = copy(checkpoints, "fsdp", tmp_path)
    state = ck / "final" / "train_state_rank0.pt"
    poison_torch_file(state, tmp_path / "marker")
    with pytest.raises(UnsafeCheckpointError, match=r"train_state_rank0.pt names posix.system, which loading it"):
        load_run_state(state)
    assert not (tmp_path / "marker").exists()


def test_poisoned_dcp_metadata_is_refused_by_resume_and_convert(checkpoints, tmp_path):
    ck = copy(checkpoints, "fsdp", tmp_path)
    marker = tmp_path / "marker"
    poison_dcp_metadata(ck / "final" / ".metadata", marker)
    forge_checksums(ck / "final")
    p = launch("python", RUN + ["--engine", "fsdp", "--checkpoint-dir", str(ck), "--resume", "latest",
                                "--max-steps", "4"], tmp_path, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "final/.metadata names posix.system, which loading it would run; refused (pass --trust-checkpoint" \
        in p.stderr
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata names posix.system"):
        convert(str(ck / "final"), str(tmp_path / "hf"), quiet=True)
    assert not marker.exists()


def test_dcp_non_tensor_items_are_read_weights_only():
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from scaletrain.engine.fsdp import SafeLoadPlanner

    planner = SafeLoadPlanner()
    planner.state_dict, planner.flatten_state_dict = {}, False
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("x"), 0, MetadataIndex("x"), 0, [0])
    ok = io.BytesIO()
    torch.save({"lr": 0.1, "betas": (0.9, 0.95)}, ok)
    ok.seek(0)
    planner.load_bytes(item, ok)
    assert planner.state_dict["x"] == {"lr": 0.1, "betas": (0.9, 0.95)}
    bad = io.BytesIO()
    torch.save({"lr": Payload("/nonexistent/marker")}, bad)
    bad.seek(0)
    with pytest.raises(UnsafeCheckpointError, match="item x names posix.system"):
        planner.load_bytes(item, bad)


@pytest.mark.parametrize("which", ["model_states", "optim_states"])
def test_poisoned_deepspeed_files_are_refused_by_convert(checkpoints, tmp_path, which):
    ck = copy(checkpoints, "ds", tmp_path)
    target = next((ck / "final" / "deepspeed").glob(f"*{which}.pt"))
    poison_torch_file(target, tmp_path / "marker")
    forge_checksums(ck / "final")
    with pytest.raises(UnsafeCheckpointError, match=rf"{target.name} names posix.system"):
        convert(str(ck / "final"), str(tmp_path / "hf"), quiet=True)
    assert not (tmp_path / "marker").exists()


def test_poisoned_deepspeed_files_are_refused_by_resume_unless_trusted(checkpoints, tmp_path):
    ck = copy(checkpoints, "ds", tmp_path)
    marker = tmp_path / "marker"
    optim = next((ck / "final" / "deepspeed").glob("*optim_states.pt"))
    poison_torch_file(optim, marker)
    forge_checksums(ck / "final")
    args = RUN + ["--engine", "deepspeed", "--checkpoint-dir", str(ck), "--resume", "latest", "--max-steps", "3"]
    p = launch("python", args, tmp_path, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"{optim.name} names posix.system, which loading it would run; refused" in p.stderr
    assert not marker.exists()
    # another world size goes through DeepSpeed's converter (its own process): refused there too
    p = launch("torchrun", RUN + ["--engine", "deepspeed", "--checkpoint-dir", str(ck), "--resume", "latest",
                                  "--max-steps", "3", "--batch-size", "1"], tmp_path, check=False)
    assert p.returncode != 0 and f"{optim.name} names posix.system" in p.stderr
    assert not marker.exists() and not (ck / "final" / "deepspeed_universal").exists()
    # the user's explicit trust: the file is unpickled as it is (and so the payload runs)
    launch("python", args + ["--trust-checkpoint"], tmp_path)
    assert marker.exists()


def test_secrets_in_the_environment_reach_no_file(tmp_path):
    secrets = {"WANDB_API_KEY": "wandb-fake-4a8c1f0e9b7d6c5a4f3e2d1c0b9a8f7e", "HF_TOKEN": "hf_FAKEtokenQ9x8c7v6b5n4m3",
               "AWS_SECRET_ACCESS_KEY": "fakeAWSsecret/Zx9Yw8Xv7Wu6Vt5Us4Tr3"}
    args = RUN + ["--engine", "fsdp", "--use-wandb", "--use-tensorboard", "--checkpoint-dir", str(tmp_path / "ck"),
                  "--eval-interval", "1", "--eval-steps", "1"]
    p = launch("python", args, tmp_path, extra_env=dict(secrets, WANDB_MODE="offline", WANDB_SILENT="true"))
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), str(tmp_path / "ck"),
                          str(tmp_path / "hf")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    texts = [p.stdout, p.stderr, out.stdout, out.stderr]
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any("wandb" in str(f) for f in files) and any("events.out.tfevents" in f.name for f in files)
    for f in files:
        texts.append(f.read_bytes().decode("latin-1"))
    for name, value in secrets.items():
        assert not any(value in t for t in texts), f"{name} leaked"
    config = json.loads((tmp_path / "runs" / "t" / "config.json").read_text())
    assert not any(name.lower() in json.dumps(config).lower() for name in secrets)


def test_no_code_path_unpickles_without_an_allowlist():
    """Every torch.load in scaletrain is weights-only; nothing asks transformers for remote code."""
    import re

    for f in (ROOT / "scaletrain").rglob("*.py"):
        text = f.read_text()
        assert "trust_remote_code" not in text, f
        assert "pickle.load(" not in text, f  # DCP metadata goes through the restricted unpickler
        for call in re.finditer(r"torch\.load\((.*?)\)\n", text, re.S):
            assert "weights_only=True" in call.group(1), (f, call.group(0))


def test_a_world_of_one_listens_on_loopback_only(tmp_path):
    import signal
    import time

    import psutil

    from .conftest import launch_cmd

    cmd, env = launch_cmd("python", RUN[:] + ["--max-steps", "100000", "--checkpoint-dir", str(tmp_path / "ck")],
                          tmp_path)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
        t0 = time.time()
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.time() - t0 < 120 and proc.poll() is None
            time.sleep(0.2)
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
