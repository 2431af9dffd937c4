"""Architecture rules: parallelism stays in engine/, each engine library in its own file."""

import re
import subprocess
import sys

from .conftest import ROOT


def _files_matching(pattern: str) -> set[str]:
    rx = re.compile(pattern, re.M)
    return {str(p.relative_to(ROOT)) for p in (ROOT / "scaletrain").rglob("*.py") if rx.search(p.read_text())}


def test_deepspeed_imported_only_in_its_engine():
    assert _files_matching(r"^\s*(import deepspeed|from deepspeed)") == {"scaletrain/engine/deepspeed.py"}


def test_fully_shard_only_in_fsdp_engine():
    assert _files_matching(r"fully_shard") == {"scaletrain/engine/fsdp.py"}


def test_model_is_free_of_distributed_code():
    assert not {f for f in _files_matching(r"torch\.distributed|deepspeed") if f.startswith("scaletrain/model")}


def test_fsdp_run_does_not_import_deepspeed():
    code = (
        "import sys; from scaletrain.engine import get_engine_class; get_engine_class('fsdp'); "
        "import scaletrain.trainer; assert 'deepspeed' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_python_launch_without_launcher_runs_a_world_of_one(tmp_path):
    from .conftest import launch, read_metrics

    proc = launch(
        "python",
        ["--data", "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2",
         "--max-steps", "3", "--warmup-steps", "1", "--log-interval", "1", "--save-interval", "0",
         "--no-use-tensorboard"],
        tmp_path,
    )
    assert "world 1" in proc.stdout and len(read_metrics(tmp_path)) == 3


def test_bad_flag_exits_with_a_message(tmp_path):
    from .conftest import launch

    proc = launch("python", ["--max-steps", "-1"], tmp_path, check=False)
    assert proc.returncode != 0 and "error: --max-steps: must be a positive integer" in proc.stderr
