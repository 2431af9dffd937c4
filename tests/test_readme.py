"""README.md's command lines stay true: every flag of every scaletrain, launcher and make command in its code
blocks is accepted by the parser that will read it (a flag renamed in the code, or mistyped in README, fails
here). Placeholders are kept readable in README: ``...`` is dropped, ``[--opt a|b]`` is read as ``--opt a``, a
shell variable as 0. Benchmarks run as far as their argparse call. Running the CPU commands themselves,
shrunk, is the rest of issue 15 item 1."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("python", "scaletrain", "torchrun", "deepspeed", "make")


def readme_commands() -> list[str]:
    """Command lines of README.md's indented code blocks (continuations joined, comments dropped)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    commands, current = [], ""
    for line in lines:
        if not line.startswith("    ") or line.startswith("     ") and not current:
            current = ""
            continue
        text = line.strip()
        if current:
            current += " " + text
        elif text.split(" ", 1)[0] in PROGRAMS:
            current = text
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        commands.append(re.sub(r"\s+#.*$", "", current).strip())
        current = ""
    return commands


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
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, a=None, namespace=None):
        parse(self, a, namespace)
        raise _Parsed

    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv, sys.argv = sys.argv, [str(path), *args]
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        module.main()
        raise AssertionError(f"{path.name} ran without parsing its flags")
    except _Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = parse
        sys.argv = argv


def _check(argv: list[str]) -> None:
    prog = argv[0]
    if prog == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert all(t in targets for t in argv[1:]), f"no make target {argv[1:]} in Makefile ({targets})"
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
    try:
        _check(_plain(command))
    except SystemExit as e:  # argparse: an unknown flag or a bad value
        raise AssertionError(f"README command no longer parses: {command}") from e
