"""README.md's command lines stay true: every flag of every scaletrain, launcher and make command in its code
blocks is accepted by the parser that will read it (a flag renamed in the code, or mistyped in README, fails
here). Placeholders are kept readable in README: ``...`` is dropped, ``[--opt a|b]`` is read as ``--opt a``, a
shell variable as 0. Benchmarks run as far as their argparse call. Every block marked ``<!-- readme-test: run -->``
(the CPU ones) is also run, command by command as written, in a temporary folder with ``SCALETRAIN_SMOKE=1``; a
test checks that each marked block has its test."""

import json
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("python", "scaletrain", "torchrun", "deepspeed", "make", "sbatch")


RUN_MARK = "<!-- readme-test: run -->"


def _blocks() -> list[tuple[bool, list[str]]]:
    """README.md's indented code blocks, each with whether the line before it is the run mark."""
    blocks, current, previous = [], None, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("    "):
            if current is None:
                current = (previous.strip() == RUN_MARK, [])
                blocks.append(current)
            current[1].append(line[4:])
        else:
            current = None
            if line.strip():
                previous = line
    return blocks


def _commands(lines: list[str]) -> list[str]:
    """Command lines of a code block (continuations joined, comments dropped)."""
    commands, current = [], ""
    for line in lines:
        text = line.strip()
        if current:
            current += " " + text
        elif text.split(" ", 1)[0] in PROGRAMS and not line.startswith(" "):
            current = text
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        commands.append(current if current.startswith("python -c") else re.sub(r"\s+#.*$", "", current).strip())
        current = ""
    return commands


def readme_commands(run_only: bool = False) -> list[str]:
    """Command lines of README.md's code blocks; with ``run_only``, those of the blocks marked to be run."""
    return [c for marked, lines in _blocks() if marked or not run_only for c in _commands(lines)]


def run_block(first: str) -> list[str]:
    """The command lines of the block marked to be run whose first command starts with ``first``."""
    blocks = [_commands(lines) for marked, lines in _blocks() if marked]
    found = [b for b in blocks if b and b[0].startswith(first)]
    assert len(found) == 1, f"README has {len(found)} run-marked blocks starting with {first!r}"
    return found[0]


# how each run-marked block begins: short, so that a block edited (or broken) in README is still found and run
FIRST_HOUR = "scaletrain prepare --domain mine"
CONTINUED = "scaletrain prepare --domain web"
ONE_PROCESS = "python launch/pretrain.py --model-size tiny"
DATA = "scaletrain train-tokenizer"
CHECKPOINTS = "python launch/pretrain.py ..."


def test_every_run_marked_block_is_run_by_a_test():
    firsts = {b[0] for b in (_commands(lines) for marked, lines in _blocks() if marked)}
    tested = (FIRST_HOUR, CONTINUED, ONE_PROCESS, DATA, CHECKPOINTS)
    assert sorted(next((t for t in tested if f.startswith(t)), f) for f in firsts) == sorted(tested), firsts


def _plain(cmd: str) -> list[str]:
    """The command as argv with README's placeholders resolved."""
    cmd = cmd.replace("...", " ")
    cmd = re.sub(r"\$[A-Z_]+", "0", cmd)  # shell variables ($NODE_RANK, $MASTER_ADDR): any value parses
    cmd = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split("|")[0], cmd)  # [--dtype bf16|fp16] -> --dtype bf16
    cmd = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split("|")[0], cmd)  # nested once
    return shlex.split(cmd)


def _check_pretrain(args: list[str]) -> None:
    from scaletrain.cli import build_parser

    build_parser().parse_args(args)


class _Parsed(Exception):
    """Raised by the patched parser once a script's flags parsed: nothing of the script runs."""


def _check_script(path: Path, args: list[str]) -> None:
    """Run the script's ``main()`` only as far as its argparse call, with ``args``."""
    import argparse
    import importlib.util
    import sys

    source = path.read_text()
    if "argparse" not in source or "def main(" not in source:
        return  # reads sys.argv itself: existence is what can be checked
    parse, parse_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    inside = []  # parse_args calls parse_known_args, then refuses what is left

    def parse_then_stop(self, a=None, namespace=None):
        inside.append(1)
        try:
            parse(self, a, namespace)
        finally:
            inside.pop()
        raise _Parsed

    def known_then_stop(self, a=None, namespace=None):  # a script that hands the rest on (launch/demo.py)
        found = parse_known(self, a, namespace)
        if not inside:
            raise _Parsed
        return found

    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    argv, sys.argv = sys.argv, [str(path), *args]
    argparse.ArgumentParser.parse_args = parse_then_stop
    argparse.ArgumentParser.parse_known_args = known_then_stop
    try:
        module.main()
        raise AssertionError(f"{path.name} ran without parsing its flags")
    except _Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = parse
        argparse.ArgumentParser.parse_known_args = parse_known
        sys.argv = argv
        sys.modules.pop(spec.name, None)


def _check(argv: list[str]) -> None:
    prog = argv[0]
    if prog == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert all(t in targets for t in argv[1:]), f"no make target {argv[1:]} in Makefile ({targets})"
    elif prog == "sbatch":  # its run is tests/test_slurm.py's, with stand-ins for Slurm
        assert (ROOT / argv[1]).is_file(), f"README names {argv[1]}, which does not exist"
    elif prog == "torchrun":
        from torch.distributed.run import get_args_parser

        script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        get_args_parser().parse_args(argv[1:script + 1])
        _check(["python"] + argv[script:])
    elif prog == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        parse_args(argv[1:script + 1])
        _check(["python"] + argv[script:])
    elif prog == "scaletrain":
        from scaletrain.__main__ import build_parser

        if argv[1] in ("train", "convert"):  # handed on to launch/pretrain.py's and launch/convert.py's parsers
            return _check(["python", f"launch/{'pretrain' if argv[1] == 'train' else 'convert'}.py", *argv[2:]])
        if argv[1] == "estimate":  # its own flags, then the training flags
            from scaletrain.estimate import build_parser as estimate_parser

            _, rest = estimate_parser().parse_known_args(argv[2:])
            return _check_pretrain(rest)
        if argv[1] == "plot":
            from scaletrain.plot import build_parser as plot_parser

            return plot_parser().parse_args(argv[2:])
        build_parser().parse_args(argv[1:])
    elif prog == "python" and argv[1] == "launch/pretrain.py":
        _check_pretrain(argv[2:])
    elif prog == "python" and argv[1] == "launch/convert.py":
        import argparse

        from scaletrain.convert import add_convert_args

        p = argparse.ArgumentParser()
        add_convert_args(p)
        p.parse_args(argv[2:])
    elif prog == "python" and argv[1].startswith(("benchmarks/", "launch/")):
        assert (ROOT / argv[1]).is_file(), f"README names {argv[1]}, which does not exist"
        _check_script(ROOT / argv[1], argv[2:])
    else:
        raise AssertionError(f"no check for README command {' '.join(argv)}")


def test_readme_has_commands():
    cmds = readme_commands()
    assert cmds[0] == "make pretrain" and cmds[1] == "make test"  # the two first commands of README
    assert any(c.startswith("torchrun") for c in cmds) and any(c.startswith("deepspeed") for c in cmds)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_flags_are_accepted(command):
    if command.startswith("python -c"):
        return  # code, not flags: the run test below executes it
    try:
        _check(_plain(command))
    except SystemExit as e:  # argparse: an unknown flag or a bad value
        raise AssertionError(f"README command no longer parses: {command}") from e


def _run(commands: list[str], cwd: Path) -> list:
    """Each command as README writes it, in ``cwd``, shrunk by SCALETRAIN_SMOKE=1; placeholders as ``_plain``
    reads them (``...`` dropped: the defaults; ``[--opt a|b]`` run as ``--opt a``)."""
    import subprocess
    import sys

    from .conftest import clean_env

    env = clean_env(SCALETRAIN_SMOKE="1")
    outputs = []
    for command in commands:
        argv = shlex.split(command) if command.startswith("python -c") else _plain(command)  # first alternatives
        if argv[0] == "scaletrain":
            argv = [sys.executable, "-m", "scaletrain", *argv[1:]]
        elif argv[0] == "python":
            argv[0] = sys.executable
            if argv[1].startswith("launch/"):
                argv[1] = str(ROOT / argv[1])
        p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"README command failed: {command}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        outputs.append(p)
    return outputs


def test_the_first_hour_block_runs_as_written(tmp_path):
    """The first README block marked to be run, command by command, in a temporary folder, on a JSONL file of the
    user's kind, shrunk by SCALETRAIN_SMOKE=1: prepare, train to --stop-at-step, resume, convert, generate."""
    from scaletrain.data.sample import create_sample_pretraining_data

    raw = create_sample_pretraining_data(tmp_path / "sample", scale=0.02)
    lines = [x for f in sorted(Path(raw["general"]).glob("*.jsonl")) for x in f.read_text().splitlines() if x]
    (tmp_path / "my_corpus.jsonl").write_text("\n".join(lines) + "\n")
    commands = run_block(FIRST_HOUR)
    outputs = _run(commands, tmp_path)
    train, resume = (p for c, p in zip(commands, outputs) if "launch/pretrain.py" in c)
    assert "SCALETRAIN_SMOKE is set" in train.stderr and "stopped at step 2 (--stop-at-step)" in train.stdout
    assert "resumed from runs/mine/checkpoints/step_000002 at step 2" in resume.stdout
    assert (tmp_path / "exports" / "mine" / "model.safetensors").is_file()
    assert outputs[-1].stdout.startswith("The")  # the exported model generated text in transformers
    # what each step tells the user (issue 15): the header names data, schedule and destinations ...
    for p in (train, resume):
        assert "scaletrain: data data/mine (mine 1; packed rows; tokenizer byte-v1, vocab 258)" in p.stdout
        assert "scaletrain: checkpoints -> runs/mine/checkpoints, logs -> runs/mine" in p.stdout
        assert "scaletrain: schedule: lr warms up to 0.0003 over 1 step (the default: 1% of --max-steps" in p.stdout
    # ... and convert says what it read, what it wrote and how to load it
    convert = next(p for c, p in zip(commands, outputs) if "launch/convert.py" in c)
    assert "converting runs/mine/checkpoints/final: step 4, fsdp engine, saved by 1 rank" in convert.stdout
    steps = [json.loads(x)["step"] for x in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one run, one folder, one log: no step twice
    assert "load it with: AutoModelForCausalLM.from_pretrained('exports/mine')" in convert.stdout


def test_the_continued_pretraining_block_runs_as_written(tmp_path):
    """The second block marked to be run: a downloaded model's folder (a small Llama with a BPE tokenizer, saved
    here as models/Llama-3.2-1B), a .jsonl.zst corpus, prepare with the folder's tokenizer, train from it, a
    second phase from that checkpoint, export; the export loads in transformers with the tokenizer."""
    import json

    import zstandard
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from scaletrain.data.sample import create_sample_pretraining_data
    from scaletrain.data.tokenizer import train_bpe

    raw = create_sample_pretraining_data(tmp_path / "sample", scale=0.02)
    lines = [x for f in sorted(Path(raw["general"]).glob("*.jsonl")) for x in f.read_text().splitlines() if x]
    (tmp_path / "web.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    model_dir = tmp_path / "models" / "Llama-3.2-1B"
    (tmp_path / "web.jsonl").write_text("\n".join(lines) + "\n")
    _, vocab = train_bpe([str(tmp_path / "web.jsonl")], 400, str(model_dir / "tokenizer.json"))
    (tmp_path / "web.jsonl").unlink()
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, rope_theta=500000.0,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(model_dir))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    commands = run_block(CONTINUED)
    outputs = _run(commands, tmp_path)
    first, second = (p for c, p in zip(commands, outputs) if "launch/pretrain.py" in c)
    assert "weights from Hugging Face model models/Llama-3.2-1B (llama, safetensors)" in first.stdout
    assert "weights from scaletrain checkpoint checkpoints/cpt/final (step 4, fsdp engine, 1 rank(s))" in \
        second.stdout
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exports" / "cpt2"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "exports" / "cpt2"))
    assert back.config.max_position_embeddings == 512 and back.config.rope_parameters["rope_theta"] == 500000.0
    assert tok.convert_tokens_to_ids("<|endoftext|>") == back.config.eos_token_id


def test_the_one_process_block_runs_as_written(tmp_path):
    """Launching's first block: the sample shards (what `make pretrain` prepares) and synthetic tokens, one process
    each, no launcher."""
    from scaletrain.data.sample import prepare_sample

    prepare_sample(tmp_path / "data" / "sample", quiet=True)
    shards, synthetic = _run(run_block(ONE_PROCESS), tmp_path)
    assert "world 1" in shards.stdout and "scaletrain: data data/sample/pretraining (arxiv 0.3, general 0.7" in \
        shards.stdout
    assert "scaletrain: data synthetic tokens" in synthetic.stdout
    assert len(list((tmp_path / "runs").glob("*/checkpoints/final/COMPLETE.json"))) == 2  # a folder per run


def test_the_data_and_checkpoint_blocks_run_as_written(tmp_path):
    """Data's block (a tokenizer trained on corpus/, arxiv from a folder of papers and a .jsonl.zst with every
    bracketed option, the other domains from data/raw's sub-folders, the 30/70 mix trained), then the
    checkpoint block on the defaults it leaves (data/pretraining, arxiv and general): train, resume, convert."""
    import shutil

    import zstandard

    from scaletrain.data.sample import create_sample_pretraining_data

    raw = create_sample_pretraining_data(tmp_path / "sample", scale=0.02)
    general = [x for f in sorted(Path(raw["general"]).glob("*.jsonl")) for x in f.read_text().splitlines() if x]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "web.jsonl").write_text("\n".join(general) + "\n")
    shutil.copytree(raw["arxiv"], tmp_path / "papers", ignore=shutil.ignore_patterns("*.jsonl"))
    abstracts = (Path(raw["arxiv"]) / "abstracts.jsonl").read_bytes()
    (tmp_path / "more.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(abstracts))
    shutil.copytree(raw["general"], tmp_path / "data" / "raw" / "general")
    commands = run_block(DATA)
    tokenizer, arxiv, rest, train = _run(commands, tmp_path)
    assert "wrote tok.json (vocab" in tokenizer.stdout
    assert "--tokenizer" in commands[1] and "--add-bos" in commands[1] and "--latex-style text" in commands[1]
    for p, domain in ((arxiv, "arxiv"), (rest, "general")):
        assert f"{domain}: " in p.stderr and "documents" in p.stderr, p.stderr
    assert "scaletrain: data data/pretraining (arxiv 0.3, general 0.7" in train.stdout
    assert "packed rows; tokenizer tok.json, vocab " in train.stdout

    first, resumed, convert = _run(run_block(CHECKPOINTS), tmp_path)
    assert "checkpoints -> runs/big/checkpoints" in first.stdout
    assert "resumed from runs/big/checkpoints/final at step 4" in resumed.stdout, resumed.stdout
    assert "converting runs/big/checkpoints/final: step 4" in convert.stdout
    assert (tmp_path / "OUT_DIR" / "model.safetensors").is_file()


def test_train_tokenizer_reports_the_size_it_reached(tmp_path):
    import subprocess
    import sys

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join('{"text": "a small corpus, line %d"}\n' % i for i in range(50)))
    p = subprocess.run([sys.executable, "-m", "scaletrain", "train-tokenizer", "--input", str(corpus), "--vocab-size",
                        "32000", "--output", str(tmp_path / "tok.json")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(tmp_path / "tok.json")).get_vocab_size()
    assert size < 32000
    assert f"wrote {tmp_path / 'tok.json'} (vocab {size}; fewer than --vocab-size 32000: the corpus had no more " \
           f"merges" in p.stdout


def _gpu_session_commands(tmp_path: Path) -> dict[str, list[list[str]]]:
    """Each phase of benchmarks/gpu_session.sh -> the commands it runs, as the script expands them (its ``phase``
    replaced by one that prints them; nothing runs)."""
    import subprocess

    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    phases = re.search(r"^# Phases: (.*)$", script, flags=re.M).group(1).split()
    stub = 'phase() { shift 2; printf "%s\\0" "$@"; printf "\\n\\0"; }\n'
    text, n = re.subn(r"^phase\(\) \{.*?^\}\n", lambda m: stub, script, flags=re.M | re.S)
    text, m = re.subn(r"^\{ nvidia-smi.*$", "", text, flags=re.M)  # the device's description: none here
    assert n == m == 1, "gpu_session.sh changed its shape: update this test"
    (tmp_path / "session.sh").write_text(text)
    out = {}
    for phase in phases:
        done = subprocess.run(["bash", str(tmp_path / "session.sh"), phase], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "OUT": str(tmp_path / "out")}, timeout=60, check=True)
        out[phase] = [c.strip("\0").split("\0") for c in done.stdout.split("\n\0") if c.strip("\0")]
    return out


def test_every_gpu_session_command_parses(tmp_path):
    """A lent GPU is rare and short (15 minutes a session): a flag renamed since the script was written would spend
    its phase on an argparse error. Each command of each phase parses here, as README's commands do."""
    commands = _gpu_session_commands(tmp_path)
    assert set(commands) >= {"train", "engine_overhead", "tp_base", "e2e", "docmask", "memory", "loss"}
    for phase, cmds in commands.items():
        assert cmds, f"phase {phase} runs nothing"
        for argv in cmds:
            assert argv[0] == "python3", argv
            try:
                _check(["python", *argv[1:]])
            except SystemExit as e:
                raise AssertionError(f"gpu_session.sh phase {phase}: no longer parses: {' '.join(argv)}") from e
