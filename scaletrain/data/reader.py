"""Reading a ``Task`` of an input file (``sources.py``) into documents: JSON lines, Parquet and Arrow rows, text
and LaTeX files, arXiv packages and tars, each document capped at ``max_document_bytes`` and counted in ``ReadStats``;
bad input names ``file:line``, ``file:row`` or ``archive:member``."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import tarfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import BinaryIO, Iterator

from .latex import STYLES, clean_latex
from .latex_package import clean_package
from .sources import InputError, Task, arrow_batches, open_stream, read_capped

_BOM = "\ufeff"
NEWLINE = b"\n"
_READ_BYTES = 1 << 20  # separated text files are read in pieces of this size


@dataclass
class ReadOptions:
    text_key: str = "text"
    latex_style: str = "source"
    skip_bad_lines: bool = False
    max_document_bytes: int = 1 << 30
    document_separator: str | None = None  # .txt: documents end at this string (TinyStories' <|endoftext|>)


@dataclass
class ReadStats:
    """What reading found and dropped; summed over tasks (and workers)."""

    documents: int = 0
    bad_lines: int = 0
    empty: int = 0
    oversize: int = 0  # documents over max_document_bytes, skipped
    link_members: int = 0  # symlink/hardlink tar members, skipped
    binary_members: int = 0  # archive members with NUL bytes, skipped
    no_main_file: int = 0  # LaTeX packages without a \documentclass file, skipped
    latex_degraded: int = 0  # documents that did not parse strictly, cleaned from a tolerant parse
    latex_latin1: int = 0  # LaTeX sources that were not UTF-8, read as Latin-1
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (file, why) for files found but not read

    def add(self, other: ReadStats) -> None:
        for f in fields(self):
            if f.name != "skipped_files":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.skipped_files.extend(other.skipped_files)

    def dropped(self) -> dict[str, int]:
        """The counts a manifest records (documents and skipped files aside)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("documents", "skipped_files")}


@dataclass
class Document:
    text: str
    source: str  # file[:line], file:row or archive:member


def _decode(data: bytes, where: str, line: bool = False) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = "" if line else f":{data.count(NEWLINE, 0, e.start) + 1}"
        raise InputError(f"{where}{at}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}"
                         f"{' of the line' if line else ''}); convert the file to UTF-8") from e


def _decode_latex(data: bytes, stats: ReadStats) -> str:
    """LaTeX predates UTF-8 (``\\usepackage[latin1]{inputenc}`` is common on arXiv): Latin-1 when not UTF-8."""
    try:
        return data.decode("utf-8").removeprefix(_BOM)
    except UnicodeDecodeError:
        stats.latex_latin1 += 1
        return data.decode("latin-1")


class Reader:
    """Reads tasks into documents; one per process (it carries the options and counts)."""

    def __init__(self, opts: ReadOptions, stats: ReadStats | None = None) -> None:
        if opts.latex_style not in STYLES:
            raise InputError(f"--latex-style {opts.latex_style}: choose one of {', '.join(STYLES)}")
        if opts.max_document_bytes <= 0:
            raise InputError(f"--max-document-bytes {opts.max_document_bytes}: must be positive")
        self.opts = opts
        self.stats = stats if stats is not None else ReadStats()

    def read(self, task: Task) -> Iterator[Document]:
        try:
            yield from getattr(self, "_" + task.kind.replace("-", "_"))(task)
        except InputError:
            raise
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:  # one line naming the file
            raise InputError(f"{task.path}: cannot read ({e.strerror or e}); was it moved or deleted while "
                             f"preparing?") from e
        except _corrupt_errors() as e:  # gzip/bz2/zstd/tar/Parquet decoders on damaged bytes
            raise InputError(f"{task.path}: corrupt or truncated {task.kind if task.codec is None else task.codec} "
                             f"data ({type(e).__name__}: {e}); replace the file or remove it from the input") from e

    def _emit(self, text: str, source: str) -> Iterator[Document]:
        if text.strip():
            self.stats.documents += 1
            yield Document(text, source)
        else:
            self.stats.empty += 1

    # ---- one document a line ----
    def _jsonl(self, task: Task) -> Iterator[Document]:
        """Lines end at \\n only: U+2028, U+0085, \\x0b or \\x0c inside a line are text (``json.dumps(
        ensure_ascii=False)`` writes them); \\r\\n endings are accepted."""
        cap, key = self.opts.max_document_bytes, self.opts.text_key
        content = False
        with open_stream(task.path, task.codec) as f:
            pos = task.start
            if task.start:
                f.seek(task.start - 1)  # a line starting exactly at start belongs to this task
                pos = task.start - 1 + len(f.readline())
            while task.end < 0 or pos < task.end:
                raw = f.readline(cap + 2)
                if not raw:
                    break
                line_start, pos = pos, pos + len(raw)
                if len(raw) > cap + 1 or (len(raw) == cap + 2 and not raw.endswith(b"\n")):
                    while raw and not raw.endswith(b"\n"):  # the rest of an over-long line, not kept
                        raw = f.readline(1 << 20)
                        pos += len(raw)
                    self.stats.oversize += 1
                    content = True
                    continue
                raw = raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw.rstrip(b"\r")
                if not raw.strip():
                    continue
                if not content and task.start == 0 and raw.lstrip().lstrip(_BOM.encode())[:1] == b"[":
                    raise InputError(f"{task.path}: one JSON array, not JSON lines (an object a line); convert it, "
                                     f"e.g. jq -c '.[]' {task.path} > {Path(task.path).name.split('.')[0]}.jsonl")
                content = True
                text = self._json_text(raw, task, line_start, key)
                if text is not None:
                    yield from self._emit(text, f"{task.path} byte {line_start}")
        if not content and task.start == 0 and (task.end < 0 or _whole(task)):
            raise InputError(f"{task.path}: file is empty (no documents); remove it from the input")

    def _json_text(self, raw: bytes, task: Task, offset: int, key: str) -> str | None:
        try:
            line = raw.decode("utf-8")
            if offset == 0:
                line = line.removeprefix(_BOM)
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise ValueError(f"expected an object with a string {json.dumps(key)} field"
                                 + (f" (--text-key; this line has {sorted(obj)[:8]})" if isinstance(obj, dict)
                                    else ""))
            return obj[key]
        except ValueError as e:  # UnicodeDecodeError is a ValueError: bad UTF-8 is a bad line too
            if self.opts.skip_bad_lines:
                self.stats.bad_lines += 1
                return None
            where = f"{task.path}:{_line_number(task, offset)}"
            if isinstance(e, UnicodeDecodeError):
                raise InputError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start} of the "
                                 f"line); convert the file to UTF-8 or pass --skip-bad-lines") from e
            raise InputError(f"{where}: malformed JSONL line ({e}); fix it or pass --skip-bad-lines") from e

    # ---- one document a file ----
    def _whole_file(self, task: Task) -> bytes | None:
        with open_stream(task.path, task.codec) as f:
            data = read_capped(f, self.opts.max_document_bytes)
        if data is None:
            self.stats.oversize += 1
            return None
        if b"\x00" in data:
            raise InputError(f"{task.path}: binary data (a NUL byte at offset {data.index(0)}), not text; "
                             f"remove it from the input")
        if not data.strip():
            raise InputError(f"{task.path}: file is empty (no documents); remove it from the input")
        return data

    def _txt(self, task: Task) -> Iterator[Document]:
        data = self._whole_file(task)
        if data is not None:
            yield from self._emit(_decode(data, task.path).removeprefix(_BOM).strip(), task.path)

    def _txt_docs(self, task: Task) -> Iterator[Document]:
        """A text file of many documents, each ending at --document-separator (a byte range of a plain file, or
        the whole of a compressed one): the documents whose first byte lies in the range, streamed in 1 MiB reads
        with at most one document (capped) in memory."""
        sep = self.opts.document_separator.encode("utf-8")
        content = False
        with open_stream(task.path, task.codec) as f:
            first = max(0, task.start - len(sep))  # a separator ending exactly at start opens this range's first
            if first:
                f.seek(first)  # a plain file's range (compressed streams are read whole)
            for start, data in _pieces(f, sep, first, self.opts.max_document_bytes):
                if task.start and start < task.start:
                    continue  # the tail of the previous range's last document
                if task.end >= 0 and start >= task.end:
                    break
                if data is None:
                    self.stats.oversize += 1
                    content = True
                    continue
                text = _decode(data, f"{task.path} byte {start}").removeprefix(_BOM if start == 0 else "").strip()
                content = content or bool(text)
                if text:
                    yield from self._emit(text, f"{task.path} byte {start}")
        if not content and task.start == 0 and (task.end < 0 or _whole(task)):
            raise InputError(f"{task.path}: file is empty (no documents); remove it from the input")

    def _tex(self, task: Task) -> Iterator[Document]:
        data = self._whole_file(task)
        if data is not None:
            yield from self._latex(clean_latex(_decode_latex(data, self.stats), self.opts.latex_style), task.path)

    def _latex(self, result, source: str) -> Iterator[Document]:
        if result is None:
            self.stats.no_main_file += 1
            return
        self.stats.latex_degraded += result.degraded
        yield from self._emit(result.text, source)

    # ---- Parquet ----
    def _parquet(self, task: Task) -> Iterator[Document]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(task.path)
        self._text_column(pf.schema_arrow, task.path)
        row = sum(pf.metadata.row_group(g).num_rows for g in range(task.start))
        groups = list(range(task.start, task.end))
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=[self.opts.text_key]):
            yield from self._rows(batch.column(0), task.path, row)
            row += batch.num_rows

    # ---- Arrow (Hugging Face datasets) ----
    def _arrow(self, task: Task) -> Iterator[Document]:
        row = 0
        for i, batch in enumerate(arrow_batches(task.path)):
            if i == 0:
                self._text_column(batch.schema, task.path)
            if i >= task.end:
                break
            if i >= task.start:
                yield from self._rows(batch.column(self.opts.text_key), task.path, row)
            row += batch.num_rows

    def _text_column(self, schema, path: str) -> None:
        """The --text-key column must exist and hold strings."""
        import pyarrow as pa

        key, names = self.opts.text_key, schema.names
        if key not in names:
            raise InputError(f"{path}: no column {key!r} (--text-key); its columns are {names}")
        kind = schema.field(key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputError(f"{path}: column {key!r} holds {kind}, not text; choose a string column "
                             f"with --text-key (columns: {names})")

    def _rows(self, column, path: str, row: int) -> Iterator[Document]:
        """One document per value of a string column whose first value is row ``row + 1`` of the file."""
        cap = self.opts.max_document_bytes
        for text in column.to_pylist():
            row += 1
            if text is None:
                self.stats.empty += 1
            elif len(text) * 4 > cap and len(text.encode("utf-8")) > cap:
                self.stats.oversize += 1
            else:
                yield from self._emit(text, f"{path}:row {row}")

    # ---- arXiv sources ----
    def _gz_source(self, task: Task) -> Iterator[Document]:
        with open(task.path, "rb") as f:
            yield from self._source_bytes(f.read(self.opts.max_document_bytes + 1), task.path)

    def _source_bytes(self, gz: bytes, where: str, depth: int = 0) -> Iterator[Document]:
        """One paper's gzipped source (a tar of files, or a single .tex), decompressed under the cap."""
        if len(gz) > self.opts.max_document_bytes:
            self.stats.oversize += 1
            return
        with gzip.GzipFile(fileobj=io.BytesIO(gz)) as f:
            data = read_capped(f, self.opts.max_document_bytes)
        if data is None:
            self.stats.oversize += 1
            return
        if len(data) > 262 and data[257:262] == b"ustar":
            yield from self._package(tarfile.open(fileobj=io.BytesIO(data), mode="r:"), where, depth)
        elif b"\x00" in data:
            self.stats.binary_members += 1
        else:
            yield from self._latex(clean_latex(_decode_latex(data, self.stats), self.opts.latex_style), where)

    def _tar(self, task: Task) -> Iterator[Document]:
        with tarfile.open(task.path, mode="r|*") as tf:
            yield from self._package(tf, task.path)

    def _package(self, tf: tarfile.TarFile, where: str, depth: int = 0) -> Iterator[Document]:
        """Members ``*.gz`` are papers of their own (arXiv's bulk tars; one level only, so a gzip nested in
        itself cannot recurse); loose ``.tex`` members are one paper."""
        cap, files, total = self.opts.max_document_bytes, {}, 0
        for m in tf:
            name = m.name.removeprefix("./")
            if m.issym() or m.islnk():
                self.stats.link_members += 1
                continue
            if not m.isfile():
                continue
            lower = name.lower()
            if not lower.endswith((".gz", ".tgz", ".tex")) or (depth and not lower.endswith(".tex")):
                continue  # figures, styles, bibliographies
            if m.size > cap:
                self.stats.oversize += 1
                continue
            data = tf.extractfile(m).read()  # a stream read of this member only, nothing on disk
            if lower.endswith((".gz", ".tgz")):
                yield from self._source_bytes(data, f"{where}:{name}", depth + 1)
            elif b"\x00" in data:
                self.stats.binary_members += 1
            elif total + len(data) > cap:
                self.stats.oversize += 1
            else:
                files[name] = _decode_latex(data, self.stats)
                total += len(data)
        if files:
            yield from self._latex(clean_package(files, self.opts.latex_style), where)


def _pieces(f: BinaryIO, sep: bytes, offset: int, cap: int) -> Iterator[tuple[int, bytes | None]]:
    """(file offset, bytes) of each piece of ``f`` between separators, from ``offset`` (where ``f`` stands) to the
    end, as ``bytes.split(sep)`` gives them; None for a piece over ``cap`` bytes (never held whole)."""
    buf, base, start, over, scan = bytearray(), offset, offset, False, 0  # base: the file offset of buf[0]
    while True:
        i = buf.find(sep, scan)
        if i >= 0:
            yield start, None if over or i > cap else bytes(buf[:i])
            base += i + len(sep)
            del buf[:i + len(sep)]
            start, over, scan = base, False, 0
            continue
        chunk = f.read(_READ_BYTES)
        if not chunk:
            yield start, None if over else bytes(buf)
            return
        scan = max(0, len(buf) - len(sep) + 1)
        buf += chunk
        if buf.find(sep, scan) < 0 and len(buf) > cap + len(sep):  # no end in sight: keep only a separator's start
            over, drop = True, len(buf) - len(sep) + 1
            base += drop
            del buf[:drop]
            scan = 0


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    import zlib

    import zstandard

    return (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError, zstandard.ZstdError, ValueError)


def _whole(task: Task) -> bool:
    return task.end == Path(task.path).stat().st_size


def _line_number(task: Task, offset: int) -> int:
    """The 1-based line at ``offset`` (counted only when a message needs it)."""
    n = 1
    with open_stream(task.path, task.codec) as f:
        left = offset
        while left > 0:
            block = f.read(min(left, 16 << 20))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n
