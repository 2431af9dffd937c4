"""arXiv LaTeX cleaned by a parser (pylatexenc), in both styles, to the exact expected text."""

import pytest

from scaletrain.data.latex import clean_latex
from scaletrain.data.latex_package import clean_package, main_file


def doc(body: str, preamble: str = "") -> str:
    return "\\documentclass{article}\n" + preamble + "\\begin{document}\n" + body + "\n\\end{document}\n"


MACROS = r"\newcommand{\R}{\mathbb{R}}" "\n" r"\newcommand\Rn{\R^n}" "\n" r"\def\N{\mathbb{N}}" "\n"
CASES = {  # name: (LaTeX, source style, text style)
    "section with math inside": (doc(r"\section{The $\mathbb{R}^n$ case}" "\nText."),
                                 "\\section{The $\\mathbb{R}^n$ case}\nText.", "The $\\mathbb{R}^n$ case\n\nText."),
    "nested markup": (doc("\\section{S}\n" r"\textbf{a \emph{b} c}"), "\\section{S}\n\\textbf{a \\emph{b} c}",
                      "S\n\na b c"),
    "link text": (doc("\\section{S}\n" r"See \href{https://arxiv.org}{the \textit{archive}}."),
                  "\\section{S}\nSee \\href{https://arxiv.org}{the \\textit{archive}}.", "S\n\nSee the archive."),
    "footnote with a group": (doc("\\section{S}\n" r"Word\footnote{A {nested} note.} more."),
                              "\\section{S}\nWord\\footnote{A {nested} note.} more.",
                              "S\n\nWord (A nested note.) more."),
    "escaped percent and a comment": (doc("\\section{S}\n" r"It costs 50\% more. % a comment" "\nNext line."),
                                      "\\section{S}\nIt costs 50\\% more.\nNext line.",
                                      "S\n\nIt costs 50% more. Next line."),
    "verbatim keeps its percent": (doc("\\section{S}\n\\begin{verbatim}\nx = 1 % kept\n\\end{verbatim}"),
                                   "\\section{S}\n\\begin{verbatim}\nx = 1 % kept\n\\end{verbatim}",
                                   "S\n\nx = 1 % kept"),
    "the paper's macros": (doc("\\section{S}\n" r"Let $x \in \R$, $y \in \Rn$ and $\N$.", MACROS),
                           "\\section{S}\nLet $x \\in \\mathbb{R}$, $y \\in \\mathbb{R}^n$ and $\\mathbb{N}$.",
                           "S\n\nLet $x \\in \\mathbb{R}$, $y \\in \\mathbb{R}^n$ and $\\mathbb{N}$."),
    "all math verbatim": (doc("\\section{S}\n" r"Inline \(a\), display \[b\] and" "\n"
                              r"\begin{equation*}c\label{e}\end{equation*}" "\n" r"\begin{align}d &= e\end{align}"),
                          "\\section{S}\nInline \\(a\\), display \\[b\\] and\n"
                          "\\begin{equation*}c\\label{e}\\end{equation*}\n\\begin{align}d &= e\\end{align}",
                          "S\n\nInline \\(a\\), display \\[b\\] and\n\n\\begin{equation*}c\\end{equation*}\n\n"
                          "\\begin{align}d &= e\\end{align}"),
    "theorem-like environments": (doc("\\section{S}\n" r"\begin{lemma}[Key] $x=x$.\end{lemma}" "\n"
                                      r"\begin{proof}Clear.\end{proof}"),
                                  "\\section{S}\n\\begin{lemma}[Key] $x=x$.\\end{lemma}\n"
                                  "\\begin{proof}Clear.\\end{proof}", "S\n\nLemma (Key). $x=x$.\n\nProof. Clear."),
    "the paper's own theorem names": (doc("\\section{S}\n" r"\begin{hyp}Always.\end{hyp}",
                                          r"\newtheorem{hyp}{Hypothesis}" "\n"),
                                      "\\section{S}\n\\begin{hyp}Always.\\end{hyp}", "S\n\nHypothesis. Always."),
    "figures, tables, citations, bibliography": (
        doc("\\section{S}\n" r"By \cite{k} we win\label{s}." "\n"
            r"\begin{figure}\centering\includegraphics{a.png}\caption{Cap}\end{figure}" "\n"
            r"\begin{tabular}{cc} a & b \\ \end{tabular}" "\nEnd.\n" r"\bibliographystyle{plain}\bibliography{refs}"),
        "\\section{S}\nBy \\cite{k} we win\\label{s}.\n"
        "\\begin{figure}\\centering\\includegraphics{a.png}\\caption{Cap}\\end{figure}\n"
        "\\begin{tabular}{cc} a & b \\\\ \\end{tabular}\nEnd.", "S\n\nBy we win.\n\nEnd."),
    "preamble, title and abstract": (doc("\\maketitle\n\\begin{abstract}\nWe prove it.\n\\end{abstract}\n"
                                         "\\section{Intro}\nBody.", "\\title{A \\emph{Title}}\n"),
                                     "\\section{Intro}\nBody.",
                                     "A Title\n\nAbstract\n\nWe prove it.\n\nIntro\n\nBody."),
}


@pytest.mark.parametrize("name", CASES)
def test_each_style_gives_the_exact_text(name):
    src, source, text = CASES[name]
    got_source, got_text = clean_latex(src, "source"), clean_latex(src, "text")
    assert (got_source.text, got_source.degraded) == (source, False)
    assert (got_text.text, got_text.degraded) == (text, False)


def test_broken_latex_degrades_and_is_reported():
    src = doc("\\section{S}\n" r"Text {unclosed \begin{itemize}\item x")
    source, text = clean_latex(src, "source"), clean_latex(src, "text")
    assert source.degraded and text.degraded
    assert source.text.startswith("\\section{S}\nText {unclosed \\begin{itemize}\\item x")
    assert text.text == "S\n\nText unclosed\n- x"
    assert clean_latex("}}}{{{\\end{x}", "text").degraded  # garbage: no exception


def test_a_package_is_read_from_its_main_file_following_input():
    files = {"main.tex": doc("\\section{Intro}\nHello \\input{sec/two}.\n% \\input{missing}"),
             "sec/two.tex": "World $\\alpha$ \\include{three}", "sec/three.tex": "deep",
             "appendix.tex": "\\section{X} a fragment, not a paper of its own"}
    assert main_file(files) == "main.tex"
    source, text = clean_package(files, "source"), clean_package(files, "text")
    assert source.text == "\\section{Intro}\nHello World $\\alpha$ deep\n."
    assert text.text == "Intro\n\nHello World $\\alpha$ deep\n."
    assert source.notes == []  # the commented \input is not followed
    cyclic = {"main.tex": doc("\\section{A}\\input{b}"), "b.tex": "B \\input{main}"}
    assert "a cycle" in clean_package(cyclic, "text").notes[0]
    assert clean_package({"fragment.tex": "\\section{X}"}, "text") is None  # no \documentclass: no paper
