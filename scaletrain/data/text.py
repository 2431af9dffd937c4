"""Input documents, read one after another: the serial face of ``sources.py`` (formats, caps, error messages)
and ``latex.py`` (LaTeX cleaning). ``prepare`` reads the same tasks in parallel (``encode.py``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Iterator, Sequence

from .latex import STYLES
from .reader import Document, Reader, ReadOptions, ReadStats
from .sources import InputError, Task, list_inputs, tasks_for

__all__ = ["Document", "InputError", "ReadOptions", "ReadStats", "add_reading_args", "iter_documents", "list_inputs",
           "plan_tasks", "reading_options"]


def _tasks(path: Path, opts: ReadOptions | None = None) -> list[Task]:
    try:
        return tasks_for(path, separated=bool(opts and opts.document_separator))
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}); was it moved or deleted while preparing?") from e


def plan_tasks(inputs: Sequence[str | Path], skipped: list[tuple[str, str]],
               opts: ReadOptions | None = None, leave_out_eval: bool = True) -> list[Task]:
    """Every input file cut into tasks, in input order (folders sorted); ``leave_out_eval``: below a folder, files
    and folders named as an evaluation split are left out (validation inputs keep them)."""
    return [t for path in list_inputs([str(i) for i in inputs], skipped, leave_out_eval) for t in _tasks(path, opts)]


def iter_documents(inputs: Sequence[str | Path], skip_bad_lines: bool = False, stats: ReadStats | None = None,
                   opts: ReadOptions | None = None) -> Iterator[Document]:
    opts = opts if opts is not None else ReadOptions(skip_bad_lines=skip_bad_lines)
    reader = Reader(opts, stats)
    for path in list_inputs([str(i) for i in inputs], reader.stats.skipped_files):
        for task in _tasks(path, opts):  # listed lazily: a file deleted after the walk is named when reached
            yield from reader.read(task)


def add_reading_args(p: argparse.ArgumentParser) -> None:
    """How documents are read from the inputs: the options ``prepare`` and ``train-tokenizer`` share."""
    p.add_argument("--text-key", default="text", metavar="KEY",
                   help="the text field of JSON lines and the text column of Parquet and Arrow files (default: text)")
    p.add_argument("--latex-style", default="source", choices=STYLES,
                   help="source: the paper body as LaTeX (RedPajama/proof-pile-2 recipe: comments, preamble and "
                        "bibliography dropped, the paper's own argument-free macros expanded); text: reading text "
                        "with all math kept verbatim (default: source)")
    p.add_argument("--max-document-bytes", type=int, default=1 << 30, metavar="BYTES",
                   help="skip (and count) any document, line, archive member or decompressed source larger than "
                        "this (default: 1 GiB)")
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed JSONL lines")
    p.add_argument("--document-separator", metavar="SEP",
                   help="a .txt file holds many documents, each ended by SEP (TinyStories: '<|endoftext|>'; "
                        "'\\n' for one a line, '\\n\\n' for one a paragraph); default: one document a file")


def reading_options(args: argparse.Namespace) -> ReadOptions:
    return ReadOptions(args.text_key, args.latex_style, args.skip_bad_lines, args.max_document_bytes,
                       _unescape(args.document_separator))


def _unescape(text: str | None) -> str | None:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` typed in a flag, as the characters (a newline is awkward to type)."""
    if text is None:
        return None
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)
