"""The Markdown summary: model, method, examples per task, agreement with ablation, top-k heads per task."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..stats import format_interval
from ..text import markdown_text
from .inputs import ablation_values, exact_mask, head_order, stderr_values, task_counts, task_values


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


def interval_note(comparison: Mapping[str, Any]) -> str:
    """What the brackets in an agreement table mean ('' when it has none)."""
    for entry in comparison.values():
        if isinstance(entry, Mapping) and "spearman_ci" in entry:
            return (f"Brackets: {entry.get('level', 0.95):.0%} bootstrap intervals over examples "
                    f"({entry.get('resamples', '?')} resamples, "
                    f"{'paired: the same examples' if entry.get('paired') else 'each file resampled on its own'}).")
    return ""


def markdown_summary(scores: Any, *, k: int = 10, ablation: Any = None,
                     comparison: Mapping[str, Any] | None = None, images: Sequence[str] = ()) -> str:
    """A Markdown report: model, method and examples per task; per task the top-k heads; agreement table.

    Heads are ranked by value, largest first (for signed methods such as ``taylor`` the largest positive
    value is the most important). Each row gives rank, layer, head, ``score ± stderr`` and, when
    ``ablation`` is given, the measured ablation value of that head. When the scores have an ``exact``
    mask, the header says how many heads per task are exact and each row says whether its value is.

    Args:
        scores: a ``HeadScores`` (or look-alike).
        k: heads listed per task (at most L x H).
        ablation: optional ablation result (see :func:`scatter_vs_ablation`) to show next to each head.
        comparison: optional ``{task: {"spearman": ..., "kendall": ..., "topk_overlap": ...}}`` (values may
            also be objects with those attributes, e.g. ``headscore.compare.Agreement``), shown as a table.
        images: relative paths of images to embed after the header (e.g. ``["heatmaps.png"]``).
    """
    vals = task_values(scores)
    n, num_layers, num_heads = vals.shape
    se = stderr_values(scores, vals.shape)
    abl = None if ablation is None else ablation_values(scores, ablation)
    counts = task_counts(scores)
    exact = exact_mask(scores, vals.shape)
    k = max(1, min(int(k), num_layers * num_heads))

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
    lines.append("")
    for img in images:
        lines += [f"![{Path(img).stem}]({img})", ""]

    if comparison:
        note = interval_note(comparison)
        lines += ["## Agreement with ablation", "", *([note, ""] if note else []),
                  "| Task | Spearman | Kendall | Top-k overlap |", "|---|---:|---:|---:|"]
        for task, entry in comparison.items():
            row = comparison_cells(entry)
            lines.append(f"| {_md(task)} | {row['spearman']} | {row['kendall']} | {row['topk_overlap']} |")
        lines.append("")

    lines += [f"## Top {k} heads per task", ""]
    for i, task in enumerate(scores.tasks):
        flat = vals[i].ravel()
        order = [idx for idx in head_order(flat) if math.isfinite(float(flat[idx]))][:k]  # no value: no rank
        heading = f"### {_md(task)}"
        if counts is not None:
            heading += f" ({counts[i]} examples)"
        if not order:  # every head NaN: a task of exact edge patching only, say
            lines += [heading, "", "No head has a score for this task.", ""]
            continue
        header = "| Rank | Layer | Head | Score ± stderr |"
        rule = "|---:|---:|---:|---:|"
        if abl is not None:
            header += " Ablation |"
            rule += "---:|"
        if exact is not None:
            header += " Exact |"
            rule += ":---:|"
        lines += [heading, "", header, rule]
        for rank, idx in enumerate(order, start=1):
            layer, head = divmod(int(idx), num_heads)
            cell = _num(flat[idx]) if se is None else f"{_num(flat[idx])} ± {_num(se[i, layer, head], 2)}"
            row = f"| {rank} | {layer} | {head} | {cell} |"
            if abl is not None:
                row += f" {_num(abl[i, layer, head])} |"
            if exact is not None:
                row += f" {'yes' if exact[i, layer, head] else 'no'} |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)
