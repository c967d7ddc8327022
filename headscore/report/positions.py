"""Head x position heatmaps: for each task, its top heads (rows) against the named token positions (columns)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..figures import literal, save_figure
from .inputs import head_order
from .layout import axes_grid, extra_title_height, grid_shape, wrap_title

POSITION_LABEL = "score at position"


def top_heads(values: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads of an [L, H] map with the largest |value| (NaN last), largest first: the report's one
    ranking (:func:`.inputs.head_order`) of the magnitudes. Heads whose value is NaN (a layer without such a
    head) are left out."""
    flat = np.abs(values).ravel()
    order = [i for i in head_order(flat) if np.isfinite(flat[i])][:k]
    return [(int(i) // values.shape[1], int(i) % values.shape[1]) for i in order]


def build_position_figure(scores: Any, *, k: int = 10, tasks: Sequence[str] | None = None,
                          tokens: Mapping[str, Sequence[str]] | None = None, title: str | None = None) -> Figure:
    """The figure of :func:`position_heatmaps` (Agg canvas attached)."""
    if getattr(scores, "positions", None) is None:
        raise ValueError("these scores have no per-position maps (score or ablate with per-position)")
    tasks = list(scores.tasks if tasks is None else tasks)
    values = np.asarray(scores.position_values, dtype=np.float64)
    counts = np.asarray(scores.position_counts)
    rows = [scores.tasks.index(t) for t in tasks]
    shown = [np.nonzero(counts[r] > 0)[0] for r in rows]  # positions the task has tokens at
    panels = []
    for r, cols in zip(rows, shown, strict=True):
        heads = top_heads(np.asarray(scores.values[r], dtype=np.float64), k)
        panels.append((heads, values[r][[h[0] for h in heads], [h[1] for h in heads]][:, cols]))
    finite = np.concatenate([p[np.isfinite(p)].ravel() for _, p in panels] + [np.zeros(1)])
    vmax = float(np.abs(finite).max()) or 1.0
    n = len(tasks)
    nrows, ncols = grid_shape(n, min(n, 2))
    widest = max(len(c) for c in shown)
    pw, ph = max(3.0, 0.32 * widest + 0.8), max(2.0, 0.28 * k + 0.6)
    titles = [wrap_title(task, pw, 10) for task in tasks]
    fig = Figure(figsize=(ncols * (pw + 0.8) + 1.1, nrows * (ph + 1.2 + extra_title_height(titles)) + 0.5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = axes_grid(fig, n, nrows, ncols, None)
    image = None
    for ax, task, task_title, (heads, grid), cols in zip(axes, tasks, titles, panels, shown, strict=True):
        image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        names = [scores.positions[c] for c in cols]
        if tokens is not None and task in tokens:
            words = list(tokens[task])
            names = [f"{words[i]!r}"[1:-1] + f"  {p}" if i < len(words) else p for i, p in enumerate(names)]
        ax.set_xticks(range(len(cols)), [literal(name) for name in names], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(heads)), [f"L{layer}.H{head}" for layer, head in heads], fontsize=7)
        ax.set_title(task_title, fontsize=10)
        ax.set_xlabel("position (from the end of the prompt)", fontsize=8)
    cbar = fig.colorbar(image, ax=axes, shrink=0.9, pad=0.02)
    cbar.set_label(POSITION_LABEL, fontsize=9)
    metric = getattr(scores, "extra", {}).get("metric", "nll")
    fig.suptitle(title or f"Top {k} heads by position ({scores.method}, metric {metric}) - {literal(scores.model)}",
                 fontsize=11)
    return fig


def position_heatmaps(scores: Any, path: str | os.PathLike, *, k: int = 10, tasks: Sequence[str] | None = None,
                      tokens: Mapping[str, Sequence[str]] | None = None, title: str | None = None) -> list[Path]:
    """Per task, a heatmap of its ``k`` heads with the largest |score| (rows, largest first) against the
    positions its examples have tokens at (columns), on one colour scale symmetric about 0; PNG and PDF.

    Args:
        scores: a ``HeadScores`` with per-position maps (``positions``, ``position_values``,
            ``position_counts``).
        path: where to write (``.png``/``.pdf`` stripped; both written).
        k: heads per task.
        tasks: which tasks, in order (default all).
        tokens: optional per task the tokens of one example, one per shown position (tick labels).
        title: the figure title (default: method, metric, model).
    """
    return save_figure(build_position_figure(scores, k=k, tasks=tasks, tokens=tokens, title=title), path)
