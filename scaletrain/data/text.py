"""Input documents, read one after another: the serial face of ``sources.py`` (formats, caps, error messages)
and ``latex.py`` (LaTeX cleaning). ``prepare`` reads the same tasks in parallel (``encode.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from .reader import Document, Reader, ReadOptions, ReadStats
from .sources import InputError, Task, list_inputs, tasks_for

__all__ = ["Document", "InputError", "ReadOptions", "ReadStats", "iter_documents", "list_inputs", "plan_tasks"]


def _tasks(path: Path, opts: ReadOptions | None = None) -> list[Task]:
    try:
        return tasks_for(path, separated=bool(opts and opts.document_separator))
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}); was it moved or deleted while preparing?") from e


def plan_tasks(inputs: Sequence[str | Path], skipped: list[tuple[str, str]],
               opts: ReadOptions | None = None) -> list[Task]:
    """Every input file cut into tasks, in input order (folders sorted)."""
    return [t for path in list_inputs([str(i) for i in inputs], skipped) for t in _tasks(path, opts)]


def iter_documents(inputs: Sequence[str | Path], skip_bad_lines: bool = False, stats: ReadStats | None = None,
                   opts: ReadOptions | None = None) -> Iterator[Document]:
    opts = opts if opts is not None else ReadOptions(skip_bad_lines=skip_bad_lines)
    reader = Reader(opts, stats)
    for path in list_inputs([str(i) for i in inputs], reader.stats.skipped_files):
        for task in _tasks(path, opts):  # listed lazily: a file deleted after the walk is named when reached
            yield from reader.read(task)
