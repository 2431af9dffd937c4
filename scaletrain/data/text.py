"""Reading input documents: JSONL (``{"text": ...}`` per line), plain ``.txt`` (one document
per file) and LaTeX ``.tex`` (cleaned to text and math). Errors name the file and line."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from scaletrain.errors import ScaletrainError

SUFFIXES = (".jsonl", ".txt", ".tex")


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


def list_inputs(inputs: Sequence[str]) -> list[Path]:
    """Input files in a fixed (sorted) order; folders are searched recursively."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise InputError(f"--input: folder {item} holds no {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise InputError(f"--input: {item} is not a {', '.join(SUFFIXES)} file")
            files.append(p)
        else:
            raise InputError(f"--input: {item} does not exist")
    return files


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         f"convert the file to UTF-8") from e


def iter_documents(inputs: Sequence[str | Path], skip_bad_lines: bool = False,
                   stats: ReadStats | None = None) -> Iterator[Document]:
    stats = stats if stats is not None else ReadStats()
    for path in list_inputs([str(i) for i in inputs]):
        text = _read_text(path)
        if not text.strip():
            raise InputError(f"{path}: file is empty (no documents); remove it from the input")
        if path.suffix == ".jsonl":
            yield from _jsonl(path, text, skip_bad_lines, stats)
        else:
            doc = clean_latex(text) if path.suffix == ".tex" else text.strip()
            if doc:
                stats.documents += 1
                yield Document(doc, str(path))
            else:
                stats.empty += 1


def _jsonl(path: Path, text: str, skip_bad_lines: bool, stats: ReadStats) -> Iterator[Document]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError('expected an object with a string "text" field')
        except ValueError as e:
            if skip_bad_lines:
                stats.bad_lines += 1
                continue
            raise InputError(f"{path}:{n}: malformed JSONL line ({e}); fix it or pass --skip-bad-lines") from e
        if obj["text"].strip():
            stats.documents += 1
            yield Document(obj["text"], f"{path}:{n}")
        else:
            stats.empty += 1


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
