"""Starting from real models: Hugging Face folders in (--init-from), shapes from files (--model-config), one
initialisation whatever the engine or world size, and the way back out through launch/convert.py."""

import json
import math

import pytest
import torch

from scaletrain.checkpoint import CheckpointError
from scaletrain.checkpoint.init_from import CheckpointWeights, HFWeights
from scaletrain.config import ConfigError
from scaletrain.convert import convert
from scaletrain.engine.base import fill_whole, unfilled_model
from scaletrain.model import Llama
from scaletrain.model.config_io import ModelConfigError, load_model_config

from .conftest import launch, read_metrics

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5)
VARIANTS = {
    # untied, GQA, Llama-3.1 rope scaling, biases on q/k/v/o
    "llama3_bias": ("llama", dict(tie_word_embeddings=False, attention_bias=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    # tied, Qwen2's q/k/v biases, linear rope scaling
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def hf_model(variant: str, seed: int = 0):
    """A small Hugging Face model with every tensor random (biases and norm weights too, so a misplaced one
    shows in the logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, extra = VARIANTS[variant]
    cfg = AutoConfig.for_model(kind, **SMALL, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.1)
    return model


def save_hf(variant: str, folder, seed: int = 0, **kwargs):
    model = hf_model(variant, seed)
    model.save_pretrained(str(folder), **kwargs)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_weights_give_hf_logits_in_our_model(tmp_path, variant):
    hf = save_hf(variant, tmp_path / "hf", max_shard_size="100KB")  # several files and an index
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    src = HFWeights(tmp_path / "hf")
    ours = unfilled_model(src.model_config, "cpu")
    fill_whole(ours, src)
    ids = torch.randint(0, 320, (2, 200))  # past original_max_position_embeddings: the rope scaling matters
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_pytorch_model_bin_folders_give_hf_logits_and_leave_no_file_mapped(tmp_path):
    """A folder with only pytorch_model*.bin (two files, as older models ship) gives Hugging Face's logits, and
    reading half of every tensor (a rank's slices) leaves none of the files' pages in this process: each read
    maps its file, copies the slice out and unmaps (holding the mappings left the touched half resident)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", **dict(SMALL, hidden_size=256, intermediate_size=512, vocab_size=60000),
                               tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()  # 2 x 61 MB of embeddings
    folder = tmp_path / "bin"
    cfg.save_pretrained(str(folder))
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    first = {k: v for k, v in sd.items() if "embed_tokens" in k}
    torch.save(first, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({k: v for k, v in sd.items() if k not in first}, folder / "pytorch_model-00002-of-00002.bin")
    def file_pages_mib():
        line = next(x for x in open("/proc/self/status") if x.startswith("RssFile:"))
        return int(line.split()[1]) / 1024

    src = HFWeights(folder)
    assert src.kind == "pytorch_model.bin"
    ours = unfilled_model(src.model_config, "cpu")
    before = file_pages_mib()
    halves = {name: src._read(name, slice(0, max(1, p.shape[0] // 2))).clone()  # a rank copies its slices
              for name, p in ours.named_parameters()}
    grown = file_pages_mib() - before
    assert grown < 10, f"{grown:.0f} MiB of the files stayed resident"  # the halves: 61 MB of the embeddings alone
    fill_whole(ours, src)
    for name, p in ours.named_parameters():
        assert torch.equal(halves[name], p.detach()[: halves[name].shape[0]])
    ids = torch.randint(0, 60000, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def zero3_fp32(tmp_path):
    cfg = json.loads(open("ds_configs/zero3_bf16.json").read())
    cfg["bf16"] = {"enabled": "auto"}
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(cfg))
    return ["--ds_config", str(path)]


ARGS = ["--data-kind", "synthetic", "--max-seq-length", "32", "--batch-size", "2", "--mixed-precision", "fp32",
        "--eval-interval", "0", "--no-use-tensorboard", "--log-interval", "1"]


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_hf_model_in_and_out_again_gives_the_same_logits(tmp_path, engine):
    from transformers import AutoModelForCausalLM

    eng = ["--engine", "fsdp"] if engine == "fsdp" else zero3_fp32(tmp_path)
    for variant in VARIANTS:
        hf = save_hf(variant, tmp_path / variant)
        ck = tmp_path / f"ck_{variant}"
        proc = launch("torchrun", ARGS + eng + ["--init-from", str(tmp_path / variant), "--max-steps", "0",
                                                "--checkpoint-dir", str(ck)], tmp_path, run_name=variant)
        assert f"weights from Hugging Face model {tmp_path / variant}" in proc.stdout
        out = convert(str(ck), str(tmp_path / f"out_{variant}"), dtype="fp32", quiet=True)
        config = json.loads((out / "config.json").read_text())
        assert config["max_position_embeddings"] == 256  # the source's, not the 32 tokens of these rows
        back = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
        assert type(back).__name__ == type(hf).__name__
        ids = torch.randint(0, 320, (2, 100))
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_initial_weights_are_the_same_for_every_engine_and_world_size(tmp_path):
    """Random initialisation as each engine builds it (FSDP2 on the meta device, ZeRO-3 under zero.Init): the
    step-0 weights of world 1 and world 2 runs equal each other and the whole model of the same seed."""
    from scaletrain.model import get_model_config
    from scaletrain.trainer import build_model

    want = dict(build_model(get_model_config("tiny"), seed=7).named_parameters())
    runs = {}
    for engine, world in (("fsdp", 1), ("fsdp", 2), ("zero3", 1), ("zero3", 2)):
        eng = ["--engine", "fsdp"] if engine == "fsdp" else zero3_fp32(tmp_path)
        ck = tmp_path / f"{engine}{world}"
        launch("torchrun", ARGS + eng + ["--max-steps", "0", "--seed", "7", "--checkpoint-dir", str(ck)], tmp_path,
               nproc=world, run_name=f"{engine}{world}")
        reader = CheckpointWeights(ck).reader
        runs[(engine, world)] = reader.load(list(reader.shapes))
    for key, got in runs.items():
        assert set(got) == set(want), key
        for name, p in want.items():
            assert torch.equal(got[name], p.detach()), (key, name)


def test_continued_pretraining_matches_hf_trained_by_a_plain_loop(tmp_path):
    """20 fp32 steps from a Hugging Face Llama on the sample shards: each step's loss equals that of HF's own
    LlamaForCausalLM trained on the same rows with the same AdamW groups, schedule and clipping."""
    from scaletrain.config import PreTrainingConfig
    from scaletrain.data.loader import build_loader
    from scaletrain.data.sample import prepare_sample
    from scaletrain.lr import lr_at

    shards = prepare_sample(tmp_path / "sample", quiet=True)
    hf = save_hf("llama3_bias", tmp_path / "hf").train()
    steps, lr, wd = 20, 1e-3, 0.1
    args = ["--data-dir", str(shards), "--init-from", str(tmp_path / "hf"), "--max-steps", str(steps),
            "--max-seq-length", "64", "--micro-batch-size", "4", "--gradient-accumulation-steps", "2",
            "--mixed-precision", "fp32", "--learning-rate", str(lr), "--min-learning-rate", "1e-4",
            "--warmup-steps", "3", "--weight-decay", str(wd), "--max-grad-norm", "0.5", "--log-interval", "1",
            "--eval-interval", "0", "--no-use-tensorboard", "--engine", "fsdp"]
    launch("python", args + ["--checkpoint-dir", str(tmp_path / "ck")], tmp_path, run_name="cpt")
    ours = [m["loss"] for m in read_metrics(tmp_path, "cpt")]

    from scaletrain.cli import parse_config

    cfg: PreTrainingConfig = parse_config(args)
    loader = build_loader(cfg, 0, 1, vocab_size=320)
    decay = [p for n, p in hf.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in hf.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    theirs = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, learning_rate=lr, min_learning_rate=1e-4, warmup_steps=3, max_steps=steps)
        batches = [next(loader) for _ in range(2)]
        n = batches[0][2]
        total = 0.0
        for x, y, _ in batches:
            logits = hf(x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            (loss / n).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        theirs.append(total / n)
    gaps = [abs(a - b) / b for a, b in zip(ours, theirs)]
    print(f"continued pre-training vs HF's loop: max relative loss gap {max(gaps):.2e} over {steps} steps, loss "
          f"{theirs[0]:.3f} -> {theirs[-1]:.3f}")
    assert len(ours) == steps and max(gaps) < 1e-4, list(zip(ours, theirs))
    assert theirs[-1] < theirs[0] - 0.3  # it learned something: the comparison is not of two flat lines


def test_model_config_files_and_refusals(tmp_path):
    ours = tmp_path / "m.yaml"
    ours.write_text("d_model: 64\nn_layers: 2\nn_heads: 4\nn_kv_heads: 2\nffn_dim: 160\nvocab_size: 320\n"
                    "rope_scaling: linear\nrope_factor: 2.0\n")
    mc = load_model_config(ours)
    assert (mc.n_kv_heads, mc.rope_scaling, mc.rope_factor) == (2, "linear", 2.0)
    (tmp_path / "m.toml").write_text('d_model = 64\nn_layers = 2\nn_heads = 4\nn_kv_heads = 4\nffn_dim = 160\n'
                                     'vocab_size = 320\n')
    assert load_model_config(tmp_path / "m.toml").n_heads == 4
    save_hf("llama3_bias", tmp_path / "hf")
    hf_mc = load_model_config(tmp_path / "hf" / "config.json")
    assert (hf_mc.rope_scaling, hf_mc.qkv_bias, hf_mc.out_bias, hf_mc.rope_theta) == ("llama3", True, True, 5e5)

    def refused(change: dict, match: str):
        data = json.loads((tmp_path / "hf" / "config.json").read_text())
        data.update(change)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(data))
        with pytest.raises(ModelConfigError, match=match):
            load_model_config(bad)
            from scaletrain.model.config_io import check_training_length

            check_training_length(bad, 512)

    refused({"model_type": "gemma"}, "model_type 'gemma' is not supported")
    refused({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported")
    refused({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_scaling type 'yarn' is not supported")
    refused({"head_dim": 32}, "head_dim 32 differs")
    refused({"model_type": "mistral", "sliding_window": 128}, "sliding_window 128 is below --max-seq-length 512")
    # a damaged config names the field, not a ZeroDivisionError or a ValueError's traceback
    refused({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0")
    refused({"hidden_size": "2048"}, "hidden_size must be a positive integer, got '2048'")
    refused({"rms_norm_eps": "x"}, "rms_norm_eps must be a number, got 'x'")
    folder = tmp_path / "damaged"
    folder.mkdir()
    # weight files cut short (a download that stopped) name the file, not safetensors' or torch's traceback
    cut = tmp_path / "cut"
    save_hf("llama3_bias", cut)
    whole = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(whole[:3000])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a whole weight file \(SafetensorError: .*; "
                                              r"3,000 bytes\): a download cut short\? Fetch it again"):
        HFWeights(cut)
    (cut / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(3)}, cut / "pytorch_model.bin")
    (cut / "pytorch_model.bin").write_bytes((cut / "pytorch_model.bin").read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin is not a whole weight file \(RuntimeError: "):
        HFWeights(cut)
    for text, match in (('{"model_type": "llama"', r"--init-from: .*config.json could not be parsed: Expecting ','"),
                        ("[1, 2]", r"--init-from: .*config.json must hold a mapping")):
        (folder / "config.json").write_text(text)
        with pytest.raises(ModelConfigError, match=match):
            HFWeights(folder)
    (tmp_path / "x.json").write_text('{"d_model": 64, "layers": 2}')
    with pytest.raises(ModelConfigError, match=r"unknown field\(s\) \['layers'\]"):
        load_model_config(tmp_path / "x.json")


def test_init_from_refusals_name_the_tensor_and_the_file(tmp_path):
    from scaletrain.cli import parse_config

    save_hf("qwen2_tied", tmp_path / "hf")
    with pytest.raises(ConfigError, match="--init-from: the model's shape comes from these weights"):
        parse_config(["--init-from", str(tmp_path / "hf"), "--model-size", "tiny"])
    # a payload in pytorch_model.bin is refused before it runs
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    binf = tmp_path / "bin"
    binf.mkdir()
    (binf / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": torch.zeros(320, 64), "x": Payload()}, binf / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin names posix.system.*refused"):
        HFWeights(binf)
    assert not marker.exists()
    # a tensor of another shape is named with both shapes
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor layers.1.mlp.up_proj.weight has shape \[100, 64\], the "
                                              r"model needs \[160, 64\]"):
        HFWeights(tmp_path / "hf")


def test_init_from_a_scaletrain_checkpoint_and_the_tokenizer_check(tmp_path):
    """The next phase of a run: weights of a ZeRO-3 checkpoint saved by 2 ranks start an FSDP run of 1 (fresh
    optimizer and schedule: the lr of step 1 is warmup's first); shards of another tokenizer are refused."""
    from scaletrain.data.sample import prepare_sample

    shards = prepare_sample(tmp_path / "sample", quiet=True)
    base = ["--data-dir", str(shards), "--max-seq-length", "32", "--batch-size", "2", "--mixed-precision", "fp32",
            "--eval-interval", "0", "--no-use-tensorboard", "--log-interval", "1", "--warmup-steps", "2"]
    launch("torchrun", base + zero3_fp32(tmp_path) + ["--max-steps", "3", "--checkpoint-dir", str(tmp_path / "p1")],
           tmp_path, run_name="p1")
    proc = launch("python", base + ["--engine", "fsdp", "--init-from", str(tmp_path / "p1"), "--max-steps", "2",
                                    "--checkpoint-dir", str(tmp_path / "p2")], tmp_path, run_name="p2")
    assert "weights from scaletrain checkpoint" in proc.stdout
    assert "(step 3, deepspeed engine, 2 rank(s))" in proc.stdout
    first = read_metrics(tmp_path, "p1")[-1]["loss"]
    m = read_metrics(tmp_path, "p2")
    assert math.isclose(m[0]["lr"], 3e-4 / 2) and m[0]["loss"] < first + 0.5  # fresh schedule, trained weights
    # both phases trained at 32 tokens: the export says so, not the preset's 4096 the first phase's shape carried
    out = convert(str(tmp_path / "p2"), str(tmp_path / "p2-hf"), quiet=True)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 32
    # a third phase from that export, on the shards it was trained on: its tokenizer.json is the Hugging Face form of
    # theirs (byte-level here), which the export names, so they are taken (they were refused, to be prepared anew)
    proc = launch("python", base + ["--init-from", str(out), "--max-steps", "2", "--checkpoint-dir",
                                    str(tmp_path / "p3")], tmp_path, run_name="p3")
    assert "weights from Hugging Face model" in proc.stdout
    assert read_metrics(tmp_path, "p3")[0]["loss"] < first + 0.5
    # a Hugging Face folder whose tokenizer.json is not the data's
    save_hf("qwen2_tied", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    proc = launch("python", base + ["--init-from", str(tmp_path / "hf"), "--max-steps", "2"], tmp_path,
                  run_name="p4", check=False)
    assert proc.returncode == 1 and "its tokenizer" in proc.stderr and "prepare the data with --tokenizer" in \
        proc.stderr, proc.stderr[-2000:]


def test_model_knows_every_parameter_it_initialises():
    from scaletrain.model import get_model_config

    for mc in (get_model_config("tiny"), get_model_config("tiny", tie_embeddings=True, qkv_bias=True, out_bias=True)):
        with torch.device("meta"):
            model = Llama(mc)
        assert [n for n, _ in model.init_plan()] and {n for n, _ in model.init_plan()} == \
            {n for n, _ in model.named_parameters()}


CHAT = "{% for m in messages %}<|begin_of_text|>{{ m['role'] }}: {{ m['content'] }}<pad>{% endfor %}"


def test_prepare_takes_the_model_folders_tokenizer_and_training_accepts_it(tmp_path):
    """prepare --tokenizer FOLDER reads its tokenizer.json with the EOS its tokenizer_config.json names; a run
    --init-from that folder on those shards starts (the shards' tokenizer is the folder's), and its export keeps the
    folder's chat template (it was dropped: apply_chat_template on the export failed), with the template's special
    tokens read as tokens, and the folder's generation config through a resume (it was replaced by the three token
    ids: an Instruct model's extra end-of-turn ids and its sampling defaults were lost)."""
    import shutil

    from transformers import AutoTokenizer

    from scaletrain.convert import convert
    from scaletrain.data.prepare import main as prepare_main
    from scaletrain.data.tokenizer import train_bpe

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: the quick brown fox {i * 7} jumps."}) + "\n"
                              for i in range(400)))
    save_hf("qwen2_tied", tmp_path / "hf")
    train_bpe([str(corpus)], 300, str(tmp_path / "tok.json"))
    shutil.copy(tmp_path / "tok.json", tmp_path / "hf" / "tokenizer.json")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"},
                                                                       "chat_template": CHAT}))  # as hub repos do
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({  # as Llama 3 Instruct's: EOS ids and sampling
        "bos_token_id": 2, "eos_token_id": [0, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9,
        "transformers_version": "4.45.0.dev0"}))
    prepare_main(["--domain", "d", "--input", str(corpus), "--output", str(tmp_path / "data"), "--tokenizer",
                  str(tmp_path / "hf"), "--workers", "1"])
    manifest = json.loads((tmp_path / "data" / "d" / "manifest.json").read_text())
    assert manifest["tokenizer"]["eos_token"] == "<pad>"  # the folder's choice, not the first candidate's
    args = ["--data-dir", str(tmp_path / "data"), "--data-sources", "d", "--data-mix-weights", "1", "--init-from",
            str(tmp_path / "hf"), "--max-steps", "2", "--max-seq-length", "32", "--batch-size", "2", "--eval-interval",
            "0", "--no-use-tensorboard", "--mixed-precision", "fp32"]
    proc = launch("python", args + ["--stop-at-step", "1"], tmp_path)
    assert "weights from Hugging Face model" in proc.stdout and "qwen2, safetensors" in proc.stdout
    launch("python", args + ["--resume", "latest"], tmp_path)
    out = convert(str(tmp_path / "checkpoints"), str(tmp_path / "export"), quiet=True)
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(str(out))
    ids = AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids(["<pad>", "<|endoftext|>", "<|begin_of_text|>"])
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.bos_token_id) == (True, 0.6, 0.9, ids[2])
    assert ids[1:] == [0, 2] and gen.eos_token_id == [ids[0], 0, 7]  # the tokenizer's EOS (<pad> here, the folder's
    # choice) and the folder's end-of-text ids: generation stops at each
    chat = [{"role": "user", "content": "the quick fox"}]
    exported = AutoTokenizer.from_pretrained(str(out))
    assert exported.apply_chat_template(chat, tokenize=False) == "<|begin_of_text|>user: the quick fox<pad>"
    ids = exported(exported.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids[0] == exported.convert_tokens_to_ids("<|begin_of_text|>") and ids[-1] == exported.eos_token_id


def test_a_chat_template_is_read_where_transformers_saves_it(tmp_path):
    from scaletrain.data.tokenizer import folder_chat_template

    assert folder_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default",
                                                                                  "template": CHAT}]}))
    assert folder_chat_template(tmp_path) == [{"name": "default", "template": CHAT}]  # named templates
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json " + CHAT}))
    assert folder_chat_template(tmp_path) == "json " + CHAT
    (tmp_path / "chat_template.jinja").write_text(CHAT)  # transformers 5's save_pretrained
    assert folder_chat_template(tmp_path) == CHAT


def test_data_without_the_bos_the_model_folder_puts_first_is_warned_about(tmp_path, capsys):
    """Shards prepared without the BOS that the folder's tokenizer puts before every text (prepared before prepare
    followed the tokenizer, or with --no-add-bos): the model never saw a text without it, and the run says so."""
    from tokenizers import Tokenizer, processors

    from scaletrain.cli import parse_config
    from scaletrain.data.prepare import prepare_domain
    from scaletrain.data.tokenizer import train_bpe
    from scaletrain.run import _init_source, data_tokenizer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: the quick brown fox."}) + "\n" for i in range(50)))
    save_hf("qwen2_tied", tmp_path / "hf")
    plain, _ = train_bpe([str(corpus)], 300, str(tmp_path / "tok.json"))
    tok = Tokenizer.from_file(plain)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    for add_bos, warned in ((False, True), (None, False)):
        prepare_domain("d", [str(corpus)], str(tmp_path / "data"), tokenizer=str(tmp_path / "hf"), quiet=True,
                       add_bos=add_bos, overwrite=True)
        cfg = parse_config(["--data-dir", str(tmp_path / "data"), "--data-sources", "d", "--data-mix-weights", "1",
                            "--init-from", str(tmp_path / "hf"), "--max-seq-length", "32"])
        _init_source(cfg, data_tokenizer(cfg)[0])
        said = capsys.readouterr().err
        assert ("its tokenizer puts <|begin_of_text|> before every text, and the model was trained so; this data "
                "was prepared without it" in said) is warned, said


def test_a_model_folder_is_read_from_the_files_its_index_names(tmp_path):
    """Model repositories ship more than the weights transformers loads: Mistral's put a `consolidated.safetensors`
    (Mistral's own names) beside the Hugging Face shards, and a fine-tune may leave an `adapter_model.safetensors`.
    They are read as transformers reads them: the files `model.safetensors.index.json` names, else
    `model.safetensors` alone. A shard the index names but the folder lacks (a download cut short) is named."""
    from safetensors.torch import save_file

    hf = save_hf("llama3_bias", tmp_path / "hf", max_shard_size="100KB")
    folder = tmp_path / "hf"
    save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64), "tok_embeddings.weight": torch.zeros(320, 64)},
              str(folder / "consolidated.safetensors"))
    src = HFWeights(folder)
    ours = unfilled_model(src.model_config, "cpu")
    fill_whole(ours, src)
    ids = torch.randint(0, 320, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    # one file, no index, and an adapter beside it
    one = tmp_path / "one"
    save_hf("llama3_bias", one)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64)},
              str(one / "adapter_model.safetensors"))
    assert HFWeights(one).kind == "safetensors"
    # a shard missing
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (folder / last).unlink()
    with pytest.raises(CheckpointError, match=rf"{last}, which model.safetensors.index.json names, is missing"):
        HFWeights(folder)


def test_the_exported_generation_config_keeps_the_sources_and_the_tokenizers_ids():
    from scaletrain.convert import generation_config
    from scaletrain.data.manifest import TokenizerInfo

    tok = TokenizerInfo(kind="hf", name="t", identity="x", vocab_size=10, eos_token="e", eos_id=3, pad_token="e",
                        pad_id=None, bos_token="b", bos_id=1)
    assert generation_config(tok) == {"bos_token_id": 1, "eos_token_id": 3, "pad_token_id": None}
    assert generation_config(None) == {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    carried = {"eos_token_id": [7, 3], "pad_token_id": 4, "top_k": 20, "transformers_version": "4.0"}
    assert generation_config(tok, carried) == {"eos_token_id": [7, 3], "pad_token_id": 4, "top_k": 20,
                                               "bos_token_id": 1}
    assert generation_config(tok, {"eos_token_id": 7})["eos_token_id"] == [3, 7]


def test_a_folder_that_is_no_model_says_what_it_is(tmp_path):
    """Meta's original download (the original/ folder of a Hugging Face repo), weights without config.json, a folder
    of nothing: each named for what it is, not as a checkpoint whose save did not finish."""
    from scaletrain.checkpoint.init_from import open_init_source

    meta = tmp_path / "Llama-3.2-1B" / "original"
    meta.mkdir(parents=True)
    (meta / "params.json").write_text('{"dim": 2048}')
    (meta / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"Meta's original format \(params.json, consolidated.\*.pth\).*convert "
                                              r"it with transformers' convert_llama_weights_to_hf.py"):
        open_init_source(str(meta))
    (meta.parent / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"the Hugging Face folder above it has the same weights: --init-from "
                                              f"{meta.parent}$"):
        open_init_source(str(meta))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="holds model.safetensors but no config.json"):
        open_init_source(str(bare))
    (bare / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint \(no COMPLETE.json\) and no complete "
                                              r"checkpoint inside it, nor a Hugging Face model folder"):
        open_init_source(str(bare))
    (bare / "train_state_rank0.pt").write_bytes(b"")  # a save's first file without the marker: it did not finish
    with pytest.raises(CheckpointError, match=r"\(no COMPLETE.json: its save did not finish\)"):
        open_init_source(str(bare))


def test_a_hub_id_is_answered_with_the_hubs_cache_or_how_to_download(tmp_path, monkeypatch):
    """`--init-from meta-llama/Llama-3.2-1B` (and `prepare --tokenizer` the same) reads local folders only: the
    error names the snapshot the Hub's cache holds (the one refs/main names), else the download command."""
    from scaletrain.checkpoint.init_from import open_init_source
    from scaletrain.data.tokenizer import HFTokenizer, TokenizerError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"reads like a Hugging Face Hub id: .* \(huggingface-cli download "
                                              r"meta-llama/Llama-3.2-1B --local-dir models/Llama-3.2-1B\)"):
        open_init_source("meta-llama/Llama-3.2-1B")
    repo = tmp_path / "hf" / "hub" / "models--meta-llama--Llama-3.2-1B"
    for snap in ("old", "new"):
        (repo / "snapshots" / snap).mkdir(parents=True)
        (repo / "snapshots" / snap / "config.json").write_text("{}")
        (repo / "snapshots" / snap / "tokenizer.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("new\n")
    with pytest.raises(CheckpointError, match=f"the Hub's cache here holds it: {repo / 'snapshots' / 'new'}$"):
        open_init_source("meta-llama/Llama-3.2-1B")
    with pytest.raises(TokenizerError, match=f"the Hub's cache here holds it: {repo / 'snapshots' / 'new'}$"):
        HFTokenizer("meta-llama/Llama-3.2-1B")
    with pytest.raises(CheckpointError, match=r"models/mine: no such folder$"):  # a local path: no Hub talk
        open_init_source("models/mine")


def test_rows_longer_than_the_sources_positions_are_said_to_extend_its_context(capsys):
    """A model that knows 2048 positions trained on rows of 4096: RoPE as it is goes past them (a context extension,
    which recipes pair with a larger rope_theta or RoPE scaling); said once, and nothing for rows that fit."""
    import dataclasses

    from scaletrain.checkpoint.init_from import check_same_shape
    from scaletrain.model import get_model_config

    source = dataclasses.replace(get_model_config("tiny"), max_seq_len=2048, rope_theta=500000.0)
    run = dataclasses.replace(source, max_seq_len=4096)
    check_same_shape(source, run, "models/m", rows=4096)
    err = capsys.readouterr().err
    assert ("--init-from models/m knows 2048 positions (max_position_embeddings, or the length a checkpoint trained "
            "at); rows of 4096 tokens go past them with the run's RoPE (theta 500000)") in err, err
    check_same_shape(source, source, "models/m", rows=2048)
    assert capsys.readouterr().err == ""
