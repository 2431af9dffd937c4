"""Data pipeline: prepare, shards, mixing, packing/padding, exact resume on any world size, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from scaletrain.data.latex import clean_latex
from scaletrain.data.loader import ShardLoader, StreamSpec, build_loader, model_vocab_size
from scaletrain.data.mixer import RowMixer
from scaletrain.data.prepare import prepare_domain
from scaletrain.data.sample import create_sample_pretraining_data
from scaletrain.data.shards import DomainStream, ShardError
from scaletrain.data.text import InputError
from scaletrain.data.tokenizer import ByteTokenizer, TokenizerError, train_bpe

from .conftest import BIN, ROOT, clean_env, free_port

SMALL = dict(shard_tokens=4096, chunk_tokens=1024, val_fraction=0.05)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The sample corpus at 4% scale in many small shards (epochs wrap within a few hundred rows)."""
    root = tmp_path_factory.mktemp("data")
    raw = create_sample_pretraining_data(root, scale=0.04)
    for d in ("arxiv", "general"):
        prepare_domain(d, [str(raw[d])], str(root / "pre"), workers=2, quiet=True, **SMALL)
    return root


def spec(data, rank=0, world=1, mbs=4, gas=2, seq=32, packing=True, split="train"):
    return StreamSpec(str(data / "pre"), ("arxiv", "general"), (0.3, 0.7), seq, mbs, gas, rank, world, 0, packing,
                      split)


def take(loader, n):
    return [next(loader)[0].numpy() for _ in range(n)]


# ---- prepare ------------------------------------------------------------------------------
def test_prepare_is_deterministic_and_worker_count_independent(data, tmp_path):
    raw = data / "raw" / "arxiv"
    prepare_domain("arxiv", [str(raw)], str(tmp_path / "a"), workers=1, quiet=True, **SMALL)
    prepare_domain("arxiv", [str(raw)], str(tmp_path / "b"), workers=2, quiet=True, **SMALL)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 5
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    ref = sorted(p.relative_to(data / "pre" / "arxiv") for p in (data / "pre" / "arxiv").rglob("*") if p.is_file())
    assert [Path("arxiv") / f for f in ref] == files


def test_shards_are_webdataset_tars_with_big_members(data):
    m = json.loads((data / "pre" / "general" / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 258 and len(m["shards"]) > 3
    urls = [str(data / "pre" / "general" / s["file"]) for s in m["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None))
    assert len(samples) == sum(len(s["members"]) for s in m["shards"])
    tokens = np.concatenate([np.frombuffer(s["u16"], dtype="<u2") for s in samples])
    assert len(tokens) == m["tokens"]
    # documents joined by EOS, decodable text
    eos = m["tokenizer"]["eos_id"]
    assert (tokens == eos).sum() == m["documents"]
    first = ByteTokenizer().decode(tokens[: np.argmax(tokens == eos)])
    assert "has lived in" in first
    # one 512-byte header per member: data offsets step by header + padded data
    members = m["shards"][0]["members"]
    assert members[0][1] == 512 and members[1][1] == 512 + 1024 * 2 + 512


def test_latex_cleaner_keeps_text_and_math():
    src = (r"\documentclass{article}\usepackage{amsmath}\title{On Primes}\begin{document}\maketitle"
           "\n\\section{Intro}\\label{s}\nLet $p$ be prime~\\cite{e}. % secret\n\\begin{figure}\\caption{X}"
           "\\end{figure}\n\\begin{equation}\\label{q}\na^2+b^2=c^2\n\\end{equation}\n"
           r"\begin{thebibliography}{1}\bibitem{e} E.\end{thebibliography}\end{document}")
    out = clean_latex(src, "text").text
    assert "On Primes" in out and "Intro" in out and "Let $p$ be prime." in out and "a^2+b^2=c^2" in out
    for gone in ("secret", "caption", "cite", "label", "bibitem", "usepackage", "documentclass", "figure"):
        assert gone not in out, gone


# ---- mixing, packing, padding ---------------------------------------------------------------
def test_token_shares_match_weights_within_one_point(data):
    loader = ShardLoader(spec(data, mbs=16, gas=1, seq=64))
    take(loader, 1250)  # 20,000 rows
    pos = np.array(list(loader.state_dict()["domain_pos"].values()), dtype=float)
    assert abs(pos[0] / pos.sum() - 0.3) < 0.01


def test_mixer_rejects_bad_weights():
    for w in ([-0.1, 1.1], [0.0, 0.0], [float("nan"), 1.0], []):
        with pytest.raises(ValueError, match="weights"):
            RowMixer(w, 0)


def test_packed_rows_follow_the_domain_streams(data):
    loader = ShardLoader(spec(data, mbs=4, gas=1))
    x, y, n = next(loader)
    assert x.shape == (4, 32) and (x[:, 1:] == y[:, :-1]).all() and n == 4 * 32
    dom = RowMixer([0.3, 0.7], 0).domains(0, 4)
    streams = [DomainStream(data / "pre" / d, seed=0, domain_index=i) for i, d in enumerate(("arxiv", "general"))]
    pos = [0, 0]
    for i, d in enumerate(dom):
        row = streams[d].read(pos[d], 33)
        pos[d] += 33
        assert (x[i].numpy() == row[:-1]).all()


def test_padding_mode_one_document_per_row(data):
    loader = ShardLoader(spec(data, mbs=4, gas=1, seq=4096, packing=False))
    x, y, n = next(loader)
    assert n == int((y != -100).sum())  # the step's real target tokens, padding not counted
    eos, pad = 256, 257
    for i in range(4):
        n = int((y[i] != -100).sum())
        assert (y[i, n:] == -100).all() and (x[i, n:] == pad).all()
        assert y[i, n - 1] == eos and eos not in x[i, :n].tolist()  # exactly one document, ending in EOS
    assert x.shape[1] == max(int((y[i] != -100).sum()) for i in range(4))  # padded to the longest


def test_padded_rows_keep_token_shares_and_count_real_tokens(data):
    """--no-packing: one document per row, yet the weights stay shares of trained target tokens (rows are
    drawn by token deficit), and each micro-batch carries the step's real target-token count."""
    loader = ShardLoader(spec(data, mbs=8, gas=2, seq=512, packing=False))
    total = 0
    for _ in range(150):  # 150 steps of 16 rows
        micro = [next(loader) for _ in range(2)]
        real = sum(int((y != -100).sum()) for _, y, _ in micro)
        assert micro[0][2] == micro[1][2] == real
        total += real
    tokens = loader.state_dict()["domain_tokens"]
    assert sum(tokens.values()) == total
    assert abs(tokens["arxiv"] / total - 0.3) < 0.01, tokens
    # documents of the two domains differ in length: document shares are far from the weights
    pos = loader.state_dict()["domain_pos"]
    docs = {d: DomainStream(data / "pre" / d).manifest.train for d in ("arxiv", "general")}
    mean_len = {d: docs[d].tokens / docs[d].documents for d in docs}
    assert max(mean_len.values()) > 1.5 * min(mean_len.values()), mean_len
    assert pos["arxiv"] > 0


def test_padded_rows_say_what_cutting_long_documents_dropped(tmp_path):
    """--no-packing keeps a row's first max_seq_length + 1 tokens of each document: the loader counts the rest,
    which was never trained, and says it when it is 1% or more of a domain's tokens read."""
    docs = [f"{i:02d}" + "a" * 98 for i in range(10)] + [f"{i:02d}" + "b" * 998 for i in range(10, 20)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare_domain("long", [str(tmp_path / "in.jsonl")], str(tmp_path / "pre"), quiet=True)
    one = StreamSpec(str(tmp_path / "pre"), ("long",), (1.0,), 200, 4, 1, 0, 1, 0, False)
    loader = ShardLoader(one)
    for _ in range(5):  # 20 rows: every document once (100 and 1000 bytes, each with its EOS)
        next(loader)
    cut = 10 * (1001 - 201)
    assert loader.cut_warning() == (
        f"--no-packing cuts each document to one row of --max-seq-length + 1 = 201 tokens: in the first 5 steps, "
        f"{100 * cut / (10 * 101 + 10 * 1001):.1f}% of the tokens read from long were cut off and not trained on. "
        f"Packing (the default) trains every token; or raise --max-seq-length")
    rows_of_1001 = ShardLoader(StreamSpec(str(tmp_path / "pre"), ("long",), (1.0,), 1000, 4, 1, 0, 1, 0, False))
    for _ in range(5):
        next(rows_of_1001)
    assert rows_of_1001.cut_warning() is None  # every document fits a row


def test_raw_text_folder_says_which_prepare_command_to_run(tmp_path):
    raw = tmp_path / "data" / "pretraining" / "arxiv"
    raw.mkdir(parents=True)
    (raw / "part-000.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ShardError) as e:
        DomainStream(raw)
    msg = str(e.value)
    assert "it holds raw text (part-000.jsonl), not prepared shards" in msg
    assert f"scaletrain prepare --domain arxiv --input {raw} --output {tmp_path / 'data' / 'pretraining_prepared'}" \
        in msg and f"--data-dir {tmp_path / 'data' / 'pretraining_prepared'}" in msg
    # a prepared domain that lost its manifest is no raw text (its tokenizer.json was taken for one)
    prepared = tmp_path / "prepared" / "a"
    prepare_domain("a", [str(raw / "part-000.jsonl")], str(prepared.parent), quiet=True)
    (prepared / "manifest.json").unlink()
    with pytest.raises(ShardError, match=r"a has no manifest.json: it holds shards \(shard-00000.tar\) but not their "
                                         r"manifest \(deleted, or left out of a copy\): copy manifest.json back"):
        DomainStream(prepared)


def test_format_1_manifest_is_read(data, tmp_path):
    import shutil

    old = tmp_path / "general"
    shutil.copytree(data / "pre" / "general", old)
    m = json.loads((old / "manifest.json").read_text())
    m["format"] = 1
    m["tokenizer"] = {k: m["tokenizer"][k] for k in ("name", "identity", "vocab_size", "eos_id", "pad_id")}
    (old / "manifest.json").write_text(json.dumps(m))
    tok = DomainStream(old).manifest.tokenizer
    assert (tok.kind, tok.eos_token, tok.eos_id, tok.pad_token, tok.bos_id) == ("byte", "<|endoftext|>", 256,
                                                                                "<pad>", None)


# ---- exact resume ---------------------------------------------------------------------------
def _fresh_process_rows(data, state, steps, workers, tmp_path):
    code = f"""
import json, numpy as np
from scaletrain.data.loader import ShardLoader, StreamSpec
spec = StreamSpec({str(data / 'pre')!r}, ("arxiv", "general"), (0.3, 0.7), 256, 4, 2, 0, 1, 0)
loader = ShardLoader(spec, num_workers={workers})
loader.load_state_dict(json.loads({json.dumps(state)!r}))
np.save({str(tmp_path / 'rows.npy')!r}, np.stack([next(loader)[0].numpy() for _ in range({steps * 2})]))
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)  # workers left at exit hung it
    return list(np.load(tmp_path / "rows.npy"))


@pytest.mark.parametrize("workers_before, workers_after", [(0, 0), (2, 2), (0, 2)])
def test_exact_resume_in_a_fresh_process_across_shards_and_epochs(data, tmp_path, workers_before, workers_after):
    straight = take(ShardLoader(spec(data, seq=256), num_workers=workers_before), 2 * 160)
    loader = ShardLoader(spec(data, seq=256), num_workers=workers_before)
    first = take(loader, 2 * 100)
    state = loader.state_dict()
    rest = _fresh_process_rows(data, state, 60, workers_after, tmp_path)
    got = first + rest
    assert all((a == b).all() for a, b in zip(straight, got)) and len(got) == len(straight)
    # the run crossed shard and epoch boundaries of the arxiv domain
    arxiv = DomainStream(data / "pre" / "arxiv")
    assert state["domain_pos"]["arxiv"] > arxiv.total > max(arxiv.shard_tokens)


def test_state_is_refused_mid_step(data):
    loader = ShardLoader(spec(data))
    next(loader)
    with pytest.raises(RuntimeError, match="mid-step"):
        loader.state_dict()


def _torchrun(nproc, data, out, steps, gas, state):
    env = clean_env()
    subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
                    str(ROOT / "tests" / "data_resume_worker.py"), str(data / "pre"), str(out), str(steps), str(gas),
                    state], check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)


def _global_rows(out, world, gas, steps):
    """Reassemble the global row order from per-rank micro-batches."""
    per = [np.load(f"{out}.rank{r}.npy") for r in range(world)]  # (steps*gas, mbs, T)
    rows = []
    for s in range(steps):
        for g in range(gas):
            for r in range(world):
                rows.extend(per[r][s * gas + g])
    return np.stack(rows)


@pytest.mark.parametrize("world_before, world_after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_global_stream(data, tmp_path, world_before, world_after):
    loader = ShardLoader(spec(data, mbs=8, gas=1))
    straight = np.concatenate([next(loader)[0].numpy() for _ in range(10)])  # 10 steps x 8 rows, world 1
    _torchrun(world_before, data, tmp_path / "a", 6, 2, "-")
    _torchrun(world_after, data, tmp_path / "b", 4, 2 if world_after == 1 else 1, str(tmp_path / "a.state.json"))
    got = np.concatenate([_global_rows(tmp_path / "a", world_before, 2, 6),
                          _global_rows(tmp_path / "b", world_after, 2 if world_after == 1 else 1, 4)])
    assert got.shape == straight.shape and (got == straight).all()


# ---- tokenizers -------------------------------------------------------------------------------
def test_trained_bpe_sets_the_model_vocab_and_a_mismatch_is_refused(data, tmp_path):
    with pytest.raises(TokenizerError, match="--min-frequency -1: give 1 or more"):  # was an OverflowError
        train_bpe([str(data / "raw" / "general")], 400, str(tmp_path / "tok.json"), min_frequency=-1)
    tok, _ = train_bpe([str(data / "raw" / "general")], 400, str(tmp_path / "tok.json"))
    with pytest.raises(TokenizerError, match="exists; shards prepared with it record its hash"):  # was replaced
        train_bpe([str(data / "raw" / "arxiv")], 400, tok)
    with pytest.raises(TokenizerError, match=f"--output {tmp_path} is a folder"):  # was an IsADirectoryError
        train_bpe([str(data / "raw" / "arxiv")], 400, str(tmp_path))
    other, _ = train_bpe([str(data / "raw" / "arxiv")], 420, str(tmp_path / "other.json"))
    for d in ("arxiv", "general"):
        prepare_domain(d, [str(data / "raw" / d)], str(tmp_path / "bpe"), tokenizer=tok, workers=2, quiet=True,
                       **SMALL)
    from scaletrain.cli import parse_config

    argv = ["--data-dir", str(tmp_path / "bpe"), "--max-seq-length", "32", "--batch-size", "2"]
    loader = build_loader(parse_config(argv + ["--tokenizer", tok]), 0, 1)
    assert loader.vocab_size == 400 and model_vocab_size(loader.vocab_size) == 448
    assert (tmp_path / "bpe" / "arxiv" / "tokenizer.json").exists()
    with pytest.raises(ShardError, match="is not the one .* was prepared with"):
        build_loader(parse_config(argv + ["--tokenizer", other]), 0, 1)
    # the tokenizer.json beside the shards goes into every checkpoint and the export: a changed one is refused
    from scaletrain.run import data_tokenizer

    cfg = parse_config(argv + ["--data-sources", "arxiv", "general", "--data-mix-weights", "0.5", "0.5"])
    assert data_tokenizer(cfg)[1] == tmp_path / "bpe" / "arxiv" / "tokenizer.json"
    shutil.copyfile(other, tmp_path / "bpe" / "arxiv" / "tokenizer.json")
    with pytest.raises(ShardError, match=r"bpe/arxiv/tokenizer.json is not the tokenizer .*bpe/arxiv was prepared "
                                         r"with \(the manifest records sha256:.*, the file is sha256:.*\): it was "
                                         r"changed or damaged since"):
        data_tokenizer(cfg)


def test_a_sentencepiece_only_model_folder_says_how_to_get_a_tokenizer_json(tmp_path):
    from scaletrain.data.tokenizer import TokenizerError, load_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x0b")  # what older Llama/Mistral folders ship alone
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    with pytest.raises(TokenizerError, match=rf"has only SentencePiece's tokenizer.model .*T.from_pretrained\("
                                             rf"'{tmp_path}'\).save_pretrained\('{tmp_path}'\)"):
        load_tokenizer(str(tmp_path))


def test_a_special_tokens_string_in_a_document_is_text_unless_asked(data, tmp_path, capsys):
    """A page quoting "<|endoftext|>" ended its document there: prepare gave it the EOS id mid-document (Hugging Face
    tokenizers parse special tokens in text by default), so --document-masking cut it and EOS was learned inside
    text. Now it is encoded as its characters; --parse-special-tokens keeps the old reading, the manifest says which
    (manifests from before the field: parsed), and domains that differ are not mixed."""
    import json

    from scaletrain.data.manifest import TokenizerInfo, load_manifest
    from scaletrain.data.shards import DomainStream
    from scaletrain.run import data_tokenizer

    tok, _ = train_bpe([str(data / "raw" / "general")], 400, str(tmp_path / "tok.json"))
    text = "A model stops at <|endoftext|> and pads with <pad>; that is all."
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps({"text": "Nothing special here."}) + "\n")
    written = {}
    for mode, parse in (("text", False), ("parsed", True)):
        m = prepare_domain(mode, [str(tmp_path / "in" / "b.jsonl"), str(tmp_path / "in" / "a.jsonl")],
                           str(tmp_path / "out"), tokenizer=tok, parse_special=parse)
        assert m.tokenizer.parse_special is parse
        assert m.reading["special_token_strings"] == {"<|endoftext|>": 1}  # counted, by the first one spelled
        said = capsys.readouterr().err
        assert f"{mode}: 1 documents spell out special tokens (<|endoftext|> in 1): " + (
            "read as those tokens" if parse else "encoded as text; if they are meant as the tokens") in said, said
        stream = DomainStream(tmp_path / "out" / mode)
        both = stream.read(0, stream.total).tolist()
        written[mode] = both[both.index(m.tokenizer.eos_id) + 1:]  # the second document, after the plain one
    eos, pad = m.tokenizer.eos_id, m.tokenizer.pad_id
    assert written["text"][-1] == eos and eos not in written["text"][:-1] and pad not in written["text"]
    assert written["parsed"][:-1].count(eos) == 1 and pad in written["parsed"]
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(tok).decode(written["text"][:-1], skip_special_tokens=False) == text
    with pytest.raises(TokenizerError, match="--parse-special-tokens: the byte-level tokenizer"):
        prepare_domain("b", [str(tmp_path / "in")], str(tmp_path / "out"), quiet=True, parse_special=True)
    # a manifest written before the field: a Hugging Face tokenizer parsed, the byte-level one never did
    record = json.loads((tmp_path / "out" / "text" / "manifest.json").read_text())["tokenizer"]
    del record["parse_special"]
    assert TokenizerInfo.from_dict(record).parse_special is True
    assert TokenizerInfo.from_dict({**record, "kind": "byte"}).parse_special is False
    assert load_manifest(tmp_path / "out" / "parsed").tokenizer.parse_special is True
    from scaletrain.cli import parse_config

    argv = ["--data-dir", str(tmp_path / "out"), "--max-seq-length", "8", "--batch-size", "1", "--data-sources",
            "text", "parsed", "--data-mix-weights", "0.5", "0.5"]
    with pytest.raises(ShardError, match=r"prepared with and without --parse-special-tokens \(text: False, parsed: "
                                         r"True\); prepare them all the same way"):
        data_tokenizer(parse_config(argv))
    with pytest.raises(ShardError, match=r"prepared with and without --parse-special-tokens \(text: False, parsed: "
                                         r"True\)"):
        ShardLoader(StreamSpec(str(tmp_path / "out"), ("text", "parsed"), (0.5, 0.5), 8, 1, 1, 0, 1, 0))


def test_a_tokenizer_that_puts_its_bos_first_gets_it_by_default(data, tmp_path, capsys):
    """A Llama folder's tokenizer puts <|begin_of_text|> before every text (its post-processor: what the model was
    trained on, and what AutoTokenizer gives). prepare left it out unless --add-bos, so continued pre-training from
    such a model trained on documents without the token it always began with. Now the default follows the
    tokenizer; --no-add-bos (add_bos=False) leaves it out; a trained BPE (no post-processor) gets none."""
    import json

    from tokenizers import Tokenizer, processors

    from scaletrain.data.prepare import add_prepare_args
    from scaletrain.data.shards import DomainStream

    plain, _ = train_bpe([str(data / "raw" / "general")], 400, str(tmp_path / "plain.json"))
    llama = Tokenizer.from_file(plain)
    bos = llama.token_to_id("<|begin_of_text|>")
    llama.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                         special_tokens=[("<|begin_of_text|>", bos)])
    (tmp_path / "llama").mkdir()
    llama.save(str(tmp_path / "llama" / "tokenizer.json"))
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "One document."}) + "\n")
    both = Tokenizer.from_file(plain)  # BOS before and EOS after (Llama 2's add_eos_token): the BOS all the same
    eos = both.token_to_id("<|endoftext|>")
    both.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A <|endoftext|>",
        special_tokens=[("<|begin_of_text|>", bos), ("<|endoftext|>", eos)])
    both.save(str(tmp_path / "both.json"))
    (tmp_path / "flagged").mkdir()  # a folder whose tokenizer_config.json turns it off: transformers follows that
    llama.save(str(tmp_path / "flagged" / "tokenizer.json"))
    (tmp_path / "flagged" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    for name, tok, flag, first in (("llama", str(tmp_path / "llama"), None, True), ("off", str(tmp_path / "llama"),
                                   False, False), ("plain", plain, None, False), ("both", str(tmp_path / "both.json"),
                                                                                  None, True),
                                   ("flagged", str(tmp_path / "flagged"), None, False)):
        m = prepare_domain(name, [str(tmp_path / "in.jsonl")], str(tmp_path / "out"), tokenizer=tok, add_bos=flag)
        stream = DomainStream(tmp_path / "out" / name)
        assert m.tokenizer.add_bos is first and (stream.read(0, 1).tolist() == [bos]) is first, name
        said = capsys.readouterr().err
        assert ("<|begin_of_text|> goes before every document, as " in said) is first, said
    import argparse

    p = argparse.ArgumentParser()
    add_prepare_args(p)
    base = ["--input", "x", "--output", "y"]
    assert [p.parse_args(base + f).add_bos for f in ([], ["--add-bos"], ["--no-add-bos"])] == [None, True, False]


def test_domains_with_different_tokenizers_are_refused(data, tmp_path):
    tok, _ = train_bpe([str(data / "raw" / "general")], 400, str(tmp_path / "tok.json"))
    prepare_domain("arxiv", [str(data / "raw" / "arxiv")], str(tmp_path / "mix"), tokenizer=tok, quiet=True, **SMALL)
    prepare_domain("general", [str(data / "raw" / "general")], str(tmp_path / "mix"), quiet=True, **SMALL)
    with pytest.raises(ShardError, match="different tokenizers"):
        ShardLoader(StreamSpec(str(tmp_path / "mix"), ("arxiv", "general"), (0.3, 0.7), 32, 2, 1, 0, 1, 0))


# ---- bad input ------------------------------------------------------------------------------
def _prep(tmp_path, files, **kw):
    inp = tmp_path / "in"
    inp.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (inp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return prepare_domain("d", [str(inp)], str(tmp_path / "out"), quiet=True, **kw)


def test_malformed_json_line_names_file_and_line(tmp_path):
    files = {"a.jsonl": '{"text": "fine"}\n{"text": broken\n{"text": "also fine"}\n'}
    with pytest.raises(InputError, match=r"a.jsonl:2: malformed JSONL line"):
        _prep(tmp_path, files)
    assert not (tmp_path / "out" / "d").exists()  # nothing half-written left behind
    m = _prep(tmp_path, files, skip_bad_lines=True)
    assert m.skipped_bad_lines == 1 and m.train.documents == 2


def test_non_utf8_empty_file_and_empty_domain(tmp_path):
    with pytest.raises(InputError, match=r"b.txt:2: not valid UTF-8"):
        _prep(tmp_path / "1", {"b.txt": b"ok line\nbad \xff byte\n"})
    with pytest.raises(InputError, match=r"e.txt: file is empty"):
        _prep(tmp_path / "2", {"e.txt": ""})
    with pytest.raises(InputError, match="hold no documents"):
        _prep(tmp_path / "3", {"a.jsonl": '{"text": "   "}\n'})
    with pytest.raises(InputError, match="does not exist"):
        prepare_domain("d", [str(tmp_path / "nope")], str(tmp_path / "out"), quiet=True)
    with pytest.raises(InputError, match=r"--workers 0: give 1 or more processes"):  # was taken as 1
        prepare_domain("d", [str(tmp_path / "nope")], str(tmp_path / "out"), quiet=True, workers=0)


def test_existing_output_is_refused_then_replaced_only_when_complete(tmp_path):
    _prep(tmp_path, {"a.txt": "first version"})
    with pytest.raises(InputError, match="already holds a complete preparation; pass --overwrite"):
        _prep(tmp_path, {"a.txt": "second"})
    before = (tmp_path / "out" / "d" / "manifest.json").read_text()
    with pytest.raises(InputError):  # a failing overwrite keeps the old domain intact
        _prep(tmp_path, {"a.txt": "second", "z.jsonl": "{bad"}, overwrite=True)
    assert (tmp_path / "out" / "d" / "manifest.json").read_text() == before
    (tmp_path / "in" / "z.jsonl").unlink()
    _prep(tmp_path, {"a.txt": "second"}, overwrite=True)
    assert (tmp_path / "out" / "d" / "manifest.json").read_text() != before


def test_prepare_never_replaces_its_inputs_or_reads_its_output(tmp_path):
    """Raw text in data/web prepared with --domain web --output data: the domain folder was the input folder, the
    refusal without --overwrite advised --overwrite, and that replaced the corpus with its shards."""
    raw = tmp_path / "data" / "web"
    raw.mkdir(parents=True)
    (raw / "corpus.jsonl").write_text('{"text": "the only copy"}\n')
    for overwrite in (False, True):
        with pytest.raises(InputError, match=rf"--input {raw} is inside the domain folder {raw} that prepare "
                                             rf"writes \(and replaces with --overwrite\); give an --output outside "
                                             rf"the inputs, e.g. --output {tmp_path / 'data_prepared'}"):
            prepare_domain("web", [str(raw)], str(raw.parent), quiet=True, overwrite=overwrite)
    with pytest.raises(InputError, match=rf"the domain folder {tmp_path / 'data' / 'out' / 'web'} is inside --input "
                                         rf"{raw.parent}, whose walk would read earlier preparations back in"):
        prepare_domain("web", [str(raw.parent)], str(raw.parent / "out"), quiet=True)
    (tmp_path / "in.jsonl").write_text('{"text": "another corpus"}\n')
    with pytest.raises(InputError, match=rf"--output: {raw} holds files that no preparation writes \(corpus.jsonl\)"
                                         rf"; .* Nothing was changed"):
        prepare_domain("web", [str(tmp_path / "in.jsonl")], str(raw.parent), quiet=True, overwrite=True)
    assert [p.name for p in raw.iterdir()] == ["corpus.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in.jsonl"]


def test_missing_domain_truncated_and_corrupt_shards(data, tmp_path):
    import shutil

    with pytest.raises(ShardError, match="data domain folder .*nope does not exist; --data-dir .*pre holds the "
                                         "prepared domains .*general .*or prepare it with"):
        DomainStream(data / "pre" / "nope")
    # the folder above the domains (make pretrain's data/sample for data/sample/pretraining) names the one below
    pre = data / "pre"
    with pytest.raises(ShardError, match=f"general does not exist; {pre} holds it: --data-dir {pre}$"):
        DomainStream(data / "general")
    with pytest.raises(ShardError, match="--data-dir .*absent does not exist either; prepare a domain into it"):
        DomainStream(tmp_path / "absent" / "general")
    from scaletrain.data.tokenizer import HFTokenizer

    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer_config.json").write_bytes('{"bos_token": "<s>"}'.encode("utf-16"))
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        HFTokenizer(str(model))
    damaged = tmp_path / "damaged"
    shutil.copytree(data / "pre" / "general", damaged)
    for text in (b"{", b"\xff\xfe{}"):  # cut short; not UTF-8 (a copy through a tool that re-encoded it)
        (damaged / "manifest.json").write_bytes(text)
        with pytest.raises(ShardError, match="manifest.json: corrupt manifest .*; prepare the domain again"):
            DomainStream(damaged)
    copy = tmp_path / "general"
    shutil.copytree(data / "pre" / "general", copy)
    shard = copy / "shard-00001.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:-3000])
    with pytest.raises(ShardError, match="shard-00001.tar is .* bytes but its manifest says"):
        DomainStream(copy)
    bad = bytearray(good)
    bad[512 + 2048: 512 + 2048 + 10] = b"garbage!!!"  # the second member's header
    shard.write_bytes(bytes(bad))
    stream = DomainStream(copy)
    perm, starts = stream._epoch_order(0)
    k = int(np.flatnonzero(perm == 1)[0])
    with pytest.raises(ShardError, match=r"shard-00001.tar: member 00001_000001.u16 is corrupt"):
        stream.read(int(starts[k]), 2048)


@pytest.mark.parametrize("fill", [0xFF, 0x00])
def test_overwritten_member_data_is_found_on_first_read(data, tmp_path, fill):
    """0xFF over a member's data used to give a bare IndexError (a device assert on a GPU); zeros trained silently.
    The member's checksum names shard and member; without checksums (older manifests) the id range still does."""
    import shutil

    copy = tmp_path / "general"
    shutil.copytree(data / "pre" / "general", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    name, offset, n, digest = manifest["shards"][1]["members"][0]
    assert len(digest) == 16  # xxh3-64, hex
    shard = copy / "shard-00001.tar"
    raw = bytearray(shard.read_bytes())
    raw[offset: offset + 2 * n] = bytes([fill]) * (2 * n)
    shard.write_bytes(bytes(raw))

    def first_read(stream):
        perm, starts = stream._epoch_order(0)
        k = int(np.flatnonzero(perm == 1)[0])
        return stream.read(int(starts[k]), 16)

    with pytest.raises(ShardError, match=rf"shard-00001.tar: member {name} does not match its checksum"):
        first_read(DomainStream(copy))
    for shard_info in manifest["shards"]:  # a manifest from before checksums
        shard_info["members"] = [m[:3] for m in shard_info["members"]]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    if fill == 0xFF:
        with pytest.raises(ShardError, match=rf"member {name} holds token id 65535, past the vocabulary of 258"):
            first_read(DomainStream(copy))


def test_val_split_and_missing_val(data, tmp_path, capsys):
    val = ShardLoader(spec(data, split="val", gas=1))
    x, _, _ = next(val)
    assert x.shape == (4, 32)
    prepare_domain("arxiv", [str(data / "raw" / "arxiv")], str(tmp_path / "noval"), quiet=True, shard_tokens=4096,
                   chunk_tokens=1024)
    with pytest.raises(ShardError, match="has no shards"):
        DomainStream(tmp_path / "noval" / "arxiv", "val")
    # a fraction too small for the documents there are: said at once, not found at training time
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(5)))
    capsys.readouterr()
    prepare_domain("few", [str(few)], str(tmp_path / "out"), quiet=True, val_fraction=0.01)
    assert "few: warning: --val-fraction 0.01 held out none of its 5 documents" in capsys.readouterr().err


def test_the_held_out_rows_do_not_depend_on_the_runs_seed(data):
    """The validation rows are the data's, not the run's: with several held-out shards their order followed
    --seed, so runs of a seed sweep measured val_loss on different rows, and a resume with another --seed (which
    keeps the training order) changed the rows that best is chosen by."""
    from scaletrain.cli import parse_config

    assert len(list((data / "pre" / "general" / "val").glob("*.tar"))) > 1
    firsts = []
    for seed in ("1", "2"):
        cfg = parse_config(["--data-dir", str(data / "pre"), "--data-sources", "arxiv", "general", "--data-mix-weights",
                            "0.3", "0.7", "--max-seq-length", "32", "--batch-size", "4", "--seed", seed])
        val = build_loader(cfg, 0, 1, "val", 320)
        firsts.append({d: take(loader, 6) for d, loader in val.items()})
    for d in ("arxiv", "general"):
        assert all(np.array_equal(a, b) for a, b in zip(firsts[0][d], firsts[1][d])), d
    # synthetic data: the same
    cfg = [parse_config(["--data-kind", "synthetic", "--max-seq-length", "32", "--seed", s]) for s in ("1", "2")]
    a, b = (next(build_loader(c, 0, 1, "val", 320))[0] for c in cfg)
    assert torch.equal(a, b)


# ---- the demo ---------------------------------------------------------------------------------
def test_demo_runs(tmp_path):
    env = clean_env()
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "demo.py"), "--data-dir", str(tmp_path), "--steps",
                           "4", "--run-dir", str(tmp_path / "runs"), "--no-use-tensorboard", "--checkpoint-dir",
                           str(tmp_path / "ck")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixing over" in proc.stdout and "demo done: 4 steps" in proc.stdout
    shares = proc.stdout.split("mixing over")[1].splitlines()[0]
    assert "arxiv 3" in shares and "general 6" in shares or "general 7" in shares
    assert (tmp_path / "ck" / "final" / "COMPLETE.json").is_file()
    # again: it starts over, its logs too (one course in runs/demo, nothing set aside to pile up)
    again = subprocess.run([sys.executable, str(ROOT / "launch" / "demo.py"), "--data-dir", str(tmp_path), "--steps",
                            "2", "--run-dir", str(tmp_path / "runs"), "--no-use-tensorboard", "--checkpoint-dir",
                            str(tmp_path / "ck")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    logged = [json.loads(x)["step"] for x in (tmp_path / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2] and not list((tmp_path / "runs" / "demo").glob("superseded-*"))
    # stopped before its end (here --stop-at-step, before any logged loss): it said "demo done" with a loss of None,
    # a TypeError
    stopped = subprocess.run([sys.executable, str(ROOT / "launch" / "demo.py"), "--data-dir", str(tmp_path), "--steps",
                              "4", "--stop-at-step", "1", "--run-dir", str(tmp_path / "runs"), "--no-use-tensorboard",
                              "--checkpoint-dir", str(tmp_path / "ck")], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=300)
    assert stopped.returncode == 0 and "stopped at step 1 (--stop-at-step)" in stopped.stdout, stopped.stderr[-3000:]
    assert "demo done" not in stopped.stdout
