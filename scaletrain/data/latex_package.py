"""An arXiv source package (several files) -> one LaTeX document, cleaned by ``latex.py``.

The paper is read from its main file, the one with ``\\documentclass`` (preferring one with
``\\begin{document}``); ``\\input``/``\\include`` are followed inside the package (depth 8, no cycles), a
commented one is not.
"""

from __future__ import annotations

import posixpath

from pylatexenc.latexwalker import LatexMacroNode

from .latex import LatexResult, _arg, _Doc, _inner, _walk, clean_latex

MAX_INPUT_DEPTH = 8


def main_file(files: dict[str, str]) -> str | None:
    """The paper in a package: a file with ``\\documentclass`` on an uncommented line, preferring one with
    ``\\begin{document}``; ties go to the first name in sorted order."""
    def has(text: str, what: str) -> bool:
        return any(what in line.split("%", 1)[0] for line in text.splitlines() if what in line)

    names = sorted(f for f in files if f.lower().endswith(".tex"))
    candidates = [f for f in names if has(files[f], "\\documentclass")] or \
                 [f for f in names if has(files[f], "\\begin{document}")]
    full = [f for f in candidates if has(files[f], "\\begin{document}")]
    return (full or candidates or [None])[0]


def _lookup(files: dict[str, str], name: str, base: str) -> str | None:
    name = name.strip()
    for candidate in (posixpath.normpath(posixpath.join(base, name)), posixpath.normpath(name)):
        for c in (candidate, candidate + ".tex"):
            if c in files:
                return c
    return None


def resolve_inputs(files: dict[str, str], name: str, notes: list[str], depth: int = 0,
                   stack: tuple[str, ...] = ()) -> str:
    """The text of ``name`` with each ``\\input{f}``/``\\include{f}`` replaced by the file's own (resolved) text."""
    src = files[name]
    if "\\input" not in src and "\\include" not in src:
        return src
    doc = _Doc(src, macros={})  # comments out, so a commented \\input is not followed
    for n in _walk(doc.nodes):
        if isinstance(n, LatexMacroNode) and n.macroname in ("input", "include") and n.nodeargd is not None:
            target = _lookup(files, _inner(_arg(n, 0), src), posixpath.dirname(name))
            if target is None:
                notes.append(f"\\{n.macroname}{{{_inner(_arg(n, 0), src)}}} in {name}: not in the package")
            elif target in stack or depth >= MAX_INPUT_DEPTH:
                notes.append(f"\\{n.macroname}{{{target}}} in {name}: a cycle or nesting deeper than "
                             f"{MAX_INPUT_DEPTH}; not followed")
            else:
                # a file's end is a line end (TeX reads it as one): exactly one newline after its text
                text = resolve_inputs(files, target, notes, depth + 1, stack + (name,))
                doc.edits.append((n.pos, n.pos + n.len, text.rstrip("\n") + "\n"))
    doc._index()
    return doc.span(0, len(src))



def clean_package(files: dict[str, str], style: str = "source") -> LatexResult | None:
    """A package's paper (``None`` when no file is a main file), its ``\\input`` files spliced in."""
    main = main_file(files)
    if main is None:
        return None
    notes: list[str] = []
    result = clean_latex(resolve_inputs(files, main, notes), style)
    result.notes = notes
    return result
