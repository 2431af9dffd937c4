"""Reading input documents: JSONL (``{"text": ...}`` per line), plain ``.txt`` (one document
per file) and LaTeX ``.tex`` (cleaned to text and math). Errors name the file and line."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from scaletrain.errors import ScaletrainError

JSONL_SUFFIXES = (".jsonl", ".json")  # one JSON object a line
SUFFIXES = (*JSONL_SUFFIXES, ".txt", ".tex")
_BOM = "\ufeff"


class InputError(ScaletrainError):
    """Bad input text: the message names the file (and line) and what would be right."""


@dataclass
class Document:
    text: str
    source: str  # file[:line]


@dataclass
class ReadStats:
    documents: int = 0
    bad_lines: int = 0
    empty: int = 0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (file, why) for files found but not read


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()  # .JSONL is .jsonl
    return suffix if suffix in SUFFIXES else None


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
            elif _kind(f) is None:
                skipped.append((str(f), f"not a {'/'.join(SUFFIXES)} file"))
            else:
                found.append(f)
    return found


def list_inputs(inputs: Sequence[str], skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Input files in a fixed (sorted) order; folders are searched recursively (symlinked folders too). Every file
    found is read or listed in ``skipped`` with its reason."""
    skipped = skipped if skipped is not None else []
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = _walk(p, skipped)
            if not found:
                raise InputError(f"--input: folder {item} holds no {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            if _kind(p) is None:
                raise InputError(f"--input: {item} is not a {', '.join(SUFFIXES)} file")
            files.append(p)
        else:
            raise InputError(f"--input: {item} does not exist")
    return files


def _decode(data: bytes, path: Path, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = line if line is not None else data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{where}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}"
                         f"{' of the line' if line is not None else ''}); convert the file to UTF-8") from e


def _read_text(path: Path) -> str:
    """A whole .txt/.tex document: UTF-8, BOM dropped; binary files refused."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise InputError(f"{path}: binary data (a NUL byte at offset {data.index(0)}), not text; "
                         f"remove it from the input")
    return _decode(data, path).removeprefix(_BOM)


def iter_documents(inputs: Sequence[str | Path], skip_bad_lines: bool = False,
                   stats: ReadStats | None = None) -> Iterator[Document]:
    stats = stats if stats is not None else ReadStats()
    for path in list_inputs([str(i) for i in inputs], stats.skipped_files):
        try:
            if _kind(path) in JSONL_SUFFIXES:
                yield from _jsonl(path, skip_bad_lines, stats)
                continue
            text = _read_text(path)
        except OSError as e:  # vanished, unreadable: one line naming the file
            raise InputError(f"{path}: cannot read ({e.strerror or e}); was it moved or deleted while preparing?") \
                from e
        if not text.strip():
            raise InputError(f"{path}: file is empty (no documents); remove it from the input")
        doc = clean_latex(text) if _kind(path) == ".tex" else text.strip()
        if doc:
            stats.documents += 1
            yield Document(doc, str(path))
        else:
            stats.empty += 1


def _jsonl(path: Path, skip_bad_lines: bool, stats: ReadStats) -> Iterator[Document]:
    """One JSON object a line, streamed. Lines end at \\n only: U+2028, U+0085, \\x0b or \\x0c inside a line are
    text (``json.dumps(ensure_ascii=False)`` writes them), and \\r\\n endings are accepted."""
    content = False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw.rstrip(b"\r")
            if not raw.strip():
                continue
            content = True
            try:
                line = _decode(raw, path, n)
                if n == 1:
                    line = line.removeprefix(_BOM)
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError('expected an object with a string "text" field')
            except (ValueError, InputError) as e:  # bad UTF-8 is a bad line too
                if skip_bad_lines:
                    stats.bad_lines += 1
                    continue
                if isinstance(e, InputError):
                    raise
                raise InputError(f"{path}:{n}: malformed JSONL line ({e}); fix it or pass --skip-bad-lines") from e
            if obj["text"].strip():
                stats.documents += 1
                yield Document(obj["text"], f"{path}:{n}")
            else:
                stats.empty += 1
    if not content:
        raise InputError(f"{path}: file is empty (no documents); remove it from the input")


# ---- LaTeX ---------------------------------------------------------------------------------
_DROP_ENVS = ("figure", "figure*", "table", "table*", "thebibliography", "tikzpicture", "comment", "wrapfigure")
_DROP_CMDS_WITH_ARG = ("cite", "citep", "citet", "label", "ref", "eqref", "autoref", "cref", "Cref", "pageref",
                       "includegraphics", "bibliography", "bibliographystyle", "vspace", "hspace", "input",
                       "include", "usepackage", "documentclass", "thanks", "footnote", "url", "href")
_LAYOUT_CMDS = ("maketitle", "newpage", "clearpage", "noindent", "centering", "tableofcontents", "smallskip",
                "medskip", "bigskip", "par", "hfill", "vfill", "linebreak", "pagebreak", "appendix")
_UNWRAP_CMDS = ("section", "subsection", "subsubsection", "paragraph", "title", "textbf", "textit", "emph",
                "underline", "texttt", "textsc", "chapter")


def clean_latex(src: str) -> str:
    """LaTeX source -> prose with its math: drops comments, the preamble, figure/table/bibliography
    environments, ``\\cite``/``\\label``/``\\ref`` and layout commands; keeps section titles as lines."""
    s = re.sub(r"(?<!\\)%.*", "", src)  # comments (not \%)
    m = re.search(r"\\begin\{document\}(.*?)(\\end\{document\}|\Z)", s, flags=re.S)
    if m:
        title = re.search(r"\\title\{([^{}]*)\}", s[: m.start()])  # the title usually sits in the preamble
        s = (title.group(1) + "\n\n" if title else "") + m.group(1)
    for env in _DROP_ENVS:
        e = re.escape(env)
        s = re.sub(rf"\\begin\{{{e}\}}.*?\\end\{{{e}\}}", "", s, flags=re.S)
    s = re.sub(r"\\begin\{abstract\}|\\end\{abstract\}", "", s)
    for cmd in _DROP_CMDS_WITH_ARG:
        s = re.sub(rf"\\{cmd}\*?(\[[^\]]*\])?\{{[^{{}}]*\}}", "", s)
    for cmd in _UNWRAP_CMDS:
        s = re.sub(rf"\\{cmd}\*?\{{([^{{}}]*)\}}", r"\n\1\n" if "section" in cmd or cmd in ("title", "chapter",
                   "paragraph") else r"\1", s)
    for cmd in _LAYOUT_CMDS:
        s = re.sub(rf"\\{cmd}\b\s*", "", s)
    s = s.replace("~", " ")
    s = re.sub(r" +([.,;:])", r"\1", s)  # "prime \cite{x}." -> "prime."
    s = re.sub(r"[ \t]+", " ", s)
    s = re.sub(r"\n\s*\n\s*(\n\s*)+", "\n\n", s)
    return "\n".join(line.strip() for line in s.strip().splitlines()).strip()
