"""A small two-domain sample corpus, embedded so the demo and tests need no download:
``arxiv`` (LaTeX papers and JSONL abstracts on mathematics) and ``general`` (JSONL and plain-text
prose). Documents are assembled from real sentences by a seeded generator, a few MB in all."""

from __future__ import annotations

import json
import random
from pathlib import Path

GENERAL = [
    "The river had risen overnight, and by morning the lower fields were under a sheet of brown water.",
    "She kept the letters in a tin box under the stairs, tied with a ribbon that had long since faded.",
    "Most of the town's bakeries open before dawn, when the streets are still empty and the air is cold.",
    "A good map tells you not only where things are but also what the people who drew it cared about.",
    "The committee met twice a month to review the budget and to hear complaints from residents.",
    "When the train finally arrived, it was forty minutes late and every carriage was full.",
    "He learned to repair bicycles from his grandfather, who never threw away a single spare part.",
    "The museum's new wing houses a collection of maps, clocks and scientific instruments.",
    "Volunteers planted three hundred trees along the old railway line last spring.",
    "In the evenings the market square fills with stalls selling soup, bread and roasted chestnuts.",
    "The report found that most households spend more on heating than they did five years ago.",
    "Her first novel was rejected by eleven publishers before a small press agreed to print it.",
    "The bridge was closed for repairs, so the ferry ran every half hour until midnight.",
    "Children in the village walk two miles to school, even in the worst of the winter weather.",
    "The orchestra rehearsed the symphony for weeks, yet the opening bars still sounded uncertain.",
    "Farmers in the valley have grown apples and pears there for more than two centuries.",
    "The library lends tools as well as books, from ladders to sewing machines.",
    "After the storm, the beach was covered in seaweed, driftwood and the occasional lost shoe.",
    "The new law requires landlords to register every rental property with the city council.",
    "He wrote down every bird he saw in a small notebook, along with the date and the weather.",
    "The bakery's recipe for rye bread has not changed since the shop opened in 1923.",
    "Tourists often miss the quiet streets behind the cathedral, where the oldest houses stand.",
    "The hospital opened a new ward for children, funded almost entirely by local donations.",
    "Every summer the lake freezes in the students' memories as the place where they learned to swim.",
    "The engineers tested the pump for three days before declaring it safe to use.",
    "Nobody remembered who had planted the fig tree, but everyone agreed it gave the best fruit.",
    "The radio station plays old jazz records on Sunday mornings and takes requests by telephone.",
    "Prices at the fish market depend on the weather, the season and the mood of the sea.",
    "The teacher asked each student to bring one object that told a story about their family.",
    "Along the coast, lighthouses were once kept by families who lived in them all year round.",
]
PEOPLE = ["Anna", "Tomas", "Leila", "Marcus", "Priya", "Jonas", "Sofia", "Daniel", "Mei", "Oskar"]
PLACES = ["Bergen", "Lyon", "Porto", "Kraków", "Galway", "Trieste", "Ghent", "Tartu", "Bologna", "Utrecht"]

MATH_PROSE = [
    "Let $G$ be a finite group and let $H$ be a subgroup of $G$; then the order of $H$ divides the order of $G$.",
    "We say that a sequence $(a_n)$ converges to $L$ if for every $\\varepsilon > 0$ there is $N$ with "
    "$|a_n - L| < \\varepsilon$ for all $n \\ge N$.",
    "By the Cauchy--Schwarz inequality, $|\\langle x, y \\rangle| \\le \\|x\\| \\, \\|y\\|$ for all $x, y$.",
    "The prime number theorem states that $\\pi(x) \\sim x / \\log x$ as $x \\to \\infty$.",
    "Suppose $f$ is continuous on $[a, b]$ and differentiable on $(a, b)$; then there is $c$ with "
    "$f'(c) = \\frac{f(b) - f(a)}{b - a}$.",
    "Every bounded monotone sequence of real numbers converges.",
    "A matrix $A$ is diagonalizable if and only if it has $n$ linearly independent eigenvectors.",
    "We now show that the kernel of a homomorphism is a normal subgroup.",
    "The integral $\\int_0^\\infty e^{-x^2} \\, dx$ equals $\\frac{\\sqrt{\\pi}}{2}$.",
    "It follows from the induction hypothesis that the claim holds for $n + 1$.",
    "Consider the generating function $F(z) = \\sum_{n \\ge 0} F_n z^n$ of the Fibonacci numbers.",
    "A metric space is compact if and only if it is complete and totally bounded.",
    "The Euler characteristic of a convex polyhedron satisfies $V - E + F = 2$.",
    "We conclude that the series $\\sum_{n=1}^{\\infty} \\frac{1}{n^p}$ converges precisely when $p > 1$.",
    "Let $X$ be a random variable with finite variance; by Chebyshev's inequality, "
    "$P(|X - \\mu| \\ge k\\sigma) \\le 1/k^2$.",
    "The determinant is multiplicative: $\\det(AB) = \\det(A)\\det(B)$.",
    "Assume for contradiction that $\\sqrt{2} = p/q$ with $p$ and $q$ coprime integers.",
    "The Fourier transform of a Gaussian is again a Gaussian.",
    "Hence the map $\\phi$ is injective, and since both spaces have dimension $n$, it is an isomorphism.",
    "We recall that a graph is bipartite if and only if it contains no odd cycle.",
]
EQUATIONS = [
    "\\zeta(s) = \\sum_{n=1}^{\\infty} \\frac{1}{n^s} = \\prod_{p} \\frac{1}{1 - p^{-s}}",
    "\\int_{-\\infty}^{\\infty} e^{-a x^2} \\, dx = \\sqrt{\\frac{\\pi}{a}}",
    "\\binom{n}{k} = \\frac{n!}{k!\\,(n-k)!}",
    "e^{i\\pi} + 1 = 0",
    "\\nabla \\cdot \\mathbf{E} = \\frac{\\rho}{\\varepsilon_0}",
    "\\sum_{k=0}^{n} \\binom{n}{k} x^k y^{n-k} = (x + y)^n",
]
TOPICS = ["Prime Gaps", "Compact Operators", "Random Graphs", "Modular Forms", "Convex Bodies", "Markov Chains",
          "Lattice Paths", "Elliptic Curves", "Sobolev Spaces", "Group Actions"]


def _paragraph(rng: random.Random, sentences: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(sentences) for _ in range(rng.randint(lo, hi)))


def _general_doc(rng: random.Random) -> str:
    who, where = rng.choice(PEOPLE), rng.choice(PLACES)
    intro = f"{who} has lived in {where} for {rng.randint(2, 40)} years."
    return "\n\n".join([intro + " " + _paragraph(rng, GENERAL, 2, 5)] +
                       [_paragraph(rng, GENERAL, 3, 6) for _ in range(rng.randint(1, 4))])


def _latex_paper(rng: random.Random, i: int) -> str:
    topic = rng.choice(TOPICS)
    body = []
    for s in range(rng.randint(2, 4)):
        body.append(f"\\section{{Part {s + 1}}}\\label{{sec:{s}}}")
        body.append(_paragraph(rng, MATH_PROSE, 2, 5) + f" See~\\cite{{ref{rng.randint(1, 99)}}}.")
        body.append(f"\\begin{{equation}}\\label{{eq:{i}-{s}}}\n{rng.choice(EQUATIONS)}\n\\end{{equation}}")
        body.append("% TODO: tighten this bound\n" + _paragraph(rng, MATH_PROSE, 1, 3))
        if rng.random() < 0.3:
            body.append("\\begin{figure}[h]\\centering\\includegraphics{plot.pdf}\\caption{Numerics.}\\end{figure}")
    return ("\\documentclass{article}\n\\usepackage{amsmath,amssymb}\n"
            f"\\title{{Notes on {topic} {i}}}\n\\begin{{document}}\n\\maketitle\n"
            "\\begin{abstract}\n" + _paragraph(rng, MATH_PROSE, 1, 2) + "\n\\end{abstract}\n"
            + "\n\n".join(body) +
            "\n\\begin{thebibliography}{9}\\bibitem{ref1} A. Author, A paper, 2001.\\end{thebibliography}\n"
            "\\end{document}\n")


def create_sample_pretraining_data(data_dir: str | Path, seed: int = 0, scale: float = 1.0) -> dict[str, Path]:
    """Write ``data_dir/raw/{arxiv,general}`` (about 4 MB at ``scale=1``); returns the domain folders."""
    rng = random.Random(seed)
    raw = Path(data_dir) / "raw"
    arxiv, general = raw / "arxiv", raw / "general"
    for d in (arxiv, general):
        d.mkdir(parents=True, exist_ok=True)
    n_papers, n_abstracts, n_general, n_txt = (int(x * scale) for x in (300, 1500, 4000, 200))
    for i in range(max(1, n_papers)):
        (arxiv / f"paper_{i:04d}.tex").write_text(_latex_paper(rng, i))
    with open(arxiv / "abstracts.jsonl", "w") as f:
        for i in range(max(1, n_abstracts)):
            f.write(json.dumps({"text": _paragraph(rng, MATH_PROSE, 3, 7), "id": f"abs-{i}"}) + "\n")
    with open(general / "web.jsonl", "w") as f:
        for i in range(max(1, n_general)):
            f.write(json.dumps({"text": _general_doc(rng), "url": f"https://example.org/{i}"}) + "\n")
    for i in range(max(1, n_txt)):
        (general / f"story_{i:04d}.txt").write_text(_general_doc(rng) + "\n")
    return {"arxiv": arxiv, "general": general}


SAMPLE_SOURCES, SAMPLE_WEIGHTS = ("arxiv", "general"), (0.3, 0.7)


def prepare_sample(data_dir: str | Path, quiet: bool = False) -> Path:
    """The sample corpus as shards under ``data_dir/pretraining`` (what `make pretrain` trains on); kept when
    already prepared by this version. Returns the shards folder."""
    import os

    from .manifest import FORMAT_VERSION, MANIFEST
    from .prepare import prepare_domain

    shards = Path(data_dir) / "pretraining"
    manifests = [shards / d / MANIFEST for d in SAMPLE_SOURCES]
    if all(m.is_file() and json.loads(m.read_text()).get("format") == FORMAT_VERSION for m in manifests):
        if not quiet:
            print(f"sample shards already in {shards}")
        return shards
    raw = create_sample_pretraining_data(data_dir)
    for d in SAMPLE_SOURCES:
        prepare_domain(d, [str(raw[d])], str(shards), workers=os.cpu_count() or 1, val_fraction=0.02,
                       shard_tokens=2**18, chunk_tokens=2**16, overwrite=True, quiet=quiet)
    return shards
