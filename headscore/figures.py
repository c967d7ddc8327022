"""Saving figures: every figure headscore draws is written as PNG and PDF, atomically, at :data:`DPI`.

This module does not import matplotlib: it only calls ``fig.savefig``, so importing it stays cheap.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .output_files import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["DPI", "literal", "save_figure"]

DPI = 150
_IMAGE_SUFFIXES = (".png", ".pdf")


def literal(text: object) -> str:
    """``text`` as matplotlib draws it as written: each ``$`` escaped (two of them open mathtext, so a task named
    ``cost in $$`` or ``$5 to $10`` stopped the whole report with a parse error, or was typeset)."""
    return str(text).replace("$", r"\$")


def _stem(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix.lower() in _IMAGE_SUFFIXES else path


def _save_atomic(fig: Figure, path: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI)
    return atomic_write(path, buf.getvalue())


FIT_PAD_IN = 0.04
"""Inches of margin a figure keeps around what it draws once :func:`fit_to_contents` has grown it."""


def _overflow(fig: Figure) -> tuple[float, float]:
    """Inches (width, height) by which ``fig``'s drawing, laid out by its layout engine, is too small: text
    beyond an edge, or a panel title running into the figure's title (suptitle)."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    box = fig.get_tightbbox(renderer)  # inches
    width, height = fig.get_size_inches()
    dx = max(0.0, -box.x0) + max(0.0, box.x1 - width)
    dy = max(0.0, -box.y0) + max(0.0, box.y1 - height)
    suptitle = getattr(fig, "_suptitle", None)
    if suptitle is not None and suptitle.get_text():
        bottom = suptitle.get_window_extent(renderer).y0
        tops = [ax.title.get_window_extent(renderer).y1 for ax in fig.axes if ax.title.get_text()]
        if tops and max(tops) > bottom:
            dy += (max(tops) - bottom) / fig.dpi
    return dx, dy


def fit_to_contents(fig: Figure, rounds: int = 6) -> None:
    """Grow ``fig`` until its layout engine fits every label inside it without a panel title touching the
    figure's title, measured at :data:`DPI` (the PNG's) and at twice that (as the PDF's text). A constrained layout of
    fixed-aspect panels can overrun a figure sized by rule (the x labels of a one-row grid of 30 x 9 heads were cut
    by 0.04 in); the figure only grows, by what overran plus :data:`FIT_PAD_IN` (in width times its columns of
    panels, which share what it grows by), and a figure that fits is left as it is."""
    dpi = fig.dpi
    try:
        for _ in range(rounds):
            dx, dy = 0.0, 0.0
            for at in (2 * DPI, DPI):  # fine, as the PDF's unhinted text; then the PNG's, laid out last
                fig.set_dpi(at)
                dx, dy = (max(a, b) for a, b in zip((dx, dy), _overflow(fig), strict=True))
            if dx <= 0 and dy <= 0:
                return
            columns = min(len({round(float(ax.get_position().x0), 3) for ax in fig.axes}) or 1, 8)
            width, height = fig.get_size_inches()
            fig.set_size_inches(width + ((dx + FIT_PAD_IN) * columns if dx > 0 else 0.0),
                                height + (dy + FIT_PAD_IN if dy > 0 else 0.0))
    finally:
        fig.set_dpi(dpi)


def save_figure(fig: Figure, path: str | os.PathLike) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` (each atomically: temporary file, then a rename).

    A ``.png`` / ``.pdf`` suffix of ``path`` is stripped; missing folders are created. The figure is first
    grown where its layout overruns it (:func:`fit_to_contents`). The PNG is written first; the figure's layout
    engine is then switched off, so the PDF keeps the layout computed for the PNG. Returns
    ``[<stem>.png, <stem>.pdf]``.
    """
    fit_to_contents(fig)
    stem = _stem(path)
    png = _save_atomic(fig, stem.with_name(stem.name + ".png"), "png")
    fig.set_layout_engine("none")  # keep the layout just computed: the PDF does not redo it
    return [png, _save_atomic(fig, stem.with_name(stem.name + ".pdf"), "pdf")]
