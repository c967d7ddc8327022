"""Figures and a Markdown summary of a ``HeadScores`` result.

* :func:`heatmap_grid`: one [layer x head] heatmap per task on a shared colour scale, with one colour bar
  labelled "Heads Importance" (the layout of the CogQA "Cognitive Mirrors" figure), as PNG and PDF.
* :func:`scatter_vs_ablation`: per task, score against measured ablation loss increase, with Spearman's rho.
* :func:`position_heatmaps`: for per-position scores, each task's top heads against token positions.
* :func:`markdown_summary`: top-k heads per task and the agreement with ablation, as Markdown.
* :func:`write_report`: all of the above into one folder.

Everything is drawn on :class:`matplotlib.figure.Figure` with an Agg canvas, never through ``pyplot``, so
the caller's matplotlib backend is left alone. A report directory is written all or nothing (built in a
temporary directory, then swapped in whole: :class:`headscore.output_files.OutputSet`).

One module per job: :mod:`.inputs` (reading duck-typed scores), :mod:`.layout` (panel grids),
:mod:`.heatmaps`, :mod:`.scatter`, :mod:`.summary`, :mod:`.html` (the interactive page), :mod:`.uncertainty`
(which intervals few examples allow, and the notes that say so); :func:`write_report` is here.

The functions are duck-typed: ``scores`` needs ``values`` and ``stderr`` ([T, L, H] tensors or arrays),
``counts`` ([T]), ``tasks``, ``method`` and ``model``; ``ablation`` is such an object or a bare [T, L, H] array.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..output_files import OutputSet, atomic_write
from .heatmaps import COLORBAR_LABEL, heatmap_grid
from .inputs import ablation_values, head_map_note, task_values
from .layout import grid_shape
from .positions import position_heatmaps
from .scatter import scatter_vs_ablation
from .summary import markdown_summary

__all__ = ["COLORBAR_LABEL", "REPORT_FILES", "grid_shape", "heatmap_grid", "html_page", "markdown_summary",
           "position_heatmaps", "scatter_vs_ablation", "write_report"]

REPORT_FILES = ("heatmaps.png", "heatmaps.pdf", "scatter.png", "scatter.pdf", "positions.png", "positions.pdf",
                "circuit.png", "circuit.pdf", "summary.md", "index.html")
"""The files :func:`write_report` may write into its directory."""


def write_report(scores: Any, out_dir: str | os.PathLike, *, ablation: Any = None,
                 comparison: Mapping[str, Any] | None = None, k: int = 10,
                 other_comparison: Mapping[str, Any] | None = None, other_name: str = "",
                 circuits: Sequence[Any] | None = None) -> dict[str, Path]:
    """Write a full report into ``out_dir``, all or nothing: the report is built in a temporary directory
    beside ``out_dir`` and replaces it whole at the end, so a reader never sees files of two reports.
    ``out_dir`` must be new, empty or an earlier report (holding only :data:`REPORT_FILES`).

    Files: ``heatmaps.png`` / ``heatmaps.pdf`` (:func:`heatmap_grid`), ``scatter.png`` / ``scatter.pdf``
    when ``ablation`` is given (:func:`scatter_vs_ablation`), ``positions.png`` / ``positions.pdf`` when the
    scores have per-position maps (:func:`position_heatmaps`), ``summary.md`` (:func:`markdown_summary`,
    linking the heatmap image, and the scatter when drawn) and ``index.html`` (:func:`html_page`: the
    interactive page, self-contained, with the agreement with ``ablation`` and, as ``other_comparison``,
    with another scores file called ``other_name``). With ``circuits`` (one per task, see
    :mod:`headscore.report.circuit`): ``circuit.png`` / ``circuit.pdf`` and the circuits' interactive graphs
    in ``index.html``. Agreement intervals are shown only where enough examples back them
    (:mod:`headscore.report.uncertainty`).

    When no head of any task has a value (a file of exact edge patching, ``ablate --edges``), no head map is
    drawn: no ``heatmaps``, no ``scatter``, no grid on the page, but one line in ``summary.md`` and on the page
    saying why (:func:`~headscore.report.inputs.head_map_note`).

    Returns:
        ``{["heatmaps_png", "heatmaps_pdf",] ["scatter_png", "scatter_pdf",] "summary", "html"}`` -> path (and
        ``positions_*``, ``circuit_*`` when drawn).

    Raises:
        ValueError: ``ablation`` does not match ``scores`` (checked before anything is written).
        HeadscoreError: ``out_dir`` holds other files, or cannot be written (``OutputWriteError``:
            ``out_dir`` is then as it was).
    """
    if ablation is not None:
        ablation_values(scores, ablation)
    final = Path(out_dir)
    with OutputSet() as outputs:
        out = outputs.directory(final, REPORT_FILES, label="report directory")
        written = _write_files(scores, out, ablation=ablation, comparison=comparison, k=k,
                               other_comparison=other_comparison, other_name=other_name, circuits=circuits)
    return {name: final / path.name for name, path in written.items()}


def _write_files(scores: Any, out: Path, *, ablation: Any, comparison: Mapping[str, Any] | None, k: int,
                 other_comparison: Mapping[str, Any] | None, other_name: str,
                 circuits: Sequence[Any] | None) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    images: list[str] = []
    png = None
    if not head_map_note(scores, task_values(scores)):  # some head has a value: the maps
        png, pdf = heatmap_grid(scores, out / "heatmaps")
        paths.update(heatmaps_png=png, heatmaps_pdf=pdf)
        images.append("heatmaps.png")
        if ablation is not None:
            paths["scatter_png"], paths["scatter_pdf"] = scatter_vs_ablation(scores, ablation, out / "scatter")
            images.append("scatter.png")
    if getattr(scores, "positions", None) is not None:
        paths["positions_png"], paths["positions_pdf"] = position_heatmaps(scores, out / "positions", k=k)
        images.append("positions.png")
    if circuits:
        from .circuit import circuit_pictures

        paths["circuit_png"], paths["circuit_pdf"] = circuit_pictures(circuits, out / "circuit")
        images.append("circuit.png")
    text = markdown_summary(scores, k=k, ablation=ablation, comparison=comparison, images=images)
    paths["summary"] = atomic_write(out / "summary.md", text.encode("utf-8"))
    from .html import html_page  # Bokeh takes about 0.6 s to import: only when a page is written

    page = html_page(scores, ablation=ablation, comparison=comparison, other_comparison=other_comparison,
                     other_name=other_name, png=None if png is None else png.read_bytes(), circuits=circuits)
    paths["html"] = atomic_write(out / "index.html", page.encode("utf-8"))
    return paths


def __getattr__(name: str):
    """``html_page`` loads Bokeh on first use, so that importing the report (and the CLI) stays fast."""
    if name == "html_page":
        from .html import html_page

        return html_page
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
