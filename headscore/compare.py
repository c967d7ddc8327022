"""Agreement between two head maps: per task Spearman and Kendall correlation and top-k overlap."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from .errors import HeadscoreError
from .results import HeadScores


@dataclass(frozen=True)
class Agreement:
    """How well two [L, H] maps of one task agree."""

    spearman: float
    kendall: float
    topk_overlap: float
    k: int

    def as_dict(self) -> dict[str, float]:
        """Plain dict (for JSON and reports)."""
        return {"spearman": self.spearman, "kendall": self.kendall, "topk_overlap": self.topk_overlap,
                "k": self.k}


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Share of the ``k`` largest entries of ``a`` that are among the ``k`` largest of ``b``."""
    k = min(k, a.numel())
    top_a = set(torch.topk(a.flatten(), k).indices.tolist())
    top_b = set(torch.topk(b.flatten(), k).indices.tolist())
    return len(top_a & top_b) / k


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho over the entries finite in both; NaN for fewer than two or a constant input."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: rho is undefined (NaN), shown as such
        return float(stats.spearmanr(x[ok], y[ok]).statistic)


def agreement(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> Agreement:
    """Spearman, Kendall (tau-b) and top-k overlap of two maps of equal shape."""
    x, y = a.flatten().double().numpy(), b.flatten().double().numpy()
    return Agreement(spearman(x, y), float(stats.kendalltau(x, y).statistic), topk_overlap(a, b, k),
                     min(k, a.numel()))


def compare(a: HeadScores, b: HeadScores, k: int = 10) -> dict[str, Agreement]:
    """Agreement per task between two results over their common tasks (in ``a``'s order)."""
    if a.values.shape[1:] != b.values.shape[1:]:
        raise HeadscoreError(f"cannot compare maps of {a.num_layers}x{a.num_heads} and "
                             f"{b.num_layers}x{b.num_heads} heads")
    common = [t for t in a.tasks if t in b.tasks]
    if not common:
        raise HeadscoreError(f"no task in common: {a.tasks} vs {b.tasks}")
    return {t: agreement(a.task(t), b.task(t), k) for t in common}
