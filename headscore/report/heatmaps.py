"""The heatmap grid: one [layer x head] panel per task on one colour scale (the CogQA figure's layout)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..figures import literal, save_figure
from .inputs import exact_mask, task_values
from .layout import axes_grid, extra_title_height, grid_shape, is_bottom_row, panel_size, tick_positions, wrap_title

COLORBAR_LABEL = "Heads Importance"
_CMAP = "viridis"
_DIVERGING = "RdBu_r"
EXACT_NOTE = "outlined: exact (ablation/patching, not an estimate)"
"""The legend entry of the outlines drawn around exact cells."""
NO_VALUES = "no head values"
"""What a panel says when none of its task's heads has a value (else it would be blank)."""


def _default_title(scores: Any, absolute: bool) -> str:
    method = f"|{scores.method}|" if absolute else str(scores.method)
    return f"Head importance ({method}) - {literal(scores.model)}"


def draw_heatmap(ax: Any, values: np.ndarray, exact: np.ndarray | None, *, vmin: float, vmax: float,
                 diverging: bool = False, outline: float = 1.0) -> Any:
    """Draw one [L, H] map on ``ax`` (layer 0 at the bottom, NaN blank, exact cells outlined ``outline`` points
    wide); returns the image, for a colour bar."""
    image = ax.imshow(np.ma.masked_invalid(values), origin="lower", aspect="auto",
                      cmap=_DIVERGING if diverging else _CMAP, vmin=vmin, vmax=vmax, interpolation="nearest")
    if exact is not None:
        for layer, head in zip(*np.nonzero(exact), strict=True):
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black",
                                   linewidth=outline))
    return image


def build_heatmap_figure(scores: Any, *, title: str | None = None, ncols: int | None = None,
                          absolute: bool = False, label: str = COLORBAR_LABEL, diverging: bool = False) -> Figure:
    """The heatmap grid as a matplotlib Figure (Agg canvas attached); see :func:`heatmap_grid`."""
    vals = task_values(scores)
    exact = exact_mask(scores, vals.shape)
    if absolute:
        vals = np.abs(vals)
    n, num_layers, num_heads = vals.shape
    nrows, ncols = grid_shape(n, ncols)
    pw, ph = panel_size(num_layers, num_heads)
    # outline width in points: about a tenth of a cell, so small cells keep most of their colour
    outline = float(np.clip(0.1 * 72 * min(pw / num_heads, ph / num_layers), 0.4, 1.2))
    titles = [wrap_title(task, pw + 0.4, 10) for task in scores.tasks]
    # Room per panel for the title (and its second line, if any), tick labels and axis labels; plus the colour
    # bar and the suptitle.
    fig = Figure(figsize=(ncols * (pw + 0.6) + 1.1, nrows * (ph + 0.85 + extra_title_height(titles)) + 0.5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    finite = vals[np.isfinite(vals)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if diverging:  # a signed quantity: one colour per sign, white at 0
        vmax = max(abs(vmin), abs(vmax))
        vmin = -vmax
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    xticks, yticks = tick_positions(num_heads, pw), tick_positions(num_layers, ph, spacing=0.22)
    axes = axes_grid(fig, n, nrows, ncols, ph / pw)
    image = None
    for i, (ax, task_title) in enumerate(zip(axes, titles, strict=True)):
        image = draw_heatmap(ax, vals[i], None if exact is None else exact[i], vmin=vmin, vmax=vmax,
                             diverging=diverging, outline=outline)
        if not np.isfinite(vals[i]).any():  # a blank panel would read as a map of zeros or a drawing failure
            ax.text(0.5, 0.5, NO_VALUES, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.35")
        ax.set_title(task_title, fontsize=10)
        ax.set_xticks(xticks)
        ax.set_yticks(yticks)
        ax.tick_params(labelsize=7, length=2, pad=1.5)
        if is_bottom_row(i, n, ncols):
            ax.set_xlabel("Head", fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel("Layer", fontsize=9)
    cbar = fig.colorbar(image, ax=axes, shrink=0.85 if nrows > 1 else 1.0, aspect=30 if nrows > 1 else 20,
                        pad=0.02)
    cbar.set_label(label, fontsize=10)
    cbar.ax.tick_params(labelsize=8)
    fig.suptitle(_default_title(scores, absolute) if title is None else title, fontsize=12)
    if exact is not None and exact.any():
        fig.legend(handles=[Patch(fill=False, edgecolor="black", linewidth=1.0, label=EXACT_NOTE)],
                   loc="outside lower center", fontsize=8, frameon=False)
    return fig


def heatmap_grid(scores: Any, path: str | os.PathLike, *, title: str | None = None, ncols: int | None = None,
                 absolute: bool = False, label: str = COLORBAR_LABEL, diverging: bool = False) -> list[Path]:
    """Draw one [layer x head] heatmap per task and save it as PNG and PDF.

    Each panel is titled with the task name, has heads on the x axis and layers on the y axis (layer 0 at the
    bottom), integer ticks (thinned on large grids) and the ``viridis`` colour map. All panels share one colour
    scale and one colour bar labelled "Heads Importance". 1 task gives one panel, 2..4 tasks one row,
    5..8 tasks 2 rows x 4 columns, more tasks rows of 4 (``ncols`` overrides the number of columns).
    When the scores have an ``exact`` mask, each exact cell gets a thin black outline, and a legend under
    the grid says what the outlines mean. A task none of whose heads has a value gets "no head values" written
    in its panel (:func:`write_report` draws no grid at all when no task has one).

    Args:
        scores: a ``HeadScores`` (or anything with ``values`` [T, L, H], ``tasks``, ``method``, ``model``;
            optionally ``exact``, a bool [T, L, H] mask).
        path: where to write; ``.png`` / ``.pdf`` suffixes are stripped and both files are written.
        title: the figure title; by default the method and the model.
        ncols: number of panel columns (default: see above).
        absolute: show ``|values|`` instead of the signed values (e.g. for ``taylor``).
        label: the colour bar's label.
        diverging: a colour scale symmetric about 0 (``RdBu_r``: red positive, blue negative), for
            signed quantities such as specificity z-scores.

    Returns:
        The written paths, ``[<stem>.png, <stem>.pdf]``.
    """
    fig = build_heatmap_figure(scores, title=title, ncols=ncols, absolute=absolute, label=label,
                               diverging=diverging)
    return save_figure(fig, path)
