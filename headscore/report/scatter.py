"""Score against measured ablation, one point per head, one panel per task, with Spearman's rho."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..figures import literal, save_figure
from ..stats import spearman
from .inputs import ablation_values, task_values
from .layout import axes_grid, extra_title_height, grid_shape, is_bottom_row, wrap_title


def _truth_label(ablation: Any) -> str:
    """The y axis: the ground truth's quantity (a metric other than NLL, activation patching, say so)."""
    extra = getattr(ablation, "extra", None) or {}
    metric = str(extra.get("metric", "nll"))  # any JSON value a file may hold
    what = "Patching" if getattr(ablation, "method", "") == "ablation-corrupt" else "Ablation"
    change = {"nll": "loss increase", "logit-diff": "logit-diff drop", "prob": "probability drop"}.get(
        metric, f"{metric} increase")
    return f"{what} {change}"


def build_scatter_figure(scores: Any, ablation: Any, *, title: str | None = None,
                          ncols: int | None = None) -> Figure:
    """Score-vs-ablation scatter as a matplotlib Figure (Agg canvas attached); see :func:`scatter_vs_ablation`."""
    vals = task_values(scores)
    abl = ablation_values(scores, ablation)
    n, num_layers, num_heads = vals.shape
    nrows, ncols = grid_shape(n, ncols)
    side = 2.6
    titles = [wrap_title(task, side + 0.4, 10) for task in scores.tasks]
    fig = Figure(figsize=(ncols * (side + 0.7) + 0.3, nrows * (side + 0.9 + extra_title_height(titles)) + 0.5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = axes_grid(fig, n, nrows, ncols, 1.0)
    size = 12 if num_layers * num_heads <= 400 else 6
    for i, (ax, task_title) in enumerate(zip(axes, titles, strict=True)):
        x, y = vals[i].ravel(), abl[i].ravel()
        rho = spearman(x, y)
        ax.axhline(0, color="0.8", lw=0.8, zorder=0)
        ax.axvline(0, color="0.8", lw=0.8, zorder=0)
        ax.scatter(x, y, s=size, alpha=0.6, color="#3b528b", edgecolors="none")
        rho_txt = "n/a" if math.isnan(rho) else f"{rho:.3f}"
        ax.set_title(f"{task_title}\nSpearman \u03c1 = {rho_txt}", fontsize=10)
        ax.tick_params(labelsize=7, length=2, pad=1.5)
        ax.ticklabel_format(style="sci", scilimits=(-3, 4), useMathText=True)
        ax.xaxis.get_offset_text().set_fontsize(7)
        ax.yaxis.get_offset_text().set_fontsize(7)
        if is_bottom_row(i, n, ncols):
            ax.set_xlabel(f"Score ({scores.method})", fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel(_truth_label(ablation), fontsize=9)
    default = f"Score ({scores.method}) vs ablation, one point per head - {literal(scores.model)}"
    fig.suptitle(default if title is None else title, fontsize=12)
    return fig


def scatter_vs_ablation(scores: Any, ablation: Any, path: str | os.PathLike, *, title: str | None = None,
                        ncols: int | None = None) -> list[Path]:
    """Plot, per task, each head's score (x) against its measured ablation loss increase (y); PNG and PDF.

    Each panel is titled with the task name and Spearman's rho between the two (``scipy.stats.spearmanr``
    over the heads; ``n/a`` when one side is constant). The panel layout is that of :func:`heatmap_grid`.

    Args:
        scores: a ``HeadScores`` (or look-alike), [T, L, H].
        ablation: a ``HeadScores`` of an ablation run with the same tasks (any order) and grid, or a
            [T, L, H] array in the task order of ``scores``.
        path: where to write; ``.png`` / ``.pdf`` suffixes are stripped and both files are written.

    Returns:
        The written paths, ``[<stem>.png, <stem>.pdf]``.

    Raises:
        ValueError: the grids or the tasks of ``scores`` and ``ablation`` differ.
    """
    fig = build_scatter_figure(scores, ablation, title=title, ncols=ncols)
    return save_figure(fig, path)
