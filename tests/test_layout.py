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
        ["--data-kind", "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2",
         "--max-steps", "3", "--warmup-steps", "1", "--log-interval", "1", "--checkpoint-dir", str(tmp_path / "ck"),
         "--no-use-tensorboard"],
        tmp_path,
    )
    assert "world 1" in proc.stdout and len(read_metrics(tmp_path)) == 3


def test_bad_flag_exits_with_a_message(tmp_path):
    from .conftest import launch

    proc = launch("python", ["--max-steps", "-1"], tmp_path, check=False)
    assert proc.returncode != 0 and "error: --max-steps: must be >= 0" in proc.stderr


def test_training_needs_neither_the_shard_writer_nor_webdataset():
    code = ("import sys, scaletrain.trainer, scaletrain.convert; "
            "bad = {'webdataset', 'scaletrain.data.prepare', 'scaletrain.data.writer', 'pylatexenc', 'pyarrow'}"
            " & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_back_ends_are_named_only_inside_engine():
    """The loop, the run plan, checkpoints and conversion ask the engine class; they never branch on its name."""
    for rel in ("trainer.py", "run.py", "convert.py", "checkpoint/manager.py", "checkpoint/store.py"):
        text = (ROOT / "scaletrain" / rel).read_text()
        # a back end's name as a string, one of its settings, or a module lookup
        assert not re.search(r"[\"'](fsdp|deepspeed)[\"']|fsdp_\w+|\bds_config\b|sys\.modules", text), rel


def test_user_errors_share_one_base_and_one_entry_wrapper():
    from scaletrain.checkpoint import CheckpointError
    from scaletrain.config import ConfigError
    from scaletrain.data.loader import LoaderStateError
    from scaletrain.data.manifest import ShardError
    from scaletrain.data.text import InputError
    from scaletrain.data.tokenizer import TokenizerError
    from scaletrain.errors import ScaletrainError
    from scaletrain.train_state import TrainingDiverged

    for cls in (CheckpointError, ConfigError, LoaderStateError, ShardError, InputError, TokenizerError,
                TrainingDiverged):
        assert issubclass(cls, ScaletrainError), cls
    for rel in ("scaletrain/cli.py", "scaletrain/convert.py", "scaletrain/data/prepare.py", "scaletrain/__main__.py",
                "launch/demo.py"):
        assert "run_entry(" in (ROOT / rel).read_text(), rel
    # no entry point catches errors its own way
    assert not _files_matching(r"sys\.exit\(f\"error")


def test_user_errors_on_every_entry_point_are_one_line(tmp_path):
    from .conftest import clean_env

    env = clean_env()
    runs = {
        "train": [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--tokenizer", str(tmp_path / "missing.json"),
                  "--data-dir", str(tmp_path)],
        "prepare": [sys.executable, "-m", "scaletrain", "prepare", "--domain", "d", "--input", str(tmp_path / "no"),
                    "--output", str(tmp_path / "o")],
        "convert": [sys.executable, str(ROOT / "launch" / "convert.py"), str(tmp_path / "nock"), str(tmp_path / "o")],
        "train-tokenizer": [sys.executable, "-m", "scaletrain", "train-tokenizer", "--input", str(tmp_path / "no"),
                            "--vocab-size", "500", "--output", str(tmp_path / "t.json")],
    }
    for name, cmd in runs.items():
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and "Traceback" not in p.stderr, (name, p.stderr[-2000:])
        assert p.stderr.strip().splitlines()[-1].startswith("error: "), (name, p.stderr)
