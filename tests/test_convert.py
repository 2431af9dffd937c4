"""Conversion of both engines' checkpoints to Hugging Face safetensors that transformers loads,
with logits equal to our model's on the same weights (read back with the libraries' own tools)."""

import json
import re

import pytest
import torch
from safetensors import safe_open

from scaletrain.checkpoint import COMPLETE, CheckpointError
from scaletrain.convert import convert, parse_size
from scaletrain.model import Llama, ModelConfig

from .conftest import launch

ARGS = ["--data-kind", "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2",
        "--max-steps",
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
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 32  # the trained length
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert "lm_head.weight" in f.keys()
    with pytest.raises(CheckpointError, match="is not empty; pass --overwrite"):
        convert(str(checkpoints / "fsdp"), str(out), quiet=True)
    convert(str(checkpoints / "fsdp"), str(out), overwrite=True, quiet=True)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        convert(str(tmp_path), str(tmp_path / "x"), quiet=True)


def test_overwrite_replaces_only_an_earlier_export(checkpoints, tmp_path):
    """--overwrite deletes the output folder: given the run's folder by mistake it deleted the run, its checkpoints
    and logs with it. It now replaces only what an export holds, never a folder holding the checkpoint."""
    import shutil

    run = tmp_path / "runs" / "r"
    shutil.copytree(checkpoints / "fsdp" / "final", run / "checkpoints" / "final")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "config.json").write_text("{}")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for out in (run, run / "checkpoints", run / "checkpoints" / "final", tmp_path):
        with pytest.raises(CheckpointError, match=rf"output folder {out} holds the checkpoint being converted"):
            convert(str(run / "checkpoints" / "final"), str(out), overwrite=True, quiet=True)
    other = tmp_path / "other_run"
    shutil.copytree(run, other)
    with pytest.raises(CheckpointError, match=rf"output folder {other} holds more than a Hugging Face export "
                                              rf"\(checkpoints/, metrics.jsonl\), and --overwrite replaces only an "
                                              rf"earlier export; choose another output folder. Nothing was changed"):
        convert(str(run / "checkpoints" / "final"), str(other), overwrite=True, quiet=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "other_run" not in str(p)) == before
    export = convert(str(run / "checkpoints" / "final"), str(tmp_path / "hf"), quiet=True)
    (export / "README.md").write_text("# my model\n")  # an export the user added a model card to
    convert(str(run / "checkpoints" / "final"), str(export), overwrite=True, quiet=True)
    assert not (export / "README.md").exists() and (export / "model.safetensors").is_file()


def test_a_full_disk_leaves_the_previous_export_whole(checkpoints, tmp_path, monkeypatch):
    """--overwrite used to delete the previous export first and write in place: a full disk midway left neither.
    The export is now written beside it and renamed in once complete (writes go to /dev/full here: ENOSPC)."""
    import scaletrain.convert as conv

    out = convert(str(checkpoints / "fsdp" / "final"), str(tmp_path / "hf"), quiet=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = conv.write_safetensors
    monkeypatch.setattr(conv, "write_safetensors", lambda path, *a: real(conv.Path("/dev/full"), *a))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'hf'}: the disk is full \(No space left on device"
                                              rf".*; nothing was written there and the previous export is untouched"):
        convert(str(checkpoints / "fsdp" / "final"), str(out), overwrite=True, quiet=True, dtype="fp32")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no partial folder left beside it
    monkeypatch.undo()
    convert(str(checkpoints / "fsdp" / "final"), str(out), overwrite=True, quiet=True, dtype="fp32")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # replaced once complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_a_checkpoint_deleted_while_converting_says_so(checkpoints, tmp_path, monkeypatch, kind):
    """A run still training in the folder deletes older step_* checkpoints (keep-last-N) and re-saves best and
    final: a DCP one pruned midway through its conversion gave DCP's 'metadata is None' traceback. Now one line, and
    the earlier export is untouched. (DeepSpeed's lazy reader holds the files it opened: its export completes.)"""
    import shutil

    from scaletrain.engine import get_engine_class

    ckpt = tmp_path / "ck" / "step_000003"
    shutil.copytree(checkpoints / kind / "final", ckpt)
    earlier = convert(str(ckpt), str(tmp_path / "hf"), quiet=True)
    cls = get_engine_class("fsdp" if kind == "fsdp" else "deepspeed")
    made = cls.tensor_reader

    def pruned_midway(path, trust=False):
        reader, calls = made(path, trust=trust), []
        load = reader.load

        def load_and_prune(names):
            calls.append(names)
            if len(calls) == 3:
                shutil.rmtree(path)  # what keep-last-N does (rename, then delete)
            return load(names)

        reader.load = load_and_prune
        return reader

    monkeypatch.setattr(cls, "tensor_reader", staticmethod(pruned_midway))
    if kind == "zero3":  # DeepSpeed's reader holds the shards it opened at the start: the export completes
        again = convert(str(ckpt), str(tmp_path / "again"), quiet=True)
        with safe_open(again / "model.safetensors", "pt") as a, safe_open(earlier / "model.safetensors", "pt") as b:
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in b.keys())
        return
    with pytest.raises(CheckpointError, match=rf"checkpoint {ckpt} was deleted or replaced while it was being "
                                              rf"converted .* \(the earlier export there is untouched\)"):
        convert(str(ckpt), str(earlier), overwrite=True, quiet=True)
    assert (earlier / "model.safetensors").is_file() and not list(tmp_path.glob(".hf.*"))


def test_what_convert_is_given_is_checked_first(checkpoints, tmp_path, monkeypatch):
    """convert auto (an IndexError), a file for the checkpoint, a file or an unmakeable folder for the output
    (NotADirectoryError, FileNotFoundError, the latter after reading the tensors) were tracebacks, and the errors
    named --resume, a flag convert does not have. A run's folder, runs/NAME, is taken for its checkpoints."""
    import shutil

    run = tmp_path / "runs" / "r"
    shutil.copytree(checkpoints / "fsdp", run / "checkpoints")
    monkeypatch.chdir(tmp_path)
    for given, said in (("auto", "convert auto: no such checkpoint"),
                        (str(run / "checkpoints" / "final" / COMPLETE), "a file; give the checkpoint's folder"),
                        ("runs", "no complete checkpoint inside it; it holds runs: give one of them, e.g. runs/r")):
        with pytest.raises(CheckpointError, match=re.escape(said)):
            convert(given, str(tmp_path / "out"), quiet=True)
    (tmp_path / "afile").write_text("")
    with pytest.raises(CheckpointError, match="output afile is a file; give a folder"):
        convert(str(run), "afile", quiet=True)
    with pytest.raises(CheckpointError, match=r"output folder afile/out cannot be made \(afile is a file\)"):
        convert(str(run), "afile/out", quiet=True)
    assert (convert(str(run), "out", quiet=True) / "model.safetensors").is_file()  # the run's newest: final


def test_a_damaged_checkpoint_is_not_exported(checkpoints, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints / "fsdp" / "final", bad)
    shard = max((p for p in bad.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights: the export would load and be wrong
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"checkpoint {bad} is damaged: {shard} does not match its checksum"):
        convert(str(bad), str(tmp_path / "hf"), quiet=True)
    convert(str(bad), str(tmp_path / "hf"), quiet=True, verify=False)  # the user's call


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


HELD_OUT = "Ünïcode ∑ 𝔸 held-out: Anna has lived in Bergen for 12 years, with a literal </s> and <pad> in it."


def _bpe_with_s_tokens(raw, path):
    """A byte-level BPE whose end token is </s>, with <s> and no <pad>, and a post-processor that adds <s>
    (as Llama's tokenizer.json does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from scaletrain.data.text import iter_documents

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.text for d in iter_documents([str(raw)])), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["byte", "bpe", "bpe_add_bos", "bpe_parse_special"])
def test_exported_tokenizer_encodes_as_training_did(tmp_path, kind):
    """The export carries the run's tokenizer (read from the checkpoint alone: the shards are gone): AutoTokenizer
    encodes a held-out text to exactly the ids prepare wrote, the special tokens agree everywhere, no token is
    added past the model's rows, and a text-generation pipeline runs."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from scaletrain.data.prepare import prepare_domain
    from scaletrain.data.sample import create_sample_pretraining_data
    from scaletrain.data.shards import DomainStream

    raw = create_sample_pretraining_data(tmp_path / "raw", scale=0.02)
    tok = None if kind == "byte" else _bpe_with_s_tokens(raw["general"], tmp_path / "tok.json")
    add_bos, parse = kind == "bpe_add_bos", kind == "bpe_parse_special"
    data = tmp_path / "pre"
    prepare_domain("general", [str(raw["general"])], str(data), tokenizer=tok, add_bos=add_bos, quiet=True,
                   shard_tokens=8192, chunk_tokens=1024, parse_special=parse)
    (tmp_path / "held.jsonl").write_text(json.dumps({"text": HELD_OUT}) + "\n")
    prepare_domain("held", [str(tmp_path / "held.jsonl")], str(tmp_path / "heldout"), tokenizer=tok, add_bos=add_bos,
                   quiet=True, parse_special=parse)
    stream = DomainStream(tmp_path / "heldout" / "held")
    written = stream.read(0, stream.total).tolist()  # [bos] + ids + [eos], as prepare wrote them
    assert (written[-1] in written[:-1]) == parse  # the literal </s> is text unless --parse-special-tokens
    args = [a for a in ARGS if a not in ("--data-kind", "synthetic")]
    launch("python", args + ["--data-dir", str(data), "--data-sources", "general", "--data-mix-weights", "1",
                             "--checkpoint-dir", str(tmp_path / "ck")], tmp_path)
    shutil.move(str(data), str(tmp_path / "moved"))  # convert needs nothing but the checkpoint
    out = convert(str(tmp_path / "ck"), str(tmp_path / "hf"), quiet=True)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"} <= \
        {p.name for p in out.iterdir()}
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok(HELD_OUT)["input_ids"] + [hf_tok.eos_token_id] == written
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        assert config[key] == gen[key] == getattr(hf_tok, key), key
    assert hf_tok.eos_token == ("<|endoftext|>" if kind == "byte" else "</s>")
    assert (hf_tok.bos_token_id is not None) == (kind != "byte")
    assert (written[0] == hf_tok.bos_token_id) == add_bos  # a BOS exactly where prepare wrote one
    assert len(hf_tok) <= config["vocab_size"] and config["max_position_embeddings"] == 32
    model = AutoModelForCausalLM.from_pretrained(str(out))
    text = pipeline("text-generation", model=model, tokenizer=hf_tok)("Anna has", max_new_tokens=4,
                                                                       do_sample=False)[0]["generated_text"]
    assert text.startswith("Anna has")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(CheckpointError, match="--max-shard-size"):
        parse_size("lots")
    with pytest.raises(CheckpointError, match=r"--max-shard-size '0MB': must be above zero"):
        parse_size("0MB")  # was taken: one file per tensor
