"""DeepSpeed config resolution: "auto" filled from flags, explicit contradictions refused."""

import json
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
from scaletrain.cli import parse_config  # noqa: E402
from scaletrain.config import ConfigError  # noqa: E402
from scaletrain.engine.deepspeed import load_ds_config, resolve_ds_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["zero2_bf16", "zero3_bf16", "zero3_offload_bf16", "zero2_fp16"])
def test_shipped_configs_resolve(name):
    path = str(ROOT / "ds_configs" / f"{name}.json")
    cfg = parse_config(["--ds_config", path, "--batch-size", "4", "--gradient-accumulation-steps", "3",
                        "--learning-rate", "1e-3", "--max-grad-norm", "0.5"])
    ds, adopted = resolve_ds_config(load_ds_config(path), cfg, world_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 8 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert not any(v == "auto" for v in json.dumps(ds).split('"') if v == "auto")
    expected = "fp16" if "fp16" in name else "bf16"
    assert adopted.get("mixed_precision", cfg.mixed_precision) == expected  # the file's, as no flag was given
    assert cfg.mixed_precision == "bf16"  # the config itself is never changed
    assert ds["fp16"]["enabled"] == (expected == "fp16") and ds["bf16"]["enabled"] == (expected == "bf16")
    assert ds["zero_optimization"]["stage"] == (3 if "zero3" in name else 2)
    # torch's AdamW unless the optimizer is offloaded (then DeepSpeedCPUAdam)
    assert ds["optimizer"]["params"].get("torch_adam", False) == ("offload" not in name)
    if expected == "bf16":  # gradients reduced and accumulated in fp32, as FSDP2's reduce_dtype does
        assert ds["communication_data_type"] == "fp32" and ds["data_types"]["grad_accum_dtype"] == "fp32"


def test_fused_torch_adamw_on_cuda():
    path = str(ROOT / "ds_configs" / "zero2_bf16.json")
    ds, _ = resolve_ds_config(load_ds_config(path), parse_config(["--ds_config", path]), 1, device_type="cuda")
    assert ds["optimizer"]["params"]["fused"] is True


def test_explicit_value_contradicting_a_flag_names_both(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    cfg = parse_config(["--ds_config", str(f), "--batch-size", "4"])
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=16 contradicts --micro-batch-size=4"):
        resolve_ds_config(load_ds_config(str(f)), cfg, world_size=2)
    # without the flag, the file's value is adopted: once, by the engine class, into a new config
    from scaletrain.engine.deepspeed import DeepSpeedEngine

    cfg = parse_config(["--ds_config", str(f)])
    _, adopted = resolve_ds_config(load_ds_config(str(f)), cfg, world_size=2)
    assert adopted == {"micro_batch_size": 16} and cfg.micro_batch_size == 8
    resolved = DeepSpeedEngine.resolve_config(cfg, 2, "cpu")
    assert resolved.micro_batch_size == 16
    assert DeepSpeedEngine.resolve_config(resolved, 2, "cpu") == resolved  # resolving again changes nothing


def test_precision_conflict_and_fp16_support(tmp_path):
    path = str(ROOT / "ds_configs" / "zero2_bf16.json")
    cfg = parse_config(["--ds_config", path, "--mixed-precision", "fp32"])
    with pytest.raises(ConfigError, match="enables bf16 but --mixed-precision=fp32"):
        resolve_ds_config(load_ds_config(path), cfg, world_size=1)
    path16 = str(ROOT / "ds_configs" / "zero2_fp16.json")
    cfg = parse_config(["--ds_config", path16])
    with pytest.raises(ConfigError, match="does not support fp16"):
        resolve_ds_config(load_ds_config(path16), cfg, world_size=1, fp16_supported=False)


def test_bad_ds_config_files(tmp_path):
    with pytest.raises(ConfigError, match="--ds_config: file .* does not exist"):
        load_ds_config(str(tmp_path / "nope.json"))
    f = tmp_path / "broken.json"
    f.write_text('{"zero_optimization": {"stage": 2},\n}')
    with pytest.raises(ConfigError, match="not valid JSON: line 2"):
        load_ds_config(str(f))
    f.write_text(json.dumps({"train_batch_size": 7}))
    cfg = parse_config(["--ds_config", str(f), "--batch-size", "2"])
    with pytest.raises(ConfigError, match="train_batch_size=7 but micro batch 2"):
        resolve_ds_config(load_ds_config(str(f)), cfg, world_size=2)
    f.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match="has a \"scheduler\" section"):
        resolve_ds_config(load_ds_config(str(f)), parse_config(["--ds_config", str(f)]), world_size=1)
