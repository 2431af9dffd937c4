"""``scaletrain plot RUN_DIR... --output PNG``: loss curves from runs' ``metrics.jsonl`` into one PNG.

Four panels, one colour per run: training loss with the mixed validation loss (dashed), validation loss per
domain, learning rate, tokens/s. A run folder (``runs/NAME``) or its ``metrics.jsonl`` may be given; a line
that is not JSON (a killed run's torn last line) is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scaletrain.errors import ScaletrainError


def read_metrics(path: str) -> tuple[str, list[dict]]:
    """(the run's name, its logged lines) from a run folder or a metrics.jsonl."""
    p = Path(path)
    file = p / "metrics.jsonl" if p.is_dir() else p
    if not file.is_file():
        raise ScaletrainError(f"scaletrain plot: no metrics.jsonl in {path} (give a run folder, runs/NAME, or the "
                              f"file itself)")
    rows = []
    for line in file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    if not rows:
        raise ScaletrainError(f"scaletrain plot: {file} has no logged steps")
    name = file.parent.name if file.name == "metrics.jsonl" else file.stem
    return name, rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def plot(runs: list[str], output: str, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(output)
    fmt = out.suffix.lstrip(".").lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:  # matplotlib's own ValueError came as a traceback, after all the drawing
        raise ScaletrainError(f"scaletrain plot: --output {output}: .{fmt} is not an image format it writes "
                              f"({', '.join(sorted(formats))}); give e.g. --output {out.with_suffix('.png').name}")
    data = [read_metrics(r) for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (loss_ax, dom_ax), (lr_ax, tps_ax) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, (name, rows) in enumerate(data):
        c = colours[i % len(colours)]
        loss_ax.plot(*_series(rows, "loss"), color=c, label=f"{name} loss")
        if any("val_loss" in r for r in rows):
            loss_ax.plot(*_series(rows, "val_loss"), color=c, linestyle="--", marker=".", label=f"{name} val_loss")
        domains = sorted({k[len("val_loss/"):] for r in rows for k in r if k.startswith("val_loss/")})
        for j, d in enumerate(domains):
            dom_ax.plot(*_series(rows, f"val_loss/{d}"), color=c, linestyle=styles[j % len(styles)], marker=".",
                        label=f"{name} {d}")
        lr_ax.plot(*_series(rows, "lr"), color=c, label=name)
        tps_ax.plot(*_series(rows, "tokens_per_s"), color=c, label=name)
    for ax, what in ((loss_ax, "loss"), (dom_ax, "validation loss per domain"), (lr_ax, "learning rate"),
                     (tps_ax, "tokens/s")):
        ax.set_title(what)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title or ", ".join(name for name, _ in data))
    fig.tight_layout()
    from scaletrain.files import whole_or_absent

    try:
        with whole_or_absent(out) as tmp:
            fig.savefig(tmp, dpi=100, format=fmt)
    finally:
        plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaletrain plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (runs/NAME) or metrics.jsonl files")
    p.add_argument("--output", "-o", required=True, metavar="PNG", help="the image to write")
    p.add_argument("--title", help="the figure's title (default: the runs' names)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from scaletrain.errors import run_entry

    run_entry(lambda: print(f"wrote {plot(a.runs, a.output, a.title)}"))
