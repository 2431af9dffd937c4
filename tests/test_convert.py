"""Conversion of both engines' checkpoints to Hugging Face safetensors that transformers loads,
with logits equal to our model's on the same weights (read back with the libraries' own tools)."""

import json

import pytest
import torch
from safetensors import safe_open

from scaletrain.checkpoint import COMPLETE, CheckpointError
from scaletrain.convert import convert, parse_size
from scaletrain.model import Llama, ModelConfig

from .conftest import launch

ARGS = ["--data", "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2", "--max-steps",
        "3", "--warmup-steps", "1", "--learning-rate", "3e-3", "--log-interval", "1", "--eval-interval", "0",
        "--no-use-tensorboard", "--save-interval", "3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    launch("torchrun", ARGS + ["--engine", "fsdp", "--checkpoint-dir", str(root / "fsdp")], root, run_name="f")
    launch("torchrun", ARGS + ["--ds_config", "ds_configs/zero3_bf16.json", "--checkpoint-dir", str(root / "zero3")],
           root, run_name="z")
    return root


def reference_state(kind, path):
    """Full fp32 state dict by the engines' own consolidation tools (not our streaming reader)."""
    if kind == "fsdp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(str(path), str(path.parent / "consolidated.pt"))
        sd = torch.load(path.parent / "consolidated.pt", weights_only=False)["model"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed")
    return sd


@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_converted_checkpoint_loads_in_transformers_with_equal_logits(checkpoints, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    ckpt_dir = checkpoints / kind
    out = convert(str(ckpt_dir), str(tmp_path / "hf"), dtype="fp32", max_shard_size="1MB", quiet=True)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded at 1 MB
    meta = json.loads((ckpt_dir / "final" / COMPLETE).read_text())
    ours = Llama(ModelConfig(**meta["model_config"])).eval()
    ours.load_state_dict(reference_state(kind, ckpt_dir / "final"))
    hf = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)


def test_bf16_single_file_and_output_rules(checkpoints, tmp_path):
    out = convert(str(checkpoints / "fsdp" / "final"), str(tmp_path / "hf"), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert "lm_head.weight" in f.keys()
    with pytest.raises(CheckpointError, match="is not empty; pass --overwrite"):
        convert(str(checkpoints / "fsdp"), str(out), quiet=True)
    convert(str(checkpoints / "fsdp"), str(out), overwrite=True, quiet=True)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        convert(str(tmp_path), str(tmp_path / "x"), quiet=True)


def test_shape_mismatch_names_the_tensor(checkpoints, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints / "fsdp" / "final", bad)
    meta = json.loads((bad / COMPLETE).read_text())
    meta["model_config"]["ffn_dim"] = 512
    (bad / COMPLETE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensor layers.0.mlp.gate_proj.weight has shape \[384, 128\], the "
                                              r"model config says \[512, 128\]"):
        convert(str(bad), str(tmp_path / "hf"), quiet=True)


def test_tokenizer_files_travel_with_the_model(tmp_path):
    from transformers import AutoTokenizer

    from scaletrain.data.prepare import prepare_domain
    from scaletrain.data.sample import create_sample_pretraining_data
    from scaletrain.data.tokenizer import HFTokenizer, train_bpe

    raw = create_sample_pretraining_data(tmp_path, scale=0.02)
    tok = train_bpe([str(raw["general"])], 400, str(tmp_path / "tok.json"))
    prepare_domain("general", [str(raw["general"])], str(tmp_path / "pre"), tokenizer=tok, quiet=True,
                   shard_tokens=4096, chunk_tokens=1024)
    args = [a for a in ARGS if a != "synthetic"]
    args.remove("--data")
    launch("python", args + ["--data-dir", str(tmp_path / "pre"), "--data-sources", "general", "--data-mix-weights",
                             "1", "--checkpoint-dir", str(tmp_path / "ck"), "--tokenizer", tok], tmp_path)
    out = convert(str(tmp_path / "ck"), str(tmp_path / "hf"), quiet=True)
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    text = "Anna has lived in Bergen for 12 years."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == HFTokenizer(tok).encode(text).tolist()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 448  # 400 rounded up to 64s


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="--max-shard-size"):
        parse_size("lots")
