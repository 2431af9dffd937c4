"""Small output files written whole or not at all."""

from __future__ import annotations

import os
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
