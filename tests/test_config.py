import json
import re

import pytest

from scaletrain.cli import parse_config
from scaletrain.config import ConfigError, PreTrainingConfig, parse_duration
from scaletrain.lr import lr_at

from .conftest import ROOT


@pytest.mark.parametrize("argv, flag", [
    (["--model-size", "huge"], "--model-size: unknown preset 'huge'; valid: tiny, small, base, large"),
    (["--max-steps", "-5"], "--max-steps: must be >= 0"),
    (["--batch-size", "0"], "--micro-batch-size/--batch-size: must be a positive integer"),
    (["--mixed-precision", "fp8"], "--mixed-precision: got 'fp8'"),
    (["--engine", "megatron"], "--engine: unknown engine 'megatron'; valid: deepspeed, fsdp"),
    (["--engine", "fsdp", "--mixed-precision", "fp16"], "--mixed-precision: fp16 needs loss scaling"),
    (["--engine", "fsdp", "--ds_config", "x.json"], "--ds_config: is a DeepSpeed setting but --engine fsdp"),
    (["--data-sources", "a", "b", "--data-mix-weights", "1.0"], "--data-mix-weights: 1 weights for 2"),
    (["--data-mix-weights", "-0.3", "1.3"], "--data-mix-weights: weights must be finite and >= 0"),
    (["--data-mix-weights", "0", "0"], "--data-mix-weights: weights sum to zero"),
    (["--min-learning-rate", "1.0", "--learning-rate", "0.1"], "--min-learning-rate: must be between 0"),
    (["--warmup-steps", "50", "--max-steps", "10"], "--warmup-steps: 50 exceeds --max-steps=10"),
    (["--data-kind", "imagenet"], "--data-kind: unknown data kind 'imagenet'"),
    (["--lr-schedule", "step"], "--lr-schedule: unknown schedule 'step'; valid: cosine, wsd, linear, constant"),
    (["--lr-schedule", "wsd", "--decay-shape", "exp"], "--decay-shape: unknown shape 'exp'"),
    (["--lr-schedule", "wsd", "--decay-fraction", "1.5"], "--decay-fraction: must be in (0, 1], got 1.5"),
    (["--lr-schedule", "wsd", "--max-steps", "100", "--decay-steps", "100"],
     "--decay-steps: must be between 1 and --max-steps minus warmup (100 - 1), got 100"),
    (["--decay-fraction", "0.1"], "--decay-fraction: shapes the decay of --lr-schedule wsd; this run's schedule is "
                                  "cosine"),
    (["--global-batch-size", "16", "--gradient-accumulation-steps", "2"],
     "--global-batch-size: derives --gradient-accumulation-steps (global / (micro-batch x world size)); drop "
     "--gradient-accumulation-steps 2"),
    (["--global-batch-size", "12", "--micro-batch-size", "8"],
     "--global-batch-size: 12 is not a multiple of --micro-batch-size 8"),
    (["--max-tokens", "1000"], "--max-tokens: needs --global-batch-size"),
    (["--global-batch-size", "8", "--max-tokens", "1000", "--max-steps", "3"],
     "--max-tokens: sets the run's length, as does --max-steps 3; drop one"),
    # padded rows hold a document each, far fewer tokens than a full row: the steps would train a fraction of them
    (["--global-batch-size", "8", "--max-tokens", "1000", "--no-packing"],
     "--max-tokens: counts full rows of --max-seq-length tokens, and --no-packing pads"),
    (["--spike-sigma", "-1"], "--spike-sigma: must be >= 0 (0: off), got -1.0"),
    (["--spike-window", "1"], "--spike-window: must be at least 2 steps, got 1"),
    (["--z-loss=-1e-4"], "--z-loss: must be >= 0 (0: off), got -0.0001"),
    (["--weight-decay=-0.1"], "--weight-decay: must be >= 0 (0: none), got -0.1"),  # was trained with
    (["--adam-beta1", "1.5"], "--adam-beta1: must be in [0, 1), got 1.5"),  # was AdamW's traceback
    (["--adam-beta2", "1"], "--adam-beta2: must be in [0, 1), got 1.0"),
    (["--adam-eps", "0"], "--adam-eps: must be positive, got 0.0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm: must be >= 0 (0 disables clipping), got nan"),  # clipping was off
    (["--peak-tflops", "inf"], "--peak-tflops: must be a positive number, got inf"),  # MFU 0 logged
    (["--run-name", "../x"], "--run-name: '../x' is not a folder name"),  # was written to ./x, outside --run-dir
    (["--run-name", "sweep/lr1"], "(to group runs: --run-dir runs/GROUP --run-name NAME)"),
    (["--run-name", "x "], "--run-name: 'x ' begins or ends with a space; give 'x'"),
    (["--run-name", "a\nb"], "--run-name: 'a\\nb' holds characters that do not print"),
    (["--max-time", "90"], "--max-time: '90' is not a duration (a bare number: Slurm reads it as minutes"),
    (["--max-time", "3 hours"], "--max-time: '3 hours' is not a duration: give units (90m, 3h30m"),
    (["--max-time", "0m"], "--max-time: must be above zero, got '0m'"),
])
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError) as e:
        parse_config(argv)
    assert flag in str(e.value)


def test_an_unknown_flag_is_answered_with_the_one_it_likely_means(capsys):
    """Underscores for dashes, other tools' names (DeepSpeed's --deepspeed_config, Megatron's --seq-length, Hugging
    Face's --eval_steps, which is our --eval-interval) and typos each get a hint, without the 50 lines of usage."""
    with pytest.raises(SystemExit) as e:
        parse_config(["--max_steps", "10", "--deepspeed_config", "ds.json", "--seq-length", "2048", "--eval_steps",
                      "500", "--learning-rat", "1e-3", "--no-such-thing", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[1:] == [
        "  --max_steps: did you mean --max-steps?", "  --deepspeed_config: here it is --ds_config",
        "  --seq-length: here it is --max-seq-length",
        "  --eval_steps: how often to validate is --eval-interval (--eval-steps: micro-batches per validation)",
        "  --learning-rat: did you mean --learning-rate?", "(--help lists every flag)"]
    assert "error: unrecognized arguments: --max_steps 10 --deepspeed_config" in err and "usage:" not in err
    # the other commands' parsers do the same with their own flags (another tool's training flag is not theirs)
    from scaletrain.__main__ import main

    for argv, hint in ((["prepare", "--input", "x", "--output", "y", "--text_key", "t", "--lr", "1"],
                        "  --text_key: did you mean --text-key?\n(--help"),
                       (["convert", "a", "b", "--max_shard_size", "1GB"],
                        "  --max_shard_size: did you mean --max-shard-size?")):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert f"scaletrain {argv[0]}: error: unrecognized arguments: " in err and hint in err, err


def test_every_field_is_a_flag_and_aliases_work():
    cfg = parse_config(["--model-size", "small", "--batch-size", "4", "--save-interval", "100",
                        "--checkpoint-dir", "/tmp/ck", "--max-seq-length", "512", "--gradient-checkpointing",
                        "--ds_config", "ds.json", "--local_rank=1", "--no-use-tensorboard"])
    assert (cfg.model_size, cfg.micro_batch_size, cfg.save_interval, cfg.checkpoint_dir,
            cfg.max_seq_length) == ("small", 4, 100, "/tmp/ck", 512)
    assert cfg.gradient_checkpointing and not cfg.use_tensorboard
    assert cfg.resolved_engine == "deepspeed"
    assert parse_config([]).resolved_engine == "fsdp"
    assert parse_config(["--ds-config", "a.json"]).ds_config == "a.json"


@pytest.mark.parametrize("suffix, text", [
    (".json", json.dumps({"max-steps": 70, "learning_rate": 1e-3, "batch_size": 2})),
    (".yaml", "max-steps: 70\nlearning_rate: 0.001\nbatch_size: 2\n"),
    (".toml", "max_steps = 70\nlearning_rate = 0.001\nbatch_size = 2\n"),
])
def test_config_file_sits_beneath_flags(tmp_path, suffix, text):
    f = tmp_path / f"c{suffix}"
    f.write_text(text)
    cfg = parse_config(["--config", str(f), "--max-steps", "90"])
    assert (cfg.max_steps, cfg.learning_rate, cfg.micro_batch_size) == (90, 1e-3, 2)
    assert {"max_steps", "learning_rate", "micro_batch_size"} <= cfg.explicit


def test_config_file_errors_name_the_file_and_key(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"max_stepz": 3}')
    with pytest.raises(ConfigError, match=r"c.json' has unknown setting 'max_stepz'; did you mean 'max_steps'\?"):
        parse_config(["--config", str(f)])
    f.write_text('{"max_steps": 3,}')
    with pytest.raises(ConfigError, match="cannot parse .*c.json.*line 1"):
        parse_config(["--config", str(f)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])
    # a settings file saved as UTF-16 (Notepad's "Unicode"): said with the flag and file, for each kind of file
    from scaletrain.model.config_io import ModelConfigError, load_model_config

    utf16 = '{"max_steps": 3}'.encode("utf-16")
    for flag in ("--config", "--ds_config"):
        f.write_bytes(utf16)
        with pytest.raises(ConfigError, match=rf"{flag}: .*c.json is not UTF-8 text \(byte 0: invalid start byte\); "
                                              r"save it as UTF-8"):
            cfg = parse_config([flag, str(f)])
            if flag == "--ds_config":
                from scaletrain.engine.ds_config import load_ds_config

                load_ds_config(cfg.ds_config)
    with pytest.raises(ModelConfigError, match=r"--model-config: .*c.json is not UTF-8 text"):
        load_model_config(f)


@pytest.mark.parametrize("text, key, expected", [
    ("max_steps: 6.9\n", "max_steps", "an integer, got 6.9"),
    ("max_steps: true\n", "max_steps", "an integer, got True"),
    ("max_steps: '7'\n", "max_steps", "an integer, got '7'"),
    ("data_sources: arxiv\n", "data_sources", "a list of strings, got 'arxiv'"),
    ("data_sources: [arxiv, 3]\n", "data_sources", "item 1 must be a string, got 3"),
    ("packing: 'no'\n", "packing", "true or false, got 'no'"),
    ("learning_rate: fast\n", "learning_rate", "a number, got 'fast'"),
    ("run_name: 12\n", "run_name", "a string, got 12"),
])
def test_config_file_types_are_strict(tmp_path, text, key, expected):
    """A wrong type in a settings file is an error naming the file, the key and the type (no coercion: 6.9 is not 6,
    true is not 1, a string is not a list of its letters)."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=rf"c.yaml: setting '{key}' .*{re.escape(expected)}"):
        parse_config(["--config", str(f)])


def test_config_file_numbers_as_written():
    """YAML reads 3e-4 as a string; a number field takes it, and ints are fine where floats are expected."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("learning_rate: 3e-4\nmin_learning_rate: 0\ndata_mix_weights: [1, 2.5]\n")
    cfg = parse_config(["--config", f.name])
    assert (cfg.learning_rate, cfg.min_learning_rate, cfg.data_mix_weights) == (3e-4, 0.0, [1.0, 2.5])


def test_lr_schedule_warmup_midpoint_end():
    kw = dict(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # 1/10 of the way up
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(5.5e-4)  # cosine midpoint: (peak + min) / 2
    assert lr_at(110, **kw) == pytest.approx(1e-4)  # end: the floor
    assert lr_at(500, **kw) == pytest.approx(1e-4)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_a_resume_that_moves_the_learning_rate_says_by_how_much():
    """Extending a finished cosine run with a larger --max-steps recomputes the schedule: the lr climbs from the
    run's end value back towards the peak. Said with both values and how to go on from the end; a WSD stable-phase
    checkpoint annealed with --decay-steps (the lr goes on at the peak) or an unchanged schedule says nothing."""
    from scaletrain.lr import resume_jump

    def run(*flags):
        return parse_config(["--learning-rate", "1e-3", "--warmup-steps", "10", *flags])

    saved = run("--max-steps", "100").to_dict()
    said = resume_jump(run("--max-steps", "200"), saved, 100)
    now = lr_at(100, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10, max_steps=200)
    assert now > 5e-4  # back above the middle of the range
    assert said.startswith(f"the learning-rate schedule changed: step 101 takes lr {now:.4g} (lr warms up to 0.001 "
                           f"over 10 steps, then cosine to 0.0001 at step 200), where the checkpoint's run ended at "
                           f"0.0001"), said
    assert said.endswith("to go on from its end instead: --lr-schedule constant --learning-rate 0.0001")
    assert "would have taken" in resume_jump(run("--max-steps", "200"), saved, 50)  # mid-run: no end to go on from
    assert resume_jump(run("--max-steps", "100"), saved, 50) is None
    assert resume_jump(run("--max-steps", "100", "--save-interval", "7"), saved, 50) is None  # not a schedule flag
    stable = run("--max-steps", "1000", "--lr-schedule", "wsd").to_dict()
    assert resume_jump(run("--max-steps", "510", "--lr-schedule", "wsd", "--decay-steps", "10"), stable, 500) is None


def test_lr_schedules_wsd_linear_constant():
    kw = dict(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10, max_steps=110)
    for schedule in ("wsd", "linear", "constant"):  # every schedule warms up alike
        assert lr_at(4, schedule=schedule, decay_steps=20, **kw) == pytest.approx(5e-4)
    assert lr_at(60, schedule="linear", **kw) == pytest.approx(5.5e-4)  # linear midpoint
    assert lr_at(35, schedule="linear", **kw) == pytest.approx(1e-4 + 9e-4 * 0.75)
    assert [lr_at(s, schedule="constant", **kw) for s in (10, 109, 500)] == [1e-3] * 3
    wsd = dict(schedule="wsd", decay_steps=20, **kw)
    assert [lr_at(s, **wsd) for s in (10, 50, 90)] == [1e-3] * 3  # stable at the peak until max_steps - 20
    assert lr_at(100, **wsd) == pytest.approx(5.5e-4) and lr_at(110, **wsd) == pytest.approx(1e-4)
    assert lr_at(100, shape="cosine", **wsd) == pytest.approx(5.5e-4)
    assert lr_at(95, shape="1-sqrt", **wsd) == pytest.approx(1e-4 + 9e-4 * (1 - 0.25 ** 0.5))
    # the config: --decay-fraction of --max-steps, or --decay-steps exactly
    assert parse_config(["--lr-schedule", "wsd", "--max-steps", "1000"]).decay_length == 200
    assert parse_config(["--lr-schedule", "wsd", "--max-steps", "1000", "--decay-fraction", "0.1"]).decay_length == 100
    assert parse_config(["--lr-schedule", "wsd", "--max-steps", "1000", "--decay-steps", "37"]).decay_length == 37


def test_global_batch_derives_the_accumulation_for_any_world_size():
    cfg = parse_config(["--micro-batch-size", "2", "--global-batch-size", "16"])
    assert [cfg.for_world_size(w).gradient_accumulation_steps for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError) as e:
        cfg.for_world_size(3)
    assert "--global-batch-size 16 is not a multiple of --micro-batch-size 2 x world size 3 = 6" in str(e.value)
    assert parse_config(["--micro-batch-size", "2"]).for_world_size(4).gradient_accumulation_steps == 1  # no flag
    # --max-tokens: steps from tokens per step (global batch x row length), rounded up
    cfg = parse_config(["--global-batch-size", "16", "--max-seq-length", "128", "--max-tokens", "1000000"])
    assert cfg.max_steps == 489 and "max_steps" not in cfg.explicit  # ceil(1e6 / 2048)
    assert cfg.warmup == 5  # schedule defaults follow the derived length


def test_the_default_precision_is_what_the_device_computes_natively(monkeypatch):
    """bf16 by default only where the hardware has it: a CPU without AVX512-BF16/AMX emulates it (a step 6.8x as long
    as fp32, measured on such a host), and it was the default there too. A given flag, or a DeepSpeed file that
    enables bf16, still decides."""
    import scaletrain.engine.dist as dist_mod
    from scaletrain.engine import get_engine_class
    from scaletrain.run import resolve_for_world

    assert isinstance(dist_mod.bf16_native("cpu"), bool) and dist_mod.bf16_native("mps") is False
    fsdp, ds = get_engine_class("fsdp"), get_engine_class("deepspeed")
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(dist_mod, "bf16_native", lambda device_type, n=native: n)
        assert resolve_for_world(parse_config([]), fsdp, 1, "cpu").mixed_precision == expected
        assert resolve_for_world(parse_config(["--mixed-precision", "bf16"]), fsdp, 1, "cpu").mixed_precision == "bf16"
        assert resolve_for_world(parse_config(["--mixed-precision", "fp32"]), fsdp, 1, "cpu").mixed_precision == "fp32"
        shipped = parse_config(["--ds_config", str(ROOT / "ds_configs" / "zero3_bf16.json")])
        assert resolve_for_world(shipped, ds, 2, "cpu").mixed_precision == "bf16"  # the file enables it


def test_given_data_sources_without_weights():
    """One source needs no weight (it was refused: "2 weights for 1 --data-sources", the default's two); the
    default weights stay with the default sources, in their order; other sources must say their shares."""
    assert parse_config(["--data-sources", "mine"]).data_mix_weights == [1.0]
    assert parse_config(["--data-sources", "arxiv", "general"]).data_mix_weights == [0.3, 0.7]
    assert parse_config(["--data-sources", "a", "b", "--data-mix-weights", "1", "3"]).data_mix_weights == [1.0, 3.0]
    for sources in (["general", "arxiv"], ["a", "b", "c"]):
        with pytest.raises(ConfigError, match=f"--data-mix-weights: not given for --data-sources {' '.join(sources)}; "
                                              f"give each source's token share \\(equal shares: --data-mix-weights "
                                              f"{' '.join('1' * len(sources))}\\); the default 0.3 0.7 is for arxiv "
                                              f"general"):
            parse_config(["--data-sources", *sources])


def test_the_end_learning_rate_follows_a_given_peak():
    """--learning-rate 1e-5 alone (a continued pre-training rate) was refused: the end of the decay stayed at its
    default 3e-5, above the peak. Unless given, it is 10% of the peak (3e-5 for the default 3e-4, as before)."""
    assert parse_config([]).min_learning_rate == 3e-5
    cfg = parse_config(["--learning-rate", "1e-5"])
    assert cfg.min_learning_rate == pytest.approx(1e-6) and "min_learning_rate" not in cfg.explicit
    assert parse_config(["--learning-rate", "1e-3"]).min_learning_rate == pytest.approx(1e-4)
    assert parse_config(["--learning-rate", "1e-5", "--min-learning-rate", "0"]).min_learning_rate == 0
    with pytest.raises(ConfigError, match="--min-learning-rate: must be between 0 and --learning-rate=1e-05"):
        parse_config(["--learning-rate", "1e-5", "--min-learning-rate", "3e-5"])


def test_config_dataclass_documents_every_field():
    import dataclasses

    for f in dataclasses.fields(PreTrainingConfig):
        assert f.metadata.get("doc"), f.name
    # the original design's fields are all present
    for name in ("model_size max_seq_length data_dir data_sources data_mix_weights micro_batch_size "
                 "gradient_accumulation_steps max_steps warmup_steps learning_rate min_learning_rate "
                 "mixed_precision gradient_checkpointing max_grad_norm checkpoint_dir save_interval "
                 "keep_last_n_checkpoints log_interval use_wandb wandb_project use_tensorboard num_workers "
                 "pin_memory seed engine ds_config").split():
        assert name in PreTrainingConfig.__dataclass_fields__, name


def test_flags_are_the_field_names_and_aliases_map_to_them(capsys):
    import dataclasses

    from scaletrain.cli import build_parser

    for f in dataclasses.fields(PreTrainingConfig):
        expected = "--ds_config" if f.name == "ds_config" else "--" + f.name.replace("_", "-")
        assert PreTrainingConfig.flag(f.name) == expected
    cfg = parse_config(["--micro-batch-size", "3"])
    assert cfg.micro_batch_size == 3 and parse_config(["--batch-size", "5"]).micro_batch_size == 5
    assert parse_config(["--model-size", "small"]).model_size == "small"
    # a prefix of several flags is not guessed (argparse's abbreviations are off)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--data", "synthetic"])
    assert "unrecognized arguments: --data" in capsys.readouterr().err


def test_config_is_frozen_once_resolved():
    cfg = parse_config(["--max-steps", "7", "--warmup-steps", "1"])
    cfg.max_steps = 8  # before freezing: fine
    cfg.freeze()
    with pytest.raises(AttributeError, match="frozen"):
        cfg.max_steps = 9
    other = cfg.replace(max_steps=10)  # a new config, the explicit set carried over
    assert other.max_steps == 10 and cfg.max_steps == 8 and "max_steps" in other.explicit


def test_default_warmup_fits_any_run_length():
    """--max-steps 5 used to fail on the default warmup of 10: it is now 1% of the run, at least 1, at most 2000."""
    assert parse_config(["--max-steps", "5"]).warmup == 1
    assert parse_config(["--max-steps", "30000"]).warmup == 300
    assert parse_config(["--max-steps", "1000000"]).warmup == 2000
    assert parse_config(["--max-steps", "5", "--warmup-steps", "0"]).warmup == 0  # explicit wins


def test_help_shows_each_default_once_with_readable_placeholders():
    import re

    from scaletrain.cli import build_parser

    text = build_parser().format_help()
    options = re.split(r"\n  (?=-)", text.split("options:")[1])
    assert len(options) > 50
    for block in options:
        assert len(re.findall(r"\(default", block)) <= 1, block
        assert "default: None" not in block, block
    # every preset, the Llama 3 ones too (the placeholder listed only the first four)
    from scaletrain.model.presets import PRESETS

    assert f"[--model-size {{{','.join(PRESETS)}}}]" in text and "[--max-steps N]" in text
    assert "[--checkpoint-dir PATH]" in text and "[--data-sources NAME [NAME ...]]" in text
    assert "[--max-time DURATION]" in text
    assert not re.search(r"--[\w-]+ [A-Z]+_[A-Z_]+", text)  # no MODEL_CONFIG_NAME-style placeholders
    assert "1% of --max-steps" in " ".join(text.split())  # a % in a doc is printed, not formatted


def test_a_ds_config_batch_that_breaks_the_global_batch_is_refused(tmp_path):
    from scaletrain.engine import get_engine_class
    from scaletrain.run import resolve_for_world

    ds = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    ds["gradient_accumulation_steps"] = 3
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = parse_config(["--ds_config", str(tmp_path / "ds.json"), "--micro-batch-size", "2", "--global-batch-size",
                        "8"])
    with pytest.raises(ConfigError) as e:
        resolve_for_world(cfg, get_engine_class("deepspeed"), 2, "cpu")
    assert f"--global-batch-size 8: {tmp_path / 'ds.json'} sets micro-batch 2 x accumulation 3 x world size 2 = 12" \
        in str(e.value)
    ds["gradient_accumulation_steps"] = "auto"
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    assert resolve_for_world(cfg, get_engine_class("deepspeed"), 2, "cpu").gradient_accumulation_steps == 2


def test_resuming_with_another_global_batch_warns_with_the_number_to_give(capsys):
    from pathlib import Path
    from types import SimpleNamespace

    from scaletrain.run import _check_resume

    saved = parse_config(["--micro-batch-size", "2", "--gradient-accumulation-steps", "2"]).to_dict()
    meta = {"step": 3, "engine": "fsdp", "world_size": 2, "config": saved}  # 8 rows a step
    env = SimpleNamespace(is_main=True, world_size=1)
    _check_resume(parse_config(["--micro-batch-size", "2", "--gradient-accumulation-steps", "2"]), Path("ck/step_3"),
                  meta, "fsdp", env)
    err = capsys.readouterr().err
    assert "resuming step_3 with a global batch of 4 rows; the checkpoint's run took 8 a step" in err
    assert "give --global-batch-size 8 to keep the batch on any world size" in err
    _check_resume(parse_config(["--micro-batch-size", "2", "--global-batch-size", "8"]).for_world_size(1),
                  Path("ck/step_3"), meta, "fsdp", env)
    assert capsys.readouterr().err == ""  # the run's batch, named now: not a changed --global-batch-size (was None)
    _check_resume(parse_config(["--micro-batch-size", "2", "--global-batch-size", "16"]).for_world_size(1),
                  Path("ck/step_3"), meta, "fsdp", env)
    err = capsys.readouterr().err  # one warning of the batch; its accumulation and flag are not repeated
    assert "global batch of 16 rows" in err and len(err.strip().splitlines()) == 1, err
    _check_resume(parse_config(["--micro-batch-size", "2", "--gradient-accumulation-steps", "2",
                                "--warmup-steps", "5"]), Path("ck/step_3"), meta, "fsdp", SimpleNamespace(is_main=True,
                                                                                                        world_size=2))
    assert "with --warmup-steps 5; the checkpoint was saved with none (the default)" in capsys.readouterr().err


def test_a_branch_under_another_run_name_is_not_warned_about_its_own_folder(capsys):
    """--run-name B --resume runs/A/...: the run-name warning says it; the checkpoint folder that follows from the
    name is not a changed setting (an explicit --checkpoint-dir still is)."""
    from pathlib import Path
    from types import SimpleNamespace

    from scaletrain.run import _check_resume

    saved = parse_config(["--run-name", "a"]).replace(checkpoint_dir="runs/a/checkpoints").to_dict()
    meta = {"step": 3, "engine": "fsdp", "world_size": 1, "config": saved}
    env = SimpleNamespace(is_main=True, world_size=1)
    _check_resume(parse_config(["--run-name", "b"]).replace(checkpoint_dir="runs/b/checkpoints"),
                  Path("runs/a/checkpoints/step_3"), meta, "fsdp", env)
    err = capsys.readouterr().err
    assert "written by run 'a'; this run is 'b'" in err and "--checkpoint-dir" not in err
    _check_resume(parse_config(["--run-name", "b", "--checkpoint-dir", "/scratch/b"]),
                  Path("runs/a/checkpoints/step_3"), meta, "fsdp", env)
    assert "resuming step_3 with --checkpoint-dir '/scratch/b'" in capsys.readouterr().err


def test_max_time_reads_units_and_slurms_time_forms():
    """--max-time takes what a job's limit is written as: units, or Slurm's --time (pasted from #SBATCH --time)."""
    assert [parse_duration(t) for t in ("3h30m", "45m", "90s", "1.5h", "2d", "1h0m30s", "10M")] == \
        [12600, 2700, 90, 5400, 172800, 3630, 600]
    assert [parse_duration(t) for t in ("30:00", "1:30:00", "23:59:59", "2-12", "1-00:30", "1-02:03:04")] == \
        [1800, 5400, 86399, 216000, 88200, 93784]
    for bad in ("", "h", "3h 30m", "1:2:3:4", "-5m", "5x"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)
