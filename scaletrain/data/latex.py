"""arXiv LaTeX -> training text, in the two styles math language models use, with a real parser.

``source`` (the default) is the recipe of RedPajama's arXiv subset, reused by proof-pile-2 and Llemma: a model
of mathematics should learn to *write* LaTeX, so the document body is kept as LaTeX from the first sectioning
command on; comments (not an escaped ``\\%``), the preamble and the bibliography are dropped, and the paper's own
argument-free ``\\newcommand``/``\\def`` macros are expanded inline (``\\R`` -> ``\\mathbb{R}``).

``text`` gives reading text: prose, section titles on their own lines, theorem-like environments with their name
("Theorem.", "Proof."), footnote and link text, verbatim blocks and ALL math verbatim; markup commands are dropped
around the text they hold, however deeply nested; figures, table layout, labels, references, citations and the
bibliography are dropped.

Both walk the node tree of pylatexenc's ``LatexWalker``. Compared before choosing (2026-11-27, this 2-core
machine, a 133 kB body of 60 sample papers): ``LatexWalker`` parsed it at 0.08-0.09 MB/s; TexSoup at 0.011 MB/s and it
raises ``EOFError`` on a missing ``\\end{itemize}`` where we must degrade; plasTeX executes the document (package
loading, a much larger surface) to build a DOM. ``LatexWalker`` is pure Python and does not execute anything, has a
tolerant mode, per-node source positions (so ``source`` style cuts and splices the original text exactly) and an
extensible table of macro argument shapes. Its speed is the cost: about 0.085 MB/s per core, i.e. some 330
core-hours for 100 GB of arXiv source, spread over ``prepare --workers``. A document that does not parse strictly is
re-parsed tolerantly and counted as degraded: broken LaTeX yields the best text it can, never an exception.

Packages of several files (main file, ``\\input``) are read by ``latex_package.py``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from pylatexenc.latexwalker import (
    LatexCharsNode,
    LatexCommentNode,
    LatexEnvironmentNode,
    LatexGroupNode,
    LatexMacroNode,
    LatexMathNode,
    LatexSpecialsNode,
    LatexWalker,
    LatexWalkerError,
    get_default_latex_context_db,
)
from pylatexenc.macrospec import EnvironmentSpec, MacroSpec, VerbatimArgsParser

STYLES = ("source", "text")
SECTIONS = ("part", "chapter", "section", "subsection", "subsubsection", "paragraph", "subparagraph")
MATH_ENVS = {f"{e}{s}" for e in ("equation", "align", "gather", "multline", "eqnarray", "flalign", "alignat",
                                   "displaymath", "math", "dmath") for s in ("", "*")}
DROP_ENVS = {"figure", "figure*", "table", "table*", "wrapfigure", "wraptable", "tikzpicture", "thebibliography",
             "comment", "tabular", "tabular*", "tabularx", "longtable", "picture", "filecontents", "filecontents*"}
VERBATIM_ENVS = ("verbatim", "verbatim*", "lstlisting", "Verbatim", "alltt")
THEOREMS = {"theorem": "Theorem", "lemma": "Lemma", "proposition": "Proposition", "corollary": "Corollary",
            "definition": "Definition", "remark": "Remark", "example": "Example", "conjecture": "Conjecture",
            "claim": "Claim", "proof": "Proof", "assumption": "Assumption", "observation": "Observation",
            "fact": "Fact", "exercise": "Exercise", "problem": "Problem", "question": "Question",
            "notation": "Notation", "note": "Note", "thm": "Theorem", "lem": "Lemma", "prop": "Proposition",
            "cor": "Corollary", "defn": "Definition", "rem": "Remark", "conj": "Conjecture"}
DROP_MACROS = {"cite", "citep", "citet", "citealt", "citealp", "citeauthor", "citeyear", "nocite", "label", "ref",
               "eqref", "autoref", "cref", "Cref", "pageref", "nameref", "includegraphics", "bibliography",
               "bibliographystyle", "vspace", "hspace", "usepackage", "documentclass", "thanks", "author",
               "affiliation", "address", "email", "date", "keywords", "newcommand", "renewcommand", "providecommand",
               "newenvironment", "renewenvironment", "DeclareMathOperator", "newtheorem", "def", "let", "setlength",
               "setcounter", "addtolength", "caption", "input", "include", "maketitle", "tableofcontents",
               "newpage", "clearpage", "noindent", "centering", "par", "hfill", "vfill", "smallskip", "medskip",
               "bigskip", "linebreak", "pagebreak", "appendix", "bibitem", "raggedright", "footnotemark",
               "acknowledgments", "pacs", "numberwithin", "graphicspath", "protect", "index"}
WORDS = {"ldots": "...", "dots": "...", "LaTeX": "LaTeX", "TeX": "TeX", " ": " ", ",": " ", ";": " ", "quad": " ",
         "qquad": " ", "textbackslash": "\\", "S": "§", "P": "¶", "ss": "ß", "copyright": "©", "&": "&", "%": "%",
         "$": "$", "#": "#", "_": "_", "{": "{", "}": "}", "\\": "\n", "newline": "\n", "-": "", "/": ""}
SPECIALS = {"~": " ", "&": " ", "``": '"', "''": '"', "--": "–", "---": "—", "!`": "¡", "?`": "¿"}


def _context():
    db = get_default_latex_context_db()
    db.add_context_category("scaletrain", prepend=True, macros=[
        MacroSpec("href", "[{{"), MacroSpec("footnote", "[{"), MacroSpec("url", "{"), MacroSpec("caption", "*[{"),
        MacroSpec("newtheorem", "*{[{["), MacroSpec("paragraph", "*[{"), MacroSpec("citep", "*[[{"),
        MacroSpec("citet", "*[[{"), MacroSpec("eqref", "{"), MacroSpec("autoref", "*{"), MacroSpec("cref", "*{"),
        MacroSpec("Cref", "*{"), MacroSpec("bibliographystyle", "{"), MacroSpec("bibitem", "[{"),
        MacroSpec("thanks", "{"), MacroSpec("keywords", "{"), MacroSpec("underline", "{"), MacroSpec("uline", "{"),
        MacroSpec("textnormal", "{"), MacroSpec("numberwithin", "{{"), MacroSpec("graphicspath", "{"),
    ], environments=[EnvironmentSpec(e, args_parser=VerbatimArgsParser(verbatim_arg_type="verbatim-environment"))
                     for e in VERBATIM_ENVS[1:]] + [EnvironmentSpec(e, "[") for e in THEOREMS])
    # a paper's own environments (theorems from \newtheorem) take an optional [name]
    db.set_unknown_environment_spec(EnvironmentSpec("", "["))
    return db


_CONTEXT = _context()


@dataclass
class LatexResult:
    text: str
    degraded: bool = False  # did not parse strictly; cleaned from a tolerant parse
    notes: list[str] = field(default_factory=list)


def _parse(src: str) -> tuple[list, bool]:
    try:
        nodes, _, _ = LatexWalker(src, latex_context=_CONTEXT, tolerant_parsing=False).get_latex_nodes()
        return nodes, False
    except (LatexWalkerError, IndexError, ValueError):
        nodes, _, _ = LatexWalker(src, latex_context=_CONTEXT, tolerant_parsing=True).get_latex_nodes()
        return nodes, True


def _children(n) -> list:
    """The nodes below ``n``: its body and the nodes of its arguments."""
    out = []
    if isinstance(n, (LatexGroupNode, LatexEnvironmentNode, LatexMathNode)):
        out.extend(c for c in n.nodelist or [] if c is not None)
    if isinstance(n, (LatexMacroNode, LatexEnvironmentNode, LatexSpecialsNode)) and n.nodeargd is not None:
        out.extend(a for a in n.nodeargd.argnlist or [] if a is not None)
    return out


def _walk(nodes):
    for n in nodes:
        if n is None:
            continue
        yield n
        yield from _walk(_children(n))


def _arg(n, i: int):
    args = n.nodeargd.argnlist if n.nodeargd is not None else []
    return args[i] if -len(args) <= i < len(args) else None


def _inner(node, src: str) -> str:
    """The source inside a ``{...}`` argument (or of a bare one-token argument)."""
    if isinstance(node, LatexGroupNode):
        return src[node.pos + 1: node.pos + node.len - 1]
    return src[node.pos: node.pos + node.len] if node is not None else ""


def _macro_name(node) -> str | None:
    """``\\R`` or ``{\\R}`` as the name argument of ``\\newcommand``."""
    if isinstance(node, LatexGroupNode):
        inner = [c for c in node.nodelist if c is not None and not (isinstance(c, LatexCharsNode)
                                                                   and not c.chars.strip())]
        node = inner[0] if len(inner) == 1 else None
    return node.macroname if isinstance(node, LatexMacroNode) else None


class _Doc:
    """One parsed document: its macros, theorem names and the edits that turn its source into clean source."""

    def __init__(self, src: str, macros: dict[str, str] | None = None) -> None:
        """``macros`` given: a fragment (a macro's definition) expanded with them; else a whole document whose own
        definitions are collected (and removed from its source)."""
        self.src = src
        self.nodes, self.degraded = _parse(src)
        self.theorems = dict(THEOREMS)
        self.edits: list[tuple[int, int, str]] = []  # (start, end, replacement); one inside another is skipped
        if macros is None:
            self.macros: dict[str, str] = {}
            self._collect(self.nodes)
            self._expand_definitions()
        else:
            self.macros = macros
        self._edit(self.nodes, comments=macros is None)
        self._index()

    def _index(self) -> None:
        self.edits.sort()
        self._starts = [e[0] for e in self.edits]

    def without(self, macros: set[str]) -> _Doc:
        """The same document whose spans also drop the given commands with their arguments (text style: a
        ``\\label`` inside an equation is not math)."""
        other = _Doc.__new__(_Doc)
        other.__dict__.update(self.__dict__)
        other.edits = self.edits + [(n.pos, n.pos + n.len, "") for n in _walk(self.nodes)
                                    if isinstance(n, LatexMacroNode) and n.macroname in macros]
        other._index()
        return other

    # ---- definitions ----
    def _collect(self, nodes) -> None:
        for seq in [nodes] + [_children(n) for n in _walk(nodes)]:
            seq = [n for n in seq if n is not None]
            for i, n in enumerate(seq):
                if not isinstance(n, LatexMacroNode):
                    continue
                if n.macroname in ("newcommand", "renewcommand", "providecommand") and n.nodeargd is not None:
                    name, nargs, body = _macro_name(_arg(n, 1)), _arg(n, 2), _arg(n, 4)
                    if name and nargs is None and body is not None:
                        self.macros[name] = _inner(body, self.src)
                        self.edits.append((n.pos, n.pos + n.len, ""))
                elif n.macroname == "def" and i + 2 < len(seq):  # \def\R{...}: three sibling nodes
                    target, body = seq[i + 1], seq[i + 2]
                    if isinstance(target, LatexMacroNode) and isinstance(body, LatexGroupNode) \
                            and target.pos + target.len == body.pos:  # no parameter text (#1) between them
                        self.macros[target.macroname] = _inner(body, self.src)
                        self.edits.append((n.pos, body.pos + body.len, ""))
                elif n.macroname == "newtheorem" and n.nodeargd is not None:
                    env, title = _inner(_arg(n, 1), self.src).strip(), _arg(n, 3)
                    if env and title is not None:
                        self.theorems[env] = _inner(title, self.src).strip()

    def _expand_definitions(self) -> None:
        """Definitions that use each other are expanded until stable (depth 5: a recursive macro stops there)."""
        for _ in range(5):
            changed = False
            for name, body in self.macros.items():
                if "\\" in body:
                    expanded = _Doc(body, self.macros).span(0, len(body))
                    if expanded != body:
                        self.macros[name], changed = expanded, True
            if not changed:
                return

    # ---- edits: comments out, the paper's macros in ----
    def _edit(self, nodes, comments: bool) -> None:
        for n in _walk(nodes):
            if comments and isinstance(n, LatexCommentNode):
                line_start = self.src.rfind("\n", 0, n.pos) + 1
                end = self.src.find("\n", n.pos)
                end = len(self.src) if end < 0 else end
                if not self.src[line_start:n.pos].strip():  # a comment line goes with its newline
                    self.edits.append((line_start, min(end + 1, len(self.src)), ""))
                else:  # the spaces before it go too: no trailing blanks left on the line
                    start = n.pos
                    while start > line_start and self.src[start - 1] in " \t":
                        start -= 1
                    self.edits.append((start, end, ""))
            elif isinstance(n, LatexMacroNode) and n.macroname in self.macros and \
                    not (n.nodeargd is not None and n.nodeargd.argnlist):  # \R, not a known command redefined
                self.edits.append((n.pos, n.pos + len("\\" + n.macroname), self.macros[n.macroname]))

    def span(self, start: int, end: int) -> str:
        """The source in [start, end) with the edits applied."""
        out, pos = [], start
        for i in range(bisect.bisect_left(self._starts, start), len(self.edits)):
            a, b, rep = self.edits[i]
            if a >= end:
                break
            if a < pos:  # inside an edit already applied
                continue
            out.append(self.src[pos:a])
            out.append(rep)
            pos = min(b, end)
        out.append(self.src[pos:end])
        return "".join(out)

    def node_source(self, n) -> str:
        return self.span(n.pos, n.pos + n.len)


def _document(nodes) -> tuple[LatexEnvironmentNode | None, list]:
    for n in nodes:
        if isinstance(n, LatexEnvironmentNode) and n.environmentname == "document":
            return n, n.nodelist
    return None, nodes


def _is_bibliography(n) -> bool:
    return (isinstance(n, LatexEnvironmentNode) and n.environmentname == "thebibliography") or \
           (isinstance(n, LatexMacroNode) and n.macroname in ("bibliography", "bibliographystyle", "printbibliography"))


# ---- source style ---------------------------------------------------------------------------------------------
def _source(doc: _Doc) -> str:
    _, body = _document(doc.nodes)
    body = [n for n in body if n is not None]
    first = next((i for i, n in enumerate(body) if isinstance(n, LatexMacroNode) and n.macroname in SECTIONS), None)
    if first is None:
        return ""  # RedPajama keeps papers from their first section: a file without one is not a paper body
    end = next((i for i in range(first, len(body)) if _is_bibliography(body[i])), len(body))
    if end == first:
        return ""
    return doc.span(body[first].pos, body[end - 1].pos + body[end - 1].len)


# ---- text style -----------------------------------------------------------------------------------------------
class _Text:
    def __init__(self, doc: _Doc) -> None:
        self.doc = doc.without({"label"})

    def nodes(self, nodes) -> str:
        return "".join(self.node(n) for n in nodes if n is not None)

    def arg(self, n, i: int) -> str:
        a = _arg(n, i)
        return self.node(a) if a is not None else ""

    def node(self, n) -> str:
        if isinstance(n, LatexCharsNode):
            return n.chars
        if isinstance(n, LatexCommentNode):
            return "" if n.comment_post_space.count("\n") < 2 else "\n\n"
        if isinstance(n, LatexGroupNode):
            return self.nodes(n.nodelist)
        if isinstance(n, LatexMathNode):
            return self.doc.node_source(n)
        if isinstance(n, LatexSpecialsNode):
            return SPECIALS.get(n.specials_chars, n.specials_chars)
        if isinstance(n, LatexEnvironmentNode):
            return self.environment(n)
        if isinstance(n, LatexMacroNode):
            return self.macro(n)
        return ""

    def macro(self, n: LatexMacroNode) -> str:
        name = n.macroname
        if name in self.doc.macros:  # the paper's own macro used in prose: its text
            return self.nodes(_parse(self.doc.macros[name])[0]) + n.macro_post_space
        if name in SECTIONS or name == "title":
            return f"\n\n{self.arg(n, -1).strip()}\n\n"
        if name in DROP_MACROS:
            return ""
        if name == "href":
            return self.arg(n, 2)
        if name == "url":
            return _inner(_arg(n, 0), self.doc.src)
        if name == "footnote":
            return f" ({self.arg(n, -1).strip()})"
        if name == "verb":
            return n.nodeargd.verbatim_text if getattr(n.nodeargd, "verbatim_text", None) is not None else ""
        if name == "item":
            label = self.arg(n, 0).strip()
            return f"\n{label}: " if label else "\n- "
        if name in WORDS:
            return WORDS[name] + (n.macro_post_space if name.isalpha() and name not in ("quad", "qquad") else "")
        if n.nodeargd is not None and n.nodeargd.argnlist:  # markup: \textbf{..}, \emph{..}, \mbox{..}, ...
            return self.arg(n, -1)
        return ""  # an argument-free command without text (\bigskip, \small, ...); a {group} after it is its own node

    def environment(self, n: LatexEnvironmentNode) -> str:
        env = n.environmentname
        if env in MATH_ENVS:
            return "\n" + self.doc.node_source(n) + "\n"
        if env in DROP_ENVS:
            return ""
        if env in VERBATIM_ENVS:
            text = getattr(n.nodeargd, "verbatim_text", None) if n.nodeargd is not None else None
            return "\n" + (text if text is not None else self.nodes(n.nodelist)).strip("\n") + "\n"
        if env in self.doc.theorems:
            named = self.arg(n, 0).strip()
            head = self.doc.theorems[env] + (f" ({named})" if named else "")
            return f"\n\n{head}. {self.nodes(n.nodelist).strip()}\n\n"
        if env == "abstract":
            return f"\n\nAbstract\n\n{self.nodes(n.nodelist).strip()}\n\n"
        if env == "enumerate":
            return self._enumerate(n)
        return self.nodes(n.nodelist)

    def _enumerate(self, n: LatexEnvironmentNode) -> str:
        out, k = [], 0
        for c in n.nodelist:
            if isinstance(c, LatexMacroNode) and c.macroname == "item":
                label = self.arg(c, 0).strip()
                k += 1
                out.append(f"\n{label or f'{k}.'} ")
            else:
                out.append(self.node(c))
        return "".join(out) + "\n"


def _tidy(s: str) -> str:
    lines = []
    for line in s.splitlines():
        line = " ".join(line.split())
        for p in ".,;:)":
            line = line.replace(f" {p}", p)
        lines.append(line.replace("( ", "("))
    out, blank = [], 0
    for line in lines:
        blank = blank + 1 if not line else 0
        if blank <= 1:
            out.append(line)
    return "\n".join(out).strip()


def _text(doc: _Doc) -> str:
    document, body = _document(doc.nodes)
    title = ""
    if document is not None:  # the title usually sits in the preamble
        t = next((n for n in doc.nodes if isinstance(n, LatexMacroNode) and n.macroname == "title"), None)
        title = _Text(doc).arg(t, -1).strip() + "\n\n" if t is not None else ""
    body = [n for n in body if n is not None]
    end = next((i for i, n in enumerate(body) if _is_bibliography(n)), len(body))
    return _tidy(title + _Text(doc).nodes(body[:end]))


def clean_latex(src: str, style: str = "source") -> LatexResult:
    """One LaTeX document (already a single string) cleaned in ``style``; never raises on bad LaTeX."""
    if style not in STYLES:
        raise ValueError(f"latex style {style!r}: choose one of {', '.join(STYLES)}")
    doc = _Doc(src)
    text = _source(doc) if style == "source" else _text(doc)
    return LatexResult(text.strip() if style == "text" else text.strip("\n"), doc.degraded)
