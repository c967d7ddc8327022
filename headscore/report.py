"""Figures and a Markdown summary of a ``HeadScores`` result.

* :func:`heatmap_grid`: one [layer x head] heatmap per task on a shared colour scale, with one colour bar
  labelled "Heads Importance" (the layout of the CogQA "Cognitive Mirrors" figure), as PNG and PDF.
* :func:`scatter_vs_ablation`: per task, score against measured ablation loss increase, with Spearman's rho.
* :func:`markdown_summary`: top-k heads per task and the agreement with ablation, as Markdown.
* :func:`write_report`: all of the above into one folder.

Everything is drawn on :class:`matplotlib.figure.Figure` with an Agg canvas, never through ``pyplot``, so
the caller's matplotlib backend is left alone. Files are written atomically (temporary file, then a rename).

The functions are duck-typed: ``scores`` needs ``values`` and ``stderr`` ([T, L, H] tensors or arrays),
``counts`` ([T]), ``tasks``, ``method`` and ``model``; ``ablation`` is such an object or a bare [T, L, H] array.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .compare import spearman
from .results import atomic_write
from .text import markdown_text

__all__ = ["COLORBAR_LABEL", "REPORT_FILES", "heatmap_grid", "markdown_summary", "scatter_vs_ablation", "write_report"]

COLORBAR_LABEL = "Heads Importance"
DPI = 150
_CMAP = "viridis"
_IMAGE_SUFFIXES = (".png", ".pdf")
REPORT_FILES = ("heatmaps.png", "heatmaps.pdf", "scatter.png", "scatter.pdf", "summary.md")
"""The files :func:`write_report` may write into its directory."""


# --------------------------------------------------------------------------------------------------- inputs


def _array(x: Any, name: str) -> np.ndarray:
    """A float64 numpy copy of a tensor / array-like."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be [tasks, layers, heads], got shape {tuple(arr.shape)}")
    return arr


def _values(scores: Any) -> np.ndarray:
    vals = _array(scores.values, "scores.values")
    if vals.shape[0] == 0:
        raise ValueError("scores has no tasks to report")
    if len(scores.tasks) != vals.shape[0]:
        raise ValueError(f"scores has {len(scores.tasks)} task names but {vals.shape[0]} rows of values")
    return vals


def _stderr(scores: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    se = getattr(scores, "stderr", None)
    if se is None:
        return None
    se = _array(se, "scores.stderr")
    if se.shape != shape:
        raise ValueError(f"scores.stderr has shape {se.shape} but values have shape {shape}")
    return se


def _counts(scores: Any) -> list[int] | None:
    counts = getattr(scores, "counts", None)
    if counts is None:
        return None
    if hasattr(counts, "tolist"):
        counts = counts.tolist()
    return [int(c) for c in counts]


def _ablation_values(scores: Any, ablation: Any) -> np.ndarray:
    """The ablation map as [T, L, H] in the task order of ``scores``; ValueError when they do not match."""
    vals = _values(scores)
    abl_tasks = getattr(ablation, "tasks", None)
    attr = getattr(ablation, "values", None)  # a HeadScores; torch.Tensor.values is a method, not data
    abl = _array(ablation if attr is None or callable(attr) else attr, "ablation values")
    if abl.shape[1:] != vals.shape[1:]:
        raise ValueError(f"ablation is {abl.shape[1]} layers x {abl.shape[2]} heads but scores are "
                         f"{vals.shape[1]} layers x {vals.shape[2]} heads")
    if abl_tasks is not None:
        abl_tasks = list(abl_tasks)
        if len(abl_tasks) != abl.shape[0]:
            raise ValueError(f"ablation has {len(abl_tasks)} task names but {abl.shape[0]} rows of values")
        tasks = list(scores.tasks)
        if abl_tasks != tasks:
            if sorted(abl_tasks) != sorted(tasks) or len(set(tasks)) != len(tasks):
                raise ValueError(f"scores and ablation have different tasks: {tasks} vs {abl_tasks}")
            abl = abl[[abl_tasks.index(t) for t in tasks]]  # same tasks in another order
    elif abl.shape[0] != vals.shape[0]:
        raise ValueError(f"ablation has {abl.shape[0]} tasks but scores have {vals.shape[0]}")
    return abl


# --------------------------------------------------------------------------------------------------- layout


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


def _tick_positions(n: int, inches: float, spacing: float | None = None) -> np.ndarray:
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


def _panel_size(num_layers: int, num_heads: int) -> tuple[float, float]:
    """(width, height) of one heatmap panel in inches, following the grid's aspect (clamped to 1:2 .. 2:1)."""
    ratio = min(max(num_layers / max(num_heads, 1), 0.5), 2.0)  # height / width
    longest = 3.0
    return (longest / ratio, longest) if ratio >= 1 else (longest, longest * ratio)


def _wrap(title: str, width_in: float, fontsize: float) -> str:
    chars = max(8, int(width_in * 72 / (0.55 * fontsize)))
    return textwrap.fill(str(title), chars, max_lines=2, placeholder="...")


def _axes_grid(fig: Figure, n: int, nrows: int, ncols: int, box_aspect: float | None) -> list:
    """The ``n`` used axes of an nrows x ncols grid (row-major); unused cells stay empty."""
    gs = fig.add_gridspec(nrows, ncols)
    axes = []
    for i in range(n):
        ax = fig.add_subplot(gs[i // ncols, i % ncols])
        if box_aspect is not None:
            ax.set_box_aspect(box_aspect)
        axes.append(ax)
    return axes


def _is_bottom(i: int, n: int, ncols: int) -> bool:
    """True when panel ``i`` has no panel below it (it carries the x label)."""
    return i + ncols >= n


# --------------------------------------------------------------------------------------------------- saving


def _stem(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix.lower() in _IMAGE_SUFFIXES else path


def _save_atomic(fig: Figure, path: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI)
    return atomic_write(path, buf.getvalue())


def _save_png_pdf(fig: Figure, path: str | os.PathLike) -> list[Path]:
    stem = _stem(path)
    png = _save_atomic(fig, stem.with_name(stem.name + ".png"), "png")
    fig.set_layout_engine("none")  # keep the layout just computed: the PDF does not redo it
    return [png, _save_atomic(fig, stem.with_name(stem.name + ".pdf"), "pdf")]


# --------------------------------------------------------------------------------------------------- heatmaps


def _default_title(scores: Any, absolute: bool) -> str:
    method = f"|{scores.method}|" if absolute else str(scores.method)
    return f"Head importance ({method}) - {scores.model}"


def _build_heatmap_figure(scores: Any, *, title: str | None = None, ncols: int | None = None,
                          absolute: bool = False) -> Figure:
    """The heatmap grid as a matplotlib Figure (Agg canvas attached); see :func:`heatmap_grid`."""
    vals = _values(scores)
    if absolute:
        vals = np.abs(vals)
    n, num_layers, num_heads = vals.shape
    nrows, ncols = grid_shape(n, ncols)
    pw, ph = _panel_size(num_layers, num_heads)
    # Room per panel for the title, tick labels and axis labels; plus the colour bar and the suptitle.
    fig = Figure(figsize=(ncols * (pw + 0.6) + 1.1, nrows * (ph + 0.85) + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    finite = vals[np.isfinite(vals)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    xticks, yticks = _tick_positions(num_heads, pw), _tick_positions(num_layers, ph, spacing=0.22)
    axes = _axes_grid(fig, n, nrows, ncols, ph / pw)
    image = None
    for i, (ax, task) in enumerate(zip(axes, scores.tasks, strict=True)):
        image = ax.imshow(np.ma.masked_invalid(vals[i]), origin="lower", aspect="auto", cmap=_CMAP,
                          vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(_wrap(task, pw + 0.4, 10), fontsize=10)
        ax.set_xticks(xticks)
        ax.set_yticks(yticks)
        ax.tick_params(labelsize=7, length=2, pad=1.5)
        if _is_bottom(i, n, ncols):
            ax.set_xlabel("Head", fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel("Layer", fontsize=9)
    cbar = fig.colorbar(image, ax=axes, shrink=0.85 if nrows > 1 else 1.0, aspect=30 if nrows > 1 else 20,
                        pad=0.02)
    cbar.set_label(COLORBAR_LABEL, fontsize=10)
    cbar.ax.tick_params(labelsize=8)
    fig.suptitle(_default_title(scores, absolute) if title is None else title, fontsize=12)
    return fig


def heatmap_grid(scores: Any, path: str | os.PathLike, *, title: str | None = None, ncols: int | None = None,
                 absolute: bool = False) -> list[Path]:
    """Draw one [layer x head] heatmap per task and save it as PNG and PDF.

    Each panel is titled with the task name, has heads on the x axis and layers on the y axis (layer 0 at the
    bottom), integer ticks (thinned on large grids) and the ``viridis`` colour map. All panels share one colour
    scale and one colour bar labelled "Heads Importance". 1 task gives one panel, 2..4 tasks one row,
    5..8 tasks 2 rows x 4 columns, more tasks rows of 4 (``ncols`` overrides the number of columns).

    Args:
        scores: a ``HeadScores`` (or anything with ``values`` [T, L, H], ``tasks``, ``method``, ``model``).
        path: where to write; ``.png`` / ``.pdf`` suffixes are stripped and both files are written.
        title: the figure title; by default the method and the model.
        ncols: number of panel columns (default: see above).
        absolute: show ``|values|`` instead of the signed values (e.g. for ``taylor``).

    Returns:
        The written paths, ``[<stem>.png, <stem>.pdf]``.
    """
    fig = _build_heatmap_figure(scores, title=title, ncols=ncols, absolute=absolute)
    return _save_png_pdf(fig, path)


# --------------------------------------------------------------------------------------------------- scatter


def _build_scatter_figure(scores: Any, ablation: Any, *, title: str | None = None,
                          ncols: int | None = None) -> Figure:
    """Score-vs-ablation scatter as a matplotlib Figure (Agg canvas attached); see :func:`scatter_vs_ablation`."""
    vals = _values(scores)
    abl = _ablation_values(scores, ablation)
    n, num_layers, num_heads = vals.shape
    nrows, ncols = grid_shape(n, ncols)
    side = 2.6
    fig = Figure(figsize=(ncols * (side + 0.7) + 0.3, nrows * (side + 0.9) + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = _axes_grid(fig, n, nrows, ncols, 1.0)
    size = 12 if num_layers * num_heads <= 400 else 6
    for i, (ax, task) in enumerate(zip(axes, scores.tasks, strict=True)):
        x, y = vals[i].ravel(), abl[i].ravel()
        rho = spearman(x, y)
        ax.axhline(0, color="0.8", lw=0.8, zorder=0)
        ax.axvline(0, color="0.8", lw=0.8, zorder=0)
        ax.scatter(x, y, s=size, alpha=0.6, color="#3b528b", edgecolors="none")
        rho_txt = "n/a" if math.isnan(rho) else f"{rho:.3f}"
        ax.set_title(f"{_wrap(task, side + 0.4, 10)}\nSpearman \u03c1 = {rho_txt}", fontsize=10)
        ax.tick_params(labelsize=7, length=2, pad=1.5)
        ax.ticklabel_format(style="sci", scilimits=(-3, 4), useMathText=True)
        ax.xaxis.get_offset_text().set_fontsize(7)
        ax.yaxis.get_offset_text().set_fontsize(7)
        if _is_bottom(i, n, ncols):
            ax.set_xlabel(f"Score ({scores.method})", fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel("Ablation loss increase", fontsize=9)
    default = f"Score ({scores.method}) vs ablation, one point per head - {scores.model}"
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
    fig = _build_scatter_figure(scores, ablation, title=title, ncols=ncols)
    return _save_png_pdf(fig, path)


# --------------------------------------------------------------------------------------------------- markdown


def _md(text: Any) -> str:
    """Make user text (task and model names) literal Markdown, safe inside a table cell."""
    return markdown_text(text)


def _num(x: float, digits: int = 4) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}g}"


def _comparison_row(entry: Any) -> dict[str, float]:
    if hasattr(entry, "as_dict"):
        entry = entry.as_dict()
    if not isinstance(entry, Mapping):
        entry = {key: getattr(entry, key) for key in ("spearman", "kendall", "topk_overlap")}
    return {key: float(entry[key]) for key in ("spearman", "kendall", "topk_overlap")}


def markdown_summary(scores: Any, *, k: int = 10, ablation: Any = None,
                     comparison: Mapping[str, Any] | None = None, images: Sequence[str] = ()) -> str:
    """A Markdown report: model, method and examples per task; per task the top-k heads; agreement table.

    Heads are ranked by value, largest first (for signed methods such as ``taylor`` the largest positive
    value is the most important). Each row gives rank, layer, head, ``score ± stderr`` and, when
    ``ablation`` is given, the measured ablation value of that head.

    Args:
        scores: a ``HeadScores`` (or look-alike).
        k: heads listed per task (at most L x H).
        ablation: optional ablation result (see :func:`scatter_vs_ablation`) to show next to each head.
        comparison: optional ``{task: {"spearman": ..., "kendall": ..., "topk_overlap": ...}}`` (values may
            also be objects with those attributes, e.g. ``headscore.compare.Agreement``), shown as a table.
        images: relative paths of images to embed after the header (e.g. ``["heatmaps.png"]``).
    """
    vals = _values(scores)
    n, num_layers, num_heads = vals.shape
    se = _stderr(scores, vals.shape)
    abl = None if ablation is None else _ablation_values(scores, ablation)
    counts = _counts(scores)
    k = max(1, min(int(k), num_layers * num_heads))

    lines = [f"# Head importance: {_md(scores.model)}", "",
             f"- **Model:** {_md(scores.model)}",
             f"- **Method:** {_md(scores.method)}",
             f"- **Grid:** {num_layers} layers x {num_heads} heads",
             f"- **Tasks:** {n}"]
    if counts is not None:
        if len(set(counts)) == 1:
            lines.append(f"- **Examples per task:** {counts[0]}")
        else:
            lines.append("- **Examples per task:** " + ", ".join(
                f"{_md(t)}: {c}" for t, c in zip(scores.tasks, counts, strict=True)))
    lines.append("")
    for img in images:
        lines += [f"![{Path(img).stem}]({img})", ""]

    if comparison:
        lines += ["## Agreement with ablation", "",
                  "| Task | Spearman | Kendall | Top-k overlap |", "|---|---:|---:|---:|"]
        for task, entry in comparison.items():
            row = _comparison_row(entry)
            lines.append(f"| {_md(task)} | {row['spearman']:.3f} | {row['kendall']:.3f} | "
                         f"{row['topk_overlap']:.2f} |")
        lines.append("")

    lines += [f"## Top {k} heads per task", ""]
    for i, task in enumerate(scores.tasks):
        flat = vals[i].ravel()
        order = np.argsort(-np.nan_to_num(flat, nan=-np.inf), kind="stable")[:k]
        heading = f"### {_md(task)}"
        if counts is not None:
            heading += f" ({counts[i]} examples)"
        header = "| Rank | Layer | Head | Score ± stderr |"
        rule = "|---:|---:|---:|---:|"
        if abl is not None:
            header += " Ablation |"
            rule += "---:|"
        lines += [heading, "", header, rule]
        for rank, idx in enumerate(order, start=1):
            layer, head = divmod(int(idx), num_heads)
            cell = _num(flat[idx]) if se is None else f"{_num(flat[idx])} ± {_num(se[i, layer, head], 2)}"
            row = f"| {rank} | {layer} | {head} | {cell} |"
            if abl is not None:
                row += f" {_num(abl[i, layer, head])} |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- all


def write_report(scores: Any, out_dir: str | os.PathLike, *, ablation: Any = None,
                 comparison: Mapping[str, Any] | None = None, k: int = 10) -> dict[str, Path]:
    """Write a full report into ``out_dir`` (created if needed).

    Files: ``heatmaps.png`` / ``heatmaps.pdf`` (:func:`heatmap_grid`), ``scatter.png`` / ``scatter.pdf``
    when ``ablation`` is given (:func:`scatter_vs_ablation`) and ``summary.md`` (:func:`markdown_summary`,
    linking the heatmap image, and the scatter when drawn).

    Returns:
        ``{"heatmaps_png", "heatmaps_pdf", ["scatter_png", "scatter_pdf",] "summary"}`` -> path.

    Raises:
        ValueError: ``ablation`` does not match ``scores`` (checked before anything is written).
    """
    if ablation is not None:
        _ablation_values(scores, ablation)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, pdf = heatmap_grid(scores, out / "heatmaps")
    paths = {"heatmaps_png": png, "heatmaps_pdf": pdf}
    images = ["heatmaps.png"]
    if ablation is not None:
        paths["scatter_png"], paths["scatter_pdf"] = scatter_vs_ablation(scores, ablation, out / "scatter")
        images.append("scatter.png")
    text = markdown_summary(scores, k=k, ablation=ablation, comparison=comparison, images=images)
    paths["summary"] = atomic_write(out / "summary.md", text.encode("utf-8"))
    return paths
