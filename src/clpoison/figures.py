"""Figures with matplotlib: line panels (response curves, training losses) and grouped bars
(attack x victim), saved as PNG with the plotted series embedded in the file.

Every figure is written by :func:`save_figure`, which reads the series back from the figure's
own artists (each line's points, each bar's height) and stores them as JSON in a PNG text chunk,
so what a PNG shows can be checked without looking at it: :func:`read_series` returns
``{panel title: {series label: [[x, y], ...]}}``.

Example::

    fig = line_panels([Panel("SimCLR", "epsilon (/255)", "linear %",
                             {"cp-s": ([4, 8], [40.1, 36.6])}, {"clean": 45.5})])
    save_figure(fig, "budget.png")
    read_series("budget.png")["SimCLR"]["cp-s"]     # [[4.0, 40.1], [8.0, 36.6]]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")                 # files only: no display needed, none opened
import matplotlib.pyplot as plt       # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from PIL import Image                 # noqa: E402

from clpoison.errors import ClpoisonError  # noqa: E402
from clpoison.utils import atomic_path  # noqa: E402

SERIES_KEY = "clpoison-series"
REFERENCE_STYLES = {"clean": ("tab:green", "--"), "random": ("tab:gray", ":"),
                    "floor": ("black", "-.")}
# series colours: none of the references' (clean green, random grey), so a poison's curve is
# never read as a reference line; a random-noise series takes the random reference's grey
SERIES_COLORS = ("tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                 "tab:olive", "tab:cyan")


def series_color(label: str, i: int) -> str:
    """The colour of the ``i``-th plotted series called ``label``."""
    if label.split(" ")[0] in REFERENCE_STYLES:
        return REFERENCE_STYLES[label.split(" ")[0]][0]
    return SERIES_COLORS[i % len(SERIES_COLORS)]


@dataclass
class Panel:
    """One axes of a line figure: ``series`` label -> (x, y[, yerr]), ``lines`` label -> a
    horizontal reference (the clean victim, the random control, the random-init floor)."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple] = field(default_factory=dict)
    lines: dict[str, float] = field(default_factory=dict)
    xscale: str = "linear"


def line_panels(panels: list[Panel], suptitle: str | None = None):
    """A row of line plots, one per panel, markers at the measured points."""
    if not panels:
        raise ClpoisonError("a figure needs at least one panel")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for i, (label, values) in enumerate(p.series.items()):
            x, y = values[0], values[1]
            yerr = values[2] if len(values) > 2 else None
            color = series_color(label, i)
            if yerr is not None and any(e > 0 for e in yerr):
                ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label=label, color=color)
            else:
                ax.plot(x, y, marker="o", label=label, color=color)
        for label, y in p.lines.items():
            color, style = REFERENCE_STYLES.get(label.split(" ")[0], ("tab:purple", "--"))
            ax.axhline(y, color=color, linestyle=style, linewidth=1, label=label)
        if p.xscale == "log2":
            ax.set_xscale("log", base=2)
            xs = sorted({float(v) for values in p.series.values() for v in values[0]})
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set(title=p.title, xlabel=p.xlabel, ylabel=p.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def grouped_bars(title: str, groups: list[str], bars: dict[str, list[float | None]],
                 errors: dict[str, list[float]] | None = None, lines: dict[str, list] | None = None,
                 ylabel: str = "clean-test accuracy (%)"):
    """Bars per group (e.g. one group per victim, one bar per attack); ``lines``: label -> one
    reference value per group (None: none), drawn as a short line across the group."""
    if not groups or not bars:
        raise ClpoisonError("a bar chart needs at least one group and one bar")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(bars)) / 2 + 2), 3.8))
    width = 0.8 / len(bars)
    for i, (label, heights) in enumerate(bars.items()):
        xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        keep = [(x, h, (errors or {}).get(label, [0] * len(heights))[j])
                for j, (x, h) in enumerate(zip(xs, heights)) if h is not None]
        if keep:
            ax.bar([k[0] for k in keep], [k[1] for k in keep], width, label=label,
                   yerr=[k[2] for k in keep], capsize=2, color=series_color(label, i))
    for label, values in (lines or {}).items():
        color, style = REFERENCE_STYLES.get(label.split(" ")[0], ("tab:purple", "--"))
        at = [(g, y) for g, y in enumerate(values) if y is not None]
        if at:
            ax.hlines([y for _, y in at], [g - 0.45 for g, _ in at], [g + 0.45 for g, _ in at],
                      colors=color, linestyles=style, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def figure_series(fig) -> dict[str, dict[str, list[list[float]]]]:
    """What ``fig`` draws, read from its artists: panel title -> label -> [[x, y], ...] (lines
    and error-bar lines: their points; horizontal references: their height at both ends; bars:
    centre and height of each bar)."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for i, ax in enumerate(fig.axes):
        panel = out.setdefault(ax.get_title() or f"panel {i}", {})
        for line in ax.get_lines():
            label = line.get_label()
            if label.startswith("_"):
                continue
            panel[label] = [[_num(x), _num(y)] for x, y in zip(line.get_xdata(), line.get_ydata())]
        for container in ax.containers:
            label = container.get_label()
            if label.startswith("_"):
                continue
            if isinstance(container, ErrorbarContainer):      # its data line is unlabelled
                line = container.lines[0]
                panel[label] = [[_num(x), _num(y)]
                                for x, y in zip(line.get_xdata(), line.get_ydata())]
                continue
            patches = getattr(container, "patches", None)
            if patches is None:
                continue
            panel[label] = [[_num(p.get_x() + p.get_width() / 2), _num(p.get_height())]
                            for p in patches]
        for coll in ax.collections:          # hlines: one segment per group
            label = coll.get_label()
            if label.startswith("_") or not hasattr(coll, "get_segments"):
                continue
            panel[label] = [[_num((s[0][0] + s[1][0]) / 2), _num(s[0][1])]
                            for s in coll.get_segments()]
    return out


def _num(v) -> float:
    v = float(v)
    return round(v, 6) if math.isfinite(v) else v


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (atomically) with its series (:func:`figure_series`) embedded."""
    path = Path(path)
    series = figure_series(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={SERIES_KEY: json.dumps(series)})
    plt.close(fig)
    return path


def read_series(path: str | Path) -> dict:
    """The series embedded by :func:`save_figure` in the PNG ``path``."""
    with Image.open(path) as im:
        text = getattr(im, "text", {}).get(SERIES_KEY)
    if text is None:
        raise ClpoisonError(f"{path} holds no clpoison series (not written by save_figure)")
    return json.loads(text)
