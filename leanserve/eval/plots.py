"""PNG plots for the eval commands (matplotlib, headless Agg backend).

Every plot is drawn from the results JSON it sits beside, so a plot can be redrawn without
re-running the evaluation.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Series:
    """One labelled set of points; `xerr`/`yerr` are symmetric error bars (e.g. std over seeds)."""
    label: str
    x: Sequence[float]
    y: Sequence[float]
    xerr: Sequence[float] | None = None
    yerr: Sequence[float] | None = None
    point_labels: Sequence[str] = field(default_factory=list)  # text beside each point (e.g. "4 steps")
    fmt: str = "-o"  # line_plot's line and marker style (e.g. "--s", ":" for a reference line)


def _figure():
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    return plt, *plt.subplots(figsize=(7, 5), dpi=120)


def _save(plt, fig, ax, path: str | Path, title: str, xlabel: str, ylabel: str):
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def scatter_plot(series: list[Series], path: str | Path, *, title: str, xlabel: str, ylabel: str):
    """Points with error bars, one marker/colour per series, optional per-point text."""
    plt, fig, ax = _figure()
    for s in series:
        ax.errorbar(s.x, s.y, xerr=s.xerr, yerr=s.yerr, fmt="o", capsize=2, label=s.label, alpha=0.85)
        for x, y, text in zip(s.x, s.y, s.point_labels):
            ax.annotate(text, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    _save(plt, fig, ax, path, title, xlabel, ylabel)


def line_plot(series: list[Series], path: str | Path, *, title: str, xlabel: str, ylabel: str,
              log_x: bool = False, log_y: bool = False):
    """Lines with markers and error bars (e.g. FD against NFE), one per series."""
    plt, fig, ax = _figure()
    # the default cycle has 10 colours; an eval with more lines would reuse them for different methods
    palette = plt.get_cmap("tab20").colors
    colours = [palette[i % len(palette)] for i in range(len(series))] if len(series) > 10 else [None] * len(series)
    for s, colour in zip(series, colours):
        ax.errorbar(s.x, s.y, yerr=s.yerr, fmt=s.fmt, capsize=2, label=s.label, markersize=3, color=colour)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    _save(plt, fig, ax, path, title, xlabel, ylabel)
