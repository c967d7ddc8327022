"""What a notebook shows: a ``HeadScores`` as HTML (its provenance, a table of tasks and the heatmap grid) and
``compare``'s agreements as a table; and the figures of :meth:`HeadScores.plot`.

The grid of the HTML view is drawn straight from the values, one small PNG per task (each cell a block of
pixels of the ``viridis`` colour, on one colour scale for all tasks, exact cells outlined in black, absent
heads blank), with the titles, colour bar and table in HTML: a matplotlib figure of 8 tasks of 32 x 32 heads
takes seconds to lay out and draw on 2 CPU cores, this takes milliseconds and some 20 KB per task
(``benchmarks/RESULTS.md``). ``scores.plot()`` draws the full figure when it is wanted.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import HeadscoreError

PANEL_PX = 160
"""About how many pixels the longer side of a task's panel gets (each cell a block of whole pixels; the panel's
aspect follows the grid's, clamped to 1:2 .. 2:1 as the report's panels are)."""
MAX_TOP = 3
"""Top heads listed per task in the HTML table."""
_CMAP = "viridis"


def _png(rgba: np.ndarray) -> bytes:
    from PIL import Image  # matplotlib's own dependency

    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _img(png: bytes, width: int, height: int, title: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}" alt="{html.escape(title)}" '
            f'title="{html.escape(title)}" style="image-rendering: pixelated; border: 1px solid #bbb">')


def cell_pixels(num_layers: int, num_heads: int) -> tuple[int, int]:
    """(height, width) of a cell in pixels (each 2 to 16), so that a panel's longer side is about
    :data:`PANEL_PX` and its aspect that of the grid, clamped to 1:2 .. 2:1."""
    ratio = min(max(num_layers / max(num_heads, 1), 0.5), 2.0)  # height / width
    height, width = (PANEL_PX, PANEL_PX / ratio) if ratio >= 1 else (PANEL_PX * ratio, PANEL_PX)
    def side(pixels: float, cells: int) -> int:
        return int(min(16, max(2, round(pixels / max(cells, 1)))))

    return side(height, num_layers), side(width, num_heads)


def panel_rgba(values: np.ndarray, exact: np.ndarray | None, *, vmin: float, vmax: float,
               cell: tuple[int, int]) -> np.ndarray:
    """An [L, H] map as an RGBA uint8 image [L*h, H*w, 4] for ``cell`` = (h, w): layer 0 at the bottom, each
    cell h x w pixels of its viridis colour on the scale vmin..vmax, NaN transparent, exact cells outlined."""
    from matplotlib import colormaps

    scaled = (values - vmin) / (vmax - vmin) if vmax > vmin else np.full_like(values, 0.5)
    rgba = colormaps[_CMAP](np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0), bytes=True)
    rgba[np.isnan(values)] = 0
    py, px = cell
    big = np.repeat(np.repeat(rgba[::-1], py, axis=0), px, axis=1)
    if exact is not None and exact.any() and min(cell) >= 3:  # scores_html gives such cells 4 pixels at least
        border = np.zeros(cell, dtype=bool)
        border[[0, -1], :] = True
        border[:, [0, -1]] = True
        ring = np.repeat(np.repeat(exact[::-1], py, axis=0), px, axis=1) & np.tile(border, exact.shape)
        big[ring] = (0, 0, 0, 255)
    return np.ascontiguousarray(big)


def colorbar_rgba(width: int = 160, height: int = 10) -> np.ndarray:
    """The viridis scale, low to high from left to right, as an RGBA uint8 image."""
    from matplotlib import colormaps

    row = colormaps[_CMAP](np.linspace(0.0, 1.0, width), bytes=True)
    return np.ascontiguousarray(np.repeat(row[None], height, axis=0))


def _number(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


def _top_heads(values: np.ndarray, k: int) -> str:
    flat = values.ravel()
    order = np.argsort(-np.nan_to_num(flat, nan=-np.inf), kind="stable")[:k]
    heads = values.shape[1]
    return ", ".join(f"L{i // heads}.H{i % heads} ({_number(float(flat[i]))})" for i in order
                     if not math.isnan(flat[i]))


def scores_html(scores: Any) -> str:
    """The HTML a notebook shows for a ``HeadScores``: method, model, shape, examples, the exact-head count
    (when the scores have an ``exact`` mask), one heatmap panel per task on one colour scale with a colour bar,
    and a table of tasks (examples, top heads, exact heads)."""
    vals = scores.values.detach().cpu().double().numpy()
    exact = None if scores.exact is None else scores.exact.detach().cpu().numpy()
    t, num_layers, num_heads = vals.shape
    finite = vals[np.isfinite(vals)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    counts = [int(c) for c in scores.counts.tolist()]
    e = html.escape
    facts = [f"method <code>{e(str(scores.method))}</code>", f"model <code>{e(str(scores.model))}</code>",
             f"{t} task{'s' * (t != 1)} &times; {num_layers} layers &times; {num_heads} heads",
             f"{sum(counts)} examples"]
    if exact is not None:
        facts.append(f"{int(exact.sum())} exact head values (outlined), the rest estimates")
    if scores.positions is not None:
        facts.append(f"per-position maps at {len(scores.positions)} positions")
    if scores.example_values is not None:
        facts.append(f"{int(scores.example_values.shape[0])} examples' own values kept")
    cell = cell_pixels(num_layers, num_heads)
    if exact is not None and exact.any():  # an outline and its cell's colour inside need 4 pixels a side
        cell = (max(cell[0], 4), max(cell[1], 4))  # (a 64 x 40 grid has 2: no outline was drawn)
    w, h = num_heads * cell[1], num_layers * cell[0]
    panels = []
    for i, task in enumerate(scores.tasks):
        png = _png(panel_rgba(vals[i], None if exact is None else exact[i], vmin=vmin, vmax=vmax, cell=cell))
        hint = f"{task}: layers 0 (bottom) to {num_layers - 1}, heads 0 (left) to {num_heads - 1}"
        panels.append(f'<figure style="margin: 0; text-align: center; max-width: {max(w, 120) + 4}px">'
                      f'<figcaption style="font-size: 12px; overflow-wrap: anywhere">{e(task)}</figcaption>'
                      f"{_img(png, w, h, hint)}</figure>")
    bar = _img(_png(colorbar_rgba()), 160, 10, "colour scale")
    rows = []
    for i, task in enumerate(scores.tasks):
        cells = [e(task), str(counts[i]), e(_top_heads(vals[i], MAX_TOP))]
        if exact is not None:
            cells.append(str(int(exact[i].sum())))
        rows.append("<tr>" + "".join(f'<td style="text-align: left">{c}</td>' for c in cells) + "</tr>")
    head = ["task", "examples", f"top {MAX_TOP} heads (L.H, score)"] + (["exact heads"] if exact is not None else [])
    return ('<div class="headscore-scores" style="font-size: 13px">'
            f"<div><b>HeadScores</b>: {' &middot; '.join(facts)}</div>"
            f'<div style="display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-end; margin: 6px 0">'
            f"{''.join(panels)}</div>"
            f'<div style="font-size: 12px">{_number(vmin)} {bar} {_number(vmax)} &nbsp; '
            f"score ({e(str(scores.method))}); rows: layers, 0 at the bottom; columns: heads, 0 at the left"
            f"{'; outlined: exact (ablation/patching, not an estimate)' if exact is not None else ''}</div>"
            f"{_table(head, rows)}</div>")


def _table(head: list[str], rows: list[str]) -> str:
    cells = "".join(f'<th style="text-align: left">{html.escape(h)}</th>' for h in head)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def agreements_html(agreements: Mapping[str, Any]) -> str:
    """An HTML table of ``compare``'s result: per task Spearman, Kendall and top-k overlap."""
    rows = []
    for task, a in agreements.items():
        cells = [html.escape(task), _number(a.spearman), _number(a.kendall), f"{_number(a.topk_overlap)} (k={a.k})"]
        rows.append("<tr>" + "".join(f'<td style="text-align: left">{c}</td>' for c in cells) + "</tr>")
    return _table(["task", "Spearman", "Kendall", "top-k overlap"], rows)


def plot_scores(scores: Any, task: str | None = None, ax: Any = None, *, positions: bool = False) -> Any:
    """The figure of :meth:`HeadScores.plot` (see there)."""
    from .report.heatmaps import COLORBAR_LABEL, build_heatmap_figure, draw_heatmap
    from .report.positions import build_position_figure

    if task is not None:
        scores.task(task)  # HeadscoreError naming the tasks when there is no such task
    if positions:
        if ax is not None:
            raise HeadscoreError("plot(positions=True) draws its own figure (one panel per task); leave out ax")
        if scores.positions is None:
            raise HeadscoreError("these scores have no per-position maps (score with per_position=True)")
        return build_position_figure(scores, tasks=None if task is None else [task])
    if ax is None:
        return build_heatmap_figure(scores if task is None else scores.select([task]))
    if task is None:
        if len(scores.tasks) != 1:
            raise HeadscoreError(f"plot(ax=...) draws one task; name it: plot(task=..., ax=ax) with one of "
                                 f"{', '.join(scores.tasks)}")
        task = scores.tasks[0]
    row = scores.tasks.index(task)
    vals = scores.values[row].detach().cpu().double().numpy()
    finite = vals[np.isfinite(vals)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    exact = None if scores.exact is None else scores.exact[row].detach().cpu().numpy()
    image = draw_heatmap(ax, vals, exact, vmin=vmin, vmax=vmax)
    ax.set_title(task)
    ax.set_xlabel("Head")
    ax.set_ylabel("Layer")
    ax.figure.colorbar(image, ax=ax, label=COLORBAR_LABEL)
    return ax.figure
