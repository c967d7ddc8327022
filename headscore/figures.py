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

__all__ = ["DPI", "save_figure"]

DPI = 150
_IMAGE_SUFFIXES = (".png", ".pdf")


def _stem(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix.lower() in _IMAGE_SUFFIXES else path


def _save_atomic(fig: Figure, path: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI)
    return atomic_write(path, buf.getvalue())


def save_figure(fig: Figure, path: str | os.PathLike) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` (each atomically: temporary file, then a rename).

    A ``.png`` / ``.pdf`` suffix of ``path`` is stripped; missing folders are created. The PNG is
    written first; the figure's layout engine is then switched off, so the PDF keeps the layout
    computed for the PNG. Returns ``[<stem>.png, <stem>.pdf]``.
    """
    stem = _stem(path)
    png = _save_atomic(fig, stem.with_name(stem.name + ".png"), "png")
    fig.set_layout_engine("none")  # keep the layout just computed: the PDF does not redo it
    return [png, _save_atomic(fig, stem.with_name(stem.name + ".pdf"), "pdf")]
