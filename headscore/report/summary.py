"""The Markdown summary: model, method, examples per task, agreement with ablation, top-k heads per task."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..stats import format_interval
from ..text import markdown_text
from .inputs import ablation_values, exact_mask, head_map_note, head_order, stderr_values, task_counts, task_values
from .uncertainty import CheckedComparison, checked_comparison, counts_by_task, interval_notes


def _md(text: Any) -> str:
    """Make user text (task and model names) literal Markdown, safe inside a table cell."""
    return markdown_text(text)


def _num(x: float, digits: int = 4) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}g}"


def comparison_cells(entry: Any) -> dict[str, str]:
    """An agreement entry (dict or object with ``spearman``, ``kendall``, ``topk_overlap``, optional
    ``spearman_ci`` / ``topk_overlap_ci``) as table cells, with its intervals where it has them."""
    if hasattr(entry, "as_dict"):
        entry = entry.as_dict()
    if not isinstance(entry, Mapping):
        entry = {key: getattr(entry, key) for key in ("spearman", "kendall", "topk_overlap")}
    return {key: format_interval(float(entry[key]), entry.get(f"{key}_ci"), spec)
            for key, spec in (("spearman", ".3f"), ("kendall", ".3f"), ("topk_overlap", ".2f"))}


def agreement_section(checked: CheckedComparison) -> list[str]:
    """The Markdown lines of the agreement table: its notes (what the brackets mean, which tasks have no
    interval), the table, a blank line."""
    lines = ["## Agreement with ablation", ""]
    for note in interval_notes(checked, _md):
        lines += [note, ""]
    lines += ["| Task | Spearman | Kendall | Top-k overlap |", "|---|---:|---:|---:|"]
    for task, entry in checked.entries.items():
        row = comparison_cells(entry)
        lines.append(f"| {_md(task)} | {row['spearman']} | {row['kendall']} | {row['topk_overlap']} |")
    return [*lines, ""]


def _examples_heading(n: int) -> str:
    """A task heading's count: ``(12 examples)``; one example has no standard error, and says so."""
    return " (1 example, no standard error)" if n == 1 else f" ({n} examples)"


def _score_cell(value: float, se: float | None, n: int | None) -> str:
    """``score ± stderr``; the score alone where there is no standard error (one example of ``n``)."""
    if se is None or not math.isfinite(se) or (n is not None and n < 2):
        return _num(value)
    return f"{_num(value)} ± {_num(se, 2)}"


def markdown_summary(scores: Any, *, k: int = 10, ablation: Any = None,
                     comparison: Mapping[str, Any] | None = None, images: Sequence[str] = ()) -> str:
    """A Markdown report: model, method and examples per task; per task the top-k heads; agreement table.

    Heads are ranked by value, largest first (for signed methods such as ``taylor`` the largest positive
    value is the most important). Each row gives rank, layer, head, ``score ± stderr`` (the score alone for a
    task of one example, which has no standard error) and, when ``ablation`` is given, the measured ablation
    value of that head. When the scores have an ``exact`` mask, the header says how many heads per task are
    exact and each row says whether its value is. The agreement table shows an interval only where the task
    has enough examples in each file (:mod:`headscore.report.uncertainty`) and says which tasks have none.
    When no head has a value (a file of exact edge patching), a one-line note says so in place of the top-k
    tables.

    Args:
        scores: a ``HeadScores`` (or look-alike).
        k: heads listed per task (at most L x H).
        ablation: optional ablation result (see :func:`scatter_vs_ablation`) to show next to each head.
        comparison: optional ``{task: {"spearman": ..., "kendall": ..., "topk_overlap": ...}}`` (values may
            also be objects with those attributes, e.g. ``headscore.compare.Agreement``), shown as a table.
        images: relative paths of images to embed after the header (e.g. ``["heatmaps.png"]``).
    """
    vals = task_values(scores)
    counts = task_counts(scores)
    exact = exact_mask(scores, vals.shape)
    no_heads = head_map_note(scores, vals, circuits="circuit.png" in images)
    lines = _header(scores, vals.shape, counts, exact)
    if no_heads:
        lines += [no_heads, ""]
    for img in images:
        lines += [f"![{Path(img).stem}]({img})", ""]
    if comparison:
        lines += agreement_section(checked_comparison(comparison, counts_by_task(scores), counts_by_task(ablation)))
    if not no_heads:
        abl = None if ablation is None else ablation_values(scores, ablation)
        lines += _top_heads(scores, vals, stderr_values(scores, vals.shape), abl, counts, exact, k)
    return "\n".join(lines)


def _header(scores: Any, shape: tuple[int, ...], counts: list[int] | None, exact: Any) -> list[str]:
    """The title and the list of model, method, metric, grid, tasks, examples and exact heads per task."""
    n, num_layers, num_heads = shape
    lines = [f"# Head importance: {_md(scores.model)}", "",
             f"- **Model:** {_md(scores.model)}",
             f"- **Method:** {_md(scores.method)}",
             f"- **Grid:** {num_layers} layers x {num_heads} heads",
             f"- **Tasks:** {n}"]
    extra = getattr(scores, "extra", None) or {}
    if "metric" in extra:
        meaning = extra.get("metric_meaning")
        lines.insert(-2, f"- **Metric:** {_md(extra['metric'])}" + (f" (a positive score: {_md(meaning)})"
                                                                    if meaning else ""))
    if counts is not None:
        if len(set(counts)) == 1:
            lines.append(f"- **Examples per task:** {counts[0]}")
        else:
            lines.append("- **Examples per task:** " + ", ".join(
                f"{_md(t)}: {c}" for t, c in zip(scores.tasks, counts, strict=True)))
    if exact is not None:
        lines.append(f"- **Exact heads per task** (value measured by ablation/patching, not estimated; of "
                     f"{num_layers * num_heads}): " + ", ".join(
                         f"{_md(t)}: {int(m.sum())}" for t, m in zip(scores.tasks, exact, strict=True)))
    return [*lines, ""]


def _top_heads(scores: Any, vals: Any, se: Any, abl: Any, counts: list[int] | None, exact: Any, k: int) -> list[str]:
    """The top-k tables, one per task: rank, layer, head, score ± stderr, [ablation,] [exact]."""
    num_heads = vals.shape[2]
    k = max(1, min(int(k), vals.shape[1] * num_heads))
    lines = [f"## Top {k} heads per task", ""]
    for i, task in enumerate(scores.tasks):
        flat = vals[i].ravel()
        order = [idx for idx in head_order(flat) if math.isfinite(float(flat[idx]))][:k]  # no value: no rank
        heading = f"### {_md(task)}" + ("" if counts is None else _examples_heading(counts[i]))
        if not order:  # every head of this task NaN (the other tasks have values)
            lines += [heading, "", "No head has a score for this task.", ""]
            continue
        header = "| Rank | Layer | Head | Score ± stderr |" + (" Ablation |" if abl is not None else "") + \
            (" Exact |" if exact is not None else "")
        rule = "|---:|---:|---:|---:|" + ("---:|" if abl is not None else "") + (":---:|" if exact is not None else "")
        lines += [heading, "", header, rule]
        for rank, idx in enumerate(order, start=1):
            layer, head = divmod(int(idx), num_heads)
            cell = _score_cell(flat[idx], None if se is None else se[i, layer, head],
                               None if counts is None else counts[i])
            row = f"| {rank} | {layer} | {head} | {cell} |"
            if abl is not None:
                row += f" {_num(abl[i, layer, head])} |"
            if exact is not None:
                row += f" {'yes' if exact[i, layer, head] else 'no'} |"
            lines.append(row)
        lines.append("")
    return lines
