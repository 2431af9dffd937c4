"""Small output files written whole or not at all; the process and path facts the run's checks need."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def whole_or_absent(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` when the block ends, deleted when it fails,
    so a full disk or a kill never leaves a torn ``path`` (and never replaces a previous one with one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_writable(folder: Path) -> None:
    """Make ``folder`` (and its parents) and write a probe file in it: raises the OSError a later write would get,
    before the work whose output would go there (a run's checkpoints, hours of tokenizer training)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".probe-{os.getpid()}"
    probe.write_bytes(b"x")
    probe.unlink()


def hub_hint(given: str) -> str:
    """For a path that does not exist but reads like a Hugging Face Hub id (``meta-llama/Llama-3.2-1B``): the model's
    snapshot in the Hub's local cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``;
    the one ``refs/main`` names), or how to download it. scaletrain reads local folders only."""
    import re

    if Path(given).exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", given):
        return ""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    repo = Path(os.environ.get("HF_HUB_CACHE") or home / "hub") / f"models--{given.replace('/', '--')}"
    try:
        main = (repo / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    snapshots = [repo / "snapshots" / main] if main else sorted((repo / "snapshots").glob("*"))
    held = [s for s in snapshots if (s / "config.json").is_file() or (s / "tokenizer.json").is_file()]
    if held:
        return f"; {given} reads like a Hugging Face Hub id, and the Hub's cache here holds it: {held[-1]}"
    owner, name = given.split("/")
    if Path(owner).is_dir() or owner in ("models", "data", "runs", "exports", "checkpoints", "out", "output"):
        return ""  # a local path that is not there
    return (f"; {given} reads like a Hugging Face Hub id: scaletrain reads local folders, so download it first "
            f"(huggingface-cli download {given} --local-dir models/{name}) and give models/{name}")


def _start_ticks(pid: int | str) -> int:
    """Process ``pid``'s start in clock ticks since boot (Linux: /proc/PID/stat field 22)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def process_age(pid: int | str) -> float:
    """Seconds since process ``pid`` started. OSError (or ValueError) where there is no such process or no /proc."""
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - _start_ticks(pid) / os.sysconf("SC_CLK_TCK"))


def process_identity(pid: int | str) -> str | None:
    """Process ``pid`` told apart from any other that had or will have its number: this boot's id and the process's
    start tick (no wall clock, which NTP may move). None where that cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{_start_ticks(pid)}"
    except (OSError, ValueError, IndexError):
        return None


def read_text(path: Path, flag: str, error: type[Exception]) -> str:
    """A settings file the user gave with ``flag``, as UTF-8 text; one saved in another encoding (Notepad's UTF-16,
    Latin-1) raises ``error`` naming the flag, the file and the byte, not a UnicodeDecodeError traceback."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{flag}: {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
