"""Input files as streams of documents, in constant memory, in the formats corpora ship in: which files are
inputs, how each is cut into ``Task`` s and opened here; ``reader.py`` reads a task into documents.

===========================================  ====================================================================
``.jsonl`` / ``.json`` (+ ``.gz .zst .bz2``)  one JSON object a line, its ``--text-key`` string (C4, SlimPajama)
``.parquet``                                  the ``--text-key`` column, read a row group at a time (FineWeb, HF)
``.txt`` / ``.tex`` (+ ``.gz .zst .bz2``)      one document a file (``.tex`` cleaned, see ``latex.py``)
``.tar`` / ``.tar.gz`` / ``.tgz``              arXiv: a package of one paper's files, or a bulk tar of papers
                                              (members ``*.gz``: each a package or a gzipped single ``.tex``)
``.gz`` (any other)                            arXiv: one paper's source, a gzipped tar or a gzipped ``.tex``
===========================================  ====================================================================

Nothing is read whole: JSON lines and compressed streams go line by line, Parquet by record batches, tars member
by member (``tarfile``'s stream mode: never extracted, never a path on disk). One document is the unit held in
memory, and ``max_document_bytes`` caps it: a longer line, file, member or decompressed source is skipped and
counted (a decompression bomb cannot exhaust memory). Symlink and hardlink members of tars are skipped and counted.
Errors name ``file:line``, ``file:row`` or ``archive:member``.

A file is cut into ``Task`` s, the unit of parallel work: a plain ``.jsonl`` by byte ranges (a line belongs to the
range its first byte is in), a ``.parquet`` by row groups, anything else whole. The cut depends on the files only,
never on the number of workers, so the concatenated output is the same for any worker count.
"""

from __future__ import annotations

import bz2
import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from scaletrain.errors import ScaletrainError

CODECS = (".gz", ".zst", ".bz2")
TASK_BYTES = 64 << 20  # a plain JSONL file is cut every 64 MiB; Parquet row groups are grouped to about this size


class InputError(ScaletrainError):
    """Bad input text: the message names the file (and line, row or member) and what would be right."""


@dataclass(frozen=True)
class Task:
    path: str
    kind: str  # jsonl, txt, tex, parquet, tar, gz-source
    codec: str | None = None  # .gz/.zst/.bz2 around a jsonl/txt/tex
    start: int = 0  # byte offset (plain jsonl) or first row group (parquet)
    end: int = -1  # end byte offset / row group (exclusive); -1: to the end


def kind_of(path: Path) -> tuple[str, str | None] | None:
    """(kind, codec) from the name, or None for a file that is not an input."""
    name = path.name.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar", None
    if name.endswith(".parquet"):
        return "parquet", None
    codec = next((c for c in CODECS if name.endswith(c)), None)
    stem = name[: -len(codec)] if codec else name
    for suffix, kind in ((".jsonl", "jsonl"), (".json", "jsonl"), (".txt", "txt"), (".tex", "tex")):
        if stem.endswith(suffix):
            return kind, codec
    return ("gz-source", None) if codec == ".gz" else None


SUFFIXES_HELP = ".jsonl/.json/.txt/.tex (optionally .gz/.zst/.bz2), .parquet, .tar/.tar.gz/.tgz or arXiv .gz"


def tasks_for(path: Path) -> list[Task]:
    kind, codec = kind_of(path)
    if kind == "jsonl" and codec is None:
        size = path.stat().st_size
        return [Task(str(path), kind, None, a, min(a + TASK_BYTES, size)) for a in range(0, max(size, 1), TASK_BYTES)]
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError kinds
            raise InputError(f"{path}: not a readable Parquet file ({e})") from e
        tasks, first, size = [], 0, 0
        for g in range(meta.num_row_groups):
            size += meta.row_group(g).total_byte_size
            if size >= TASK_BYTES or g == meta.num_row_groups - 1:
                tasks.append(Task(str(path), kind, None, first, g + 1))
                first, size = g + 1, 0
        return tasks or [Task(str(path), kind, None, 0, 0)]
    return [Task(str(path), kind, codec)]


def open_stream(path: str, codec: str | None) -> BinaryIO:
    """The file's bytes, decompressed on the fly."""
    if codec == ".gz":
        return gzip.open(path, "rb")
    if codec == ".bz2":
        return bz2.open(path, "rb")
    if codec == ".zst":
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                                           closefd=True))
    return open(path, "rb")


def read_capped(f: BinaryIO, cap: int) -> bytes | None:
    """All of ``f`` if it holds at most ``cap`` bytes, else None (having read at most cap + 1)."""
    data = f.read(cap + 1)
    return None if len(data) > cap else data


def _walk(folder: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    """Every file under ``folder``, following symlinked folders once each (a link back up is reported, not
    followed); files that are not inputs are reported in ``skipped`` with the reason."""
    found: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop, or a second link to a folder already read
            skipped.append((root, f"a link to {real}, already read"))
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):
            f = Path(root) / name
            if not f.is_file():
                skipped.append((str(f), "a broken link or not a regular file"))
            elif kind_of(f) is None:
                skipped.append((str(f), f"not a {SUFFIXES_HELP} file"))
            else:
                found.append(f)
    return found


def list_inputs(inputs: list[str], skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Input files in a fixed (sorted) order; folders are searched recursively (symlinked folders too). Every file
    found is read or listed in ``skipped`` with its reason."""
    skipped = skipped if skipped is not None else []
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = _walk(p, skipped)
            if not found:
                raise InputError(f"--input: folder {item} holds no {SUFFIXES_HELP} files")
            files.extend(found)
        elif p.is_file():
            if kind_of(p) is None:
                raise InputError(f"--input: {item} is not a {SUFFIXES_HELP} file")
            files.append(p)
        else:
            raise InputError(f"--input: {item} does not exist")
    return files
