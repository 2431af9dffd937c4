"""Input files as streams of documents, in constant memory, in the formats corpora ship in: which files are
inputs, how each is cut into ``Task`` s and opened here; ``reader.py`` reads a task into documents.

================================================  ===================================================================
``.jsonl`` / ``.json`` (+ ``.gz .zst .bz2 .xz``)  one JSON object a line, its ``--text-key`` string (C4, SlimPajama)
``.parquet``                                      the ``--text-key`` column, read a row group at a time (FineWeb, HF)
``.arrow``                                        the ``--text-key`` column, a record batch at a time: Hugging Face
                                                  ``datasets`` folders (``save_to_disk``, its cache), Arrow IPC files
``.txt`` / ``.tex`` (+ ``.gz .zst .bz2 .xz``)     one document a file (``.tex`` cleaned, see ``latex.py``), or a
                                                  ``.txt`` of many ended by ``--document-separator`` (TinyStories)
``.tar`` / ``.tar.gz`` / ``.tgz``                 arXiv: a package of one paper's files, or a bulk tar of papers
                                                  (members ``*.gz``: each a package or a gzipped single ``.tex``)
``.gz`` (any other)                               arXiv: one paper's source, a gzipped tar or a gzipped ``.tex``
================================================  ===================================================================

Nothing is read whole: JSON lines and compressed streams go line by line, Parquet and Arrow by record batches
(Arrow memory-mapped), tars member by member (``tarfile``'s stream mode: never extracted, never a path on disk).
One document is the unit held in memory, and ``max_document_bytes`` caps it: a longer line, file, member or
decompressed source is skipped and counted (a decompression bomb cannot exhaust memory). Symlink and hardlink
members of tars are skipped and counted.
Errors name ``file:line``, ``file:row`` or ``archive:member``.

A file is cut into ``Task`` s, the unit of parallel work: a plain ``.jsonl`` by byte ranges (a line belongs to the
range its first byte is in; a plain ``.txt`` of separated documents likewise), a ``.parquet`` by row groups, an
``.arrow`` by record batches, anything else whole. The cut depends on the files only, never on the number of
workers, so the concatenated output is the same for any worker count.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from scaletrain.errors import ScaletrainError

CODECS = (".gz", ".zst", ".bz2", ".xz")
TASK_BYTES = 64 << 20  # a plain JSONL file is cut every 64 MiB; Parquet row groups are grouped to about this size


class InputError(ScaletrainError):
    """Bad input text: the message names the file (and line, row or member) and what would be right."""


@dataclass(frozen=True)
class Task:
    path: str
    kind: str  # jsonl, txt, txt-docs, tex, parquet, arrow, tar, gz-source
    codec: str | None = None  # .gz/.zst/.bz2/.xz around a jsonl/txt/tex
    start: int = 0  # byte offset (plain jsonl), first row group (parquet) or first record batch (arrow)
    end: int = -1  # end byte offset / row group / record batch (exclusive); -1: to the end
    val: bool = False  # every document is validation (prepare --val-input)


def kind_of(path: Path) -> tuple[str, str | None] | None:
    """(kind, codec) from the name, or None for a file that is not an input."""
    name = path.name.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar", None
    if name.endswith(".parquet"):
        return "parquet", None
    if name.endswith(".arrow"):
        return "arrow", None
    codec = next((c for c in CODECS if name.endswith(c)), None)
    stem = name[: -len(codec)] if codec else name
    for suffix, kind in ((".jsonl", "jsonl"), (".json", "jsonl"), (".txt", "txt"), (".tex", "tex")):
        if stem.endswith(suffix):
            return kind, codec
    return ("gz-source", None) if codec == ".gz" else None


SUFFIXES_HELP = (".jsonl/.json/.txt/.tex (optionally .gz/.zst/.bz2/.xz), .parquet, .arrow, .tar/.tar.gz/.tgz or "
                 "arXiv .gz")
# What the datasets library writes beside its .arrow files (save_to_disk, its cache): not documents
HF_DATASETS_METADATA = ("dataset_info.json", "state.json")
HF_DATASET_DICT = "dataset_dict.json"  # a DatasetDict's save_to_disk folder: one sub-folder per split
EVAL_SPLITS = ("test", "validation", "valid", "val", "dev")
_EVAL_SKIP = ("an evaluation split of the dataset by its name ({}): held out, not trained on (give it as --val-input "
              "to validate on it, or as an --input of its own to train on it)")


def eval_split(name: str) -> str | None:
    """The evaluation split a file or folder name marks, in the layouts corpora ship in: ``test/`` and
    ``validation/`` (SlimPajama), ``val.jsonl.zst`` (the Pile), ``test-00000-of-00001.parquet`` (Hugging Face
    snapshots), ``c4-validation.00000-of-00008.json.gz`` (C4); None for any other name."""
    return next((t for t in re.split(r"[-_.]", name.lower()) if t in EVAL_SPLITS), None)


def tasks_for(path: Path, separated: bool = False) -> list[Task]:
    """``separated``: text files hold many documents (``--document-separator``), cut like JSON lines."""
    kind, codec = kind_of(path)
    if kind == "txt" and separated:
        kind = "txt-docs"
    if kind in ("jsonl", "txt-docs") and codec is None:
        size = path.stat().st_size
        return [Task(str(path), kind, None, a, min(a + TASK_BYTES, size)) for a in range(0, max(size, 1), TASK_BYTES)]
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError kinds
            raise InputError(f"{path}: not a readable Parquet file ({e})") from e
        sizes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
        return _grouped(str(path), kind, sizes) or [Task(str(path), kind, None, 0, 0)]
    if kind == "arrow":
        try:
            sizes = [b.nbytes for b in arrow_batches(path)]  # memory-mapped: reads batch headers, copies no data
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except (ValueError, OSError) as e:  # pyarrow: ArrowInvalid, or an OSError for a cut-off file
            raise InputError(f"{path}: corrupt or truncated arrow data ({e}); replace the file or remove it from "
                             f"the input") from e
        return _grouped(str(path), kind, sizes) or [Task(str(path), kind, None, 0, 0)]
    return [Task(str(path), kind, codec)]


def _grouped(path: str, kind: str, sizes: list[int]) -> list[Task]:
    """Consecutive parts (row groups, record batches) of ``sizes`` bytes grouped into tasks of about TASK_BYTES."""
    tasks, first, size = [], 0, 0
    for g, n in enumerate(sizes):
        size += n
        if size >= TASK_BYTES or g == len(sizes) - 1:
            tasks.append(Task(path, kind, None, first, g + 1))
            first, size = g + 1, 0
    return tasks


def arrow_batches(path: str | Path):
    """The record batches of an Arrow IPC file, memory-mapped (zero-copy): the streaming format the datasets
    library writes (``data-00000-of-00004.arrow``) or the random-access file format (``ARROW1`` magic)."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path), "r")
        if source.read(6) == b"ARROW1":
            reader = pa.ipc.open_file(source)
            return (reader.get_batch(i) for i in range(reader.num_record_batches))
        source.seek(0)
        return iter(pa.ipc.open_stream(source))
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a readable Arrow IPC file ({e})") from e


def open_stream(path: str, codec: str | None) -> BinaryIO:
    """The file's bytes, decompressed on the fly."""
    if codec == ".gz":
        return gzip.open(path, "rb")
    if codec == ".bz2":
        return bz2.open(path, "rb")
    if codec == ".xz":
        return lzma.open(path, "rb")
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


def _walk(folder: Path, skipped: list[tuple[str, str]], leave_out_eval: bool = True) -> list[Path]:
    """Every file under ``folder``, following symlinked folders once each (a link back up is reported, not
    followed); files that are not inputs are reported in ``skipped`` with the reason. Below ``folder``, files and
    folders named as a dataset's evaluation split are skipped (and reported): a downloaded corpus often ships its
    validation and test splits beside the training one, and training on them makes every later evaluation on them
    meaningless."""
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
        if HF_DATASET_DICT in files:  # every split would be read into one domain, validation and test too
            raise InputError(f"{root} is a Hugging Face DatasetDict (save_to_disk) whose splits are its sub-folders "
                             f"({', '.join(dirs)}): give the folder of the split to train on, e.g. --input "
                             f"{Path(root) / ('train' if 'train' in dirs or not dirs else dirs[0])}")
        for d in [d for d in dirs if leave_out_eval and eval_split(d)]:
            skipped.append((os.path.join(root, d), _EVAL_SKIP.format(eval_split(d))))
            dirs.remove(d)
        for d in [d for d in dirs if d.startswith(".")]:  # one line, not one per file of a tool's cache
            skipped.append((os.path.join(root, d), "a hidden folder: tools' own files (.git, .cache/huggingface "
                                                   "of a snapshot download), not read"))
            dirs.remove(d)
        arrow = any(kind_of(Path(name)) == ("arrow", None) for name in files)
        for name in sorted(files):
            f = Path(root) / name
            if arrow and name in HF_DATASETS_METADATA:
                skipped.append((str(f), "the datasets library's metadata of the .arrow files beside it"))
            elif not f.is_file():
                skipped.append((str(f), "a broken link or not a regular file"))
            elif kind_of(f) is None:
                skipped.append((str(f), f"not a {SUFFIXES_HELP} file"))
            elif leave_out_eval and eval_split(name):
                skipped.append((str(f), _EVAL_SKIP.format(eval_split(name))))
            else:
                found.append(f)
    return found


def list_inputs(inputs: list[str], skipped: list[tuple[str, str]] | None = None,
                leave_out_eval: bool = True) -> list[Path]:
    """Input files in a fixed (sorted) order; folders are searched recursively (symlinked folders too). Every file
    found is read or listed in ``skipped`` with its reason."""
    skipped = skipped if skipped is not None else []
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            before = len(skipped)
            found = _walk(p, skipped, leave_out_eval)
            splits = [f for f, why in skipped[before:] if why.startswith("an evaluation split")]
            if not found and splits:
                raise InputError(f"--input: folder {item} holds only evaluation splits ({', '.join(splits[:3])}), "
                                 f"which a folder's walk leaves out; give them as inputs of their own to train on "
                                 f"them")
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
