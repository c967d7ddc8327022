"""Panel grids shared by the heatmap and scatter figures: rows and columns, panel sizes, ticks, titles."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..figures import literal


def grid_shape(n: int, ncols: int | None = None) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels: 1 -> 1x1, 2..4 -> one row, 5..8 -> 2x4, more -> 4 columns."""
    if n < 1:
        raise ValueError("need at least one panel")
    if ncols is None:
        ncols = n if n <= 4 else 4
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    ncols = min(ncols, n)
    return math.ceil(n / ncols), ncols


def tick_positions(n: int, inches: float, spacing: float | None = None) -> np.ndarray:
    """Integer ticks 0, s, 2s, ... with s in 1, 2, 5, 10, ... so that labels are ``spacing`` inches apart or more.

    The default spacing suits 7-point labels side by side (it grows with the number of digits).
    """
    if spacing is None:
        spacing = 0.09 + 0.06 * len(str(max(n - 1, 0)))
    max_ticks = max(2, int(inches / spacing))
    step = 1
    for base in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        step = base
        if math.ceil(n / base) <= max_ticks:
            break
    return np.arange(0, n, step)


def panel_size(num_layers: int, num_heads: int) -> tuple[float, float]:
    """(width, height) of one heatmap panel in inches, following the grid's aspect (clamped to 1:2 .. 2:1)."""
    ratio = min(max(num_layers / max(num_heads, 1), 0.5), 2.0)  # height / width
    longest = 3.0
    return (longest / ratio, longest) if ratio >= 1 else (longest, longest * ratio)


def text_points(text: str, fontsize: float) -> float:
    """The width in points of ``text`` drawn in matplotlib's default font at ``fontsize`` points."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    return float(TextToPath().get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)[0])


def wrap_title(title: str, width_in: float, fontsize: float) -> str:
    """``title`` in at most two lines of ``width_in`` inches at ``fontsize`` points, measured in the font it is
    drawn in: broken after a space, ``_``, ``-`` or ``/`` (``high_school_ / macroeconomics``, not
    ``macroeconomi / cs``), inside a word only where it alone is wider than a line; what does not fit ends in
    ``...``. Drawn as written (:func:`~headscore.figures.literal`)."""
    room = width_in * 72

    def fits(line: str) -> bool:
        return text_points(line.rstrip(), fontsize) <= room

    text = " ".join(str(title).split())
    pieces = [piece for piece in re.findall(r"[^ _/-]*(?:[_/-]+ ?| |$)", text) if piece]
    lines = [""]
    for piece in pieces:
        if lines[-1] and not fits(lines[-1] + piece):
            lines.append("")
        lines[-1] += piece
        while not fits(lines[-1]) and len(lines[-1].rstrip()) > 1:  # a word wider than a line: cut it
            cut = max(k for k in range(1, len(lines[-1])) if k == 1 or fits(lines[-1][:k]))
            lines[-1], rest = lines[-1][:cut], lines[-1][cut:]
            lines.append(rest)
    lines = [line.rstrip() for line in lines if line.strip()]
    if len(lines) > 2:
        second = text[len(lines[0]):].strip()
        while len(second) > 1 and not fits(second + "..."):
            second = second[:-1]
        lines = [lines[0], second.rstrip() + "..."]
    return literal("\n".join(lines))


TITLE_LINE_IN = 10 * 1.2 / 72
"""The height of one more line of a 10-point panel title, in inches (what a figure grows by per row when a
task name takes two lines: :func:`extra_title_height`)."""


def extra_title_height(titles: Sequence[str]) -> float:
    """Inches a row of panels needs above its panels for wrapped ``titles`` beyond their first line."""
    return TITLE_LINE_IN * max((title.count("\n") for title in titles), default=0)


def axes_grid(fig: Figure, n: int, nrows: int, ncols: int, box_aspect: float | None) -> list:
    """The ``n`` used axes of an nrows x ncols grid (row-major); unused cells stay empty."""
    gs = fig.add_gridspec(nrows, ncols)
    axes = []
    for i in range(n):
        ax = fig.add_subplot(gs[i // ncols, i % ncols])
        if box_aspect is not None:
            ax.set_box_aspect(box_aspect)
        axes.append(ax)
    return axes


def is_bottom_row(i: int, n: int, ncols: int) -> bool:
    """True when panel ``i`` has no panel below it (it carries the x label)."""
    return i + ncols >= n
