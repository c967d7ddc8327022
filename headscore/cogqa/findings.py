"""Summaries of head maps: sparsity, layer profiles, overlap of top heads between tasks, split-half stability,
and specificity (a task's map against the other tasks' maps).

The figures are drawn on :class:`matplotlib.figure.Figure` with an Agg canvas (never ``pyplot``) and written
as PNG and PDF by :func:`headscore.figures.save_figure`, like every other headscore figure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..compare import agreement
from ..figures import literal, save_figure
from ..results import HeadScores


def sparsity(scores: HeadScores, share: float = 0.05) -> dict[str, float]:
    """Per task: share of the total |importance| held by the top ``share`` of heads (by |value|).

    A uniform map gives ceil(``share`` * n) / n for n heads (:func:`flat_sparsity`: a little above ``share``); a
    map concentrated on a few heads gives close to 1.
    """
    return {task: sparsity_of(scores.values[t], share) for t, task in enumerate(scores.tasks)}


def sparsity_of(head_map: torch.Tensor, share: float = 0.05) -> float:
    """Share of one map's total |value| held by its top ``share`` of heads (NaN for an all-zero map); heads a
    layer does not have (NaN) are left out."""
    v = head_map.abs().flatten()
    v = v[torch.isfinite(v)]
    n = max(1, math.ceil(share * v.numel()))
    total = float(v.sum())
    return float(torch.topk(v, n).values.sum()) / total if total > 0 else math.nan


def flat_sparsity(num_heads: int, share: float = 0.05) -> float:
    """:func:`sparsity_of` a flat map of ``num_heads`` heads: ceil(``share`` * n) / n (the top share keeps whole
    heads), 0.0833 for 3 x 4 heads, 0.0519 for SmolLM2-135M's 270, ``share`` only where share * n is whole."""
    return sparsity_of(torch.ones(num_heads, dtype=torch.float64), share)


def specificity(scores: HeadScores) -> HeadScores:
    """Each task's map against the others': (value - mean of the other tasks' values) / pooled standard error.

    For task t and head (l, h): ``z = (v_t - mean_o v_o) / sqrt(se_t^2 + sum_o se_o^2 / (T - 1)^2)``
    over the other tasks o, from the map's per-task means and standard errors (independent examples
    per task). Large z: the head matters for t more than for the other tasks, by z standard errors;
    a head that matters for every task scores near 0. The other tasks are those with a standard error
    there (a task of one example has none: its own z is NaN, and it is left out of the others'); NaN where
    the pooled standard error is 0 or no other task has one. Method ``specificity-<method>``; ``stderr`` is
    all ones (z is already in units of its own standard error).
    """
    t = len(scores.tasks)
    if t < 2:
        raise ValueError("specificity needs at least two tasks")
    known = torch.isfinite(scores.stderr) & torch.isfinite(scores.values)
    v = scores.values.where(known, 0.0)
    se2 = scores.stderr.square().where(known, 0.0)
    others = known.sum(0, keepdim=True) - known.long()  # per task and head: the other tasks with a value
    others_mean = (v.sum(0, keepdim=True) - v) / others.clamp_min(1)
    others_var = (se2.sum(0, keepdim=True) - se2) / others.clamp_min(1).square()
    pooled = (se2 + others_var).sqrt()
    defined = known & (others > 0) & (pooled > 0)
    z = torch.where(defined, (v - others_mean) / pooled.clamp_min(1e-300), torch.full_like(v, math.nan))
    return HeadScores(z, torch.ones_like(z), scores.counts.clone(), list(scores.tasks),
                      f"specificity-{scores.method}", scores.model, scores.data_hash,
                      extra={"of": scores.method, "unit": "pooled standard errors"})


def layer_profile(scores: HeadScores, *, absolute: bool = True) -> torch.Tensor:
    """Per task and layer: the sum over heads of the (absolute, by default) importance, [T, L] (heads a layer
    does not have, NaN, left out)."""
    v = scores.values.abs() if absolute else scores.values
    return v.nansum(-1)


def top_heads(scores: HeadScores, task: str, k: int) -> set[tuple[int, int]]:
    """The ``k`` heads with the largest value for ``task``."""
    return {(layer, head) for layer, head, _ in scores.top_k(k, task)}


def jaccard_matrix(scores: HeadScores, k: int = 10) -> torch.Tensor:
    """[T, T] Jaccard index |A & B| / |A | B| of the tasks' top-k head sets."""
    sets = [top_heads(scores, t, k) for t in scores.tasks]
    n = len(sets)
    out = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
    return out


def stability(a: HeadScores, b: HeadScores, k: int = 10) -> dict[str, float]:
    """Per common task: Spearman between two maps of the same method on disjoint halves of the data."""
    return {t: agreement(a.task(t), b.task(t), k).spearman for t in a.tasks if t in b.tasks}


def plot_jaccard(matrix: torch.Tensor, tasks: list[str], path: str | os.PathLike, *,
                 title: str = "") -> list[Path]:
    """Heatmap of a Jaccard matrix, values written in the cells: ``[<stem>.png, <stem>.pdf]``."""
    # matplotlib is imported on first use: importing the module (and the CLI) stays fast
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(tasks)
    fig = Figure(figsize=(1.0 + 0.75 * n, 0.8 + 0.7 * n), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
    names = [literal(task) for task in tasks]
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    for i in range(n):
        for j in range(n):
            v = float(matrix[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="Jaccard of top-k heads")
    fig.suptitle(literal(title), fontsize=10)  # over image and colour bar (on the image axes: under the bar)
    return save_figure(fig, path)


def plot_layer_profiles(profiles: dict[str, HeadScores], path: str | os.PathLike, *,
                        absolute: bool = True) -> list[Path]:
    """One panel per method: each task's layer profile (sum over heads, normalised to sum 1).

    Returns ``[<stem>.png, <stem>.pdf]``.
    """
    # matplotlib is imported on first use: importing the module (and the CLI) stays fast
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(4.2 * len(profiles), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, scores) in enumerate(profiles.items()):
        ax = fig.add_subplot(1, len(profiles), i + 1)
        prof = layer_profile(scores, absolute=absolute)
        prof = prof / prof.abs().sum(1, keepdim=True).clamp_min(1e-30)
        for t, task in enumerate(scores.tasks):
            ax.plot(range(scores.num_layers), prof[t].numpy(), label=literal(task), lw=1.2)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        if i == 0:
            ax.set_ylabel("share of |importance|" if absolute else "share of importance")
        ax.set_title(literal(name), fontsize=10)
    fig.axes[-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)
