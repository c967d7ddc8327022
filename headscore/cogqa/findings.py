"""Summaries of head maps: sparsity, layer profiles, overlap of top heads between tasks, split-half stability.

The figures are drawn on :class:`matplotlib.figure.Figure` with an Agg canvas (never ``pyplot``) and written
as PNG and PDF by :func:`headscore.figures.save_figure`, like every other headscore figure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..compare import agreement
from ..figures import save_figure
from ..results import HeadScores


def sparsity(scores: HeadScores, share: float = 0.05) -> dict[str, float]:
    """Per task: share of the total |importance| held by the top ``share`` of heads (by |value|).

    A uniform map gives about ``share``; a map concentrated on a few heads gives close to 1.
    """
    out = {}
    for t, task in enumerate(scores.tasks):
        v = scores.values[t].abs().flatten()
        n = max(1, math.ceil(share * v.numel()))
        total = float(v.sum())
        out[task] = float(torch.topk(v, n).values.sum()) / total if total > 0 else math.nan
    return out


def layer_profile(scores: HeadScores, *, absolute: bool = True) -> torch.Tensor:
    """Per task and layer: the sum over heads of the (absolute, by default) importance, [T, L]."""
    v = scores.values.abs() if absolute else scores.values
    return v.sum(-1)


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
    ax.set_xticks(range(n), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), tasks, fontsize=8)
    for i in range(n):
        for j in range(n):
            v = float(matrix[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="Jaccard of top-k heads")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_layer_profiles(profiles: dict[str, HeadScores], path: str | os.PathLike, *,
                        absolute: bool = True) -> list[Path]:
    """One panel per method: each task's layer profile (sum over heads, normalised to sum 1).

    Returns ``[<stem>.png, <stem>.pdf]``.
    """
    # matplotlib is imported on first use: importing the module (and the CLI) stays fast
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(profiles), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, scores) in enumerate(profiles.items()):
        ax = fig.add_subplot(1, len(profiles), i + 1)
        prof = layer_profile(scores, absolute=absolute)
        prof = prof / prof.abs().sum(1, keepdim=True).clamp_min(1e-30)
        for t, task in enumerate(scores.tasks):
            ax.plot(range(scores.num_layers), prof[t].numpy(), label=task, lw=1.2)
        ax.set_xlabel("layer")
        if i == 0:
            ax.set_ylabel("share of |importance|" if absolute else "share of importance")
        ax.set_title(name, fontsize=10)
    fig.axes[-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)
