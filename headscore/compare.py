"""Agreement between two head maps: per task Spearman and Kendall correlation and top-k overlap."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats

from .errors import HeadscoreError
from .frames import rank_order
from .results import HeadScores, whole_at_least
from .stats import spearman  # here since issue 26 (report/ is below this module); headscore.compare.spearman stays


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


class Agreements(dict[str, Agreement]):
    """What :func:`compare` returns: task -> :class:`Agreement`, a plain dict that a notebook shows as a table."""

    def _repr_html_(self) -> str:
        from .display import agreements_html

        return agreements_html(self)

    def to_pandas(self) -> Any:
        """One row per task: task, spearman, kendall, topk_overlap, k (needs pandas)."""
        from .frames import require_pandas

        pd = require_pandas("to_pandas")
        return pd.DataFrame([{"task": t, **a.as_dict()} for t, a in self.items()],
                            columns=["task", "spearman", "kendall", "topk_overlap", "k"])


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Share of the ``k`` largest entries of ``a`` that are among the ``k`` largest of ``b`` (NaN entries,
    heads a layer does not have, rank last); NaN when either map has no value at all (a task without examples),
    as its top k would be arbitrary."""
    whole_at_least(k, 1, "topk_overlap needs k")
    if bool(a.isnan().all()) or bool(b.isnan().all()):
        return math.nan
    k = min(k, a.numel())
    top_a = set(rank_order(a.flatten())[:k].tolist())  # ties as top_k breaks them: in head order
    top_b = set(rank_order(b.flatten())[:k].tolist())
    return len(top_a & top_b) / k


def agreement(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> Agreement:
    """Spearman, Kendall (tau-b) and top-k overlap of two maps of equal shape (each NaN where undefined: fewer
    than two heads both maps have, or a map with no value)."""
    whole_at_least(k, 1, "agreement needs k")
    x, y = a.flatten().double().numpy(), b.flatten().double().numpy()
    ok = np.isfinite(x) & np.isfinite(y)  # heads both maps have
    kendall = float(stats.kendalltau(x[ok], y[ok]).statistic) if ok.sum() >= 2 else math.nan  # scipy would warn
    return Agreement(spearman(x, y), kendall, topk_overlap(a, b, k), min(k, a.numel()))


def require_finite(scores: HeadScores, name: str) -> None:
    """HeadscoreError naming ``name``, the task and the head where ``scores`` holds +inf or -inf (a ranking would
    put such a head first or last while the correlations leave it out). NaN is allowed: it marks a head that
    its layer does not have (models with per-layer head counts)."""
    def first_inf(tensor: torch.Tensor, tasks_of_rows) -> tuple[str, int, int, float] | None:
        bad = torch.isinf(tensor).nonzero()
        if not len(bad):
            return None
        row, layer, head = (int(i) for i in bad[0][:3])
        return scores.tasks[tasks_of_rows(row)], layer, head, float(tensor[tuple(bad[0])])

    found = first_inf(scores.values, lambda row: row)
    if found is None and scores.example_values is not None:
        found = first_inf(scores.example_values, lambda row: int(scores.example_tasks[row]))
    if found is None and scores.position_values is not None:
        found = first_inf(scores.position_values, lambda row: row)
    if found is not None:
        task, layer, head, value = found
        raise HeadscoreError(f"{name}: head L{layer}.H{head} of task {task!r} has the score {value}; scores must be "
                             "finite (NaN only marks a head its layer does not have)")


BASELINES = ("zero", "mean", "corrupt", "custom")
"""The baseline names a scores file's provenance or method name can carry (``custom``: a tensor of the user's)."""


def baseline_of(scores: HeadScores) -> Any:
    """The baseline ``scores`` measured each head against: its provenance's ``extra["baseline"]`` (``score``, edge
    runs; any JSON value a file may hold), else the baseline its method name ends with (``ablation-mean``,
    ``atp-corrupt``: ``ablate`` records it there only); None where the file does not say (a probe, an older
    ``taylor`` file)."""
    recorded = scores.extra.get("baseline")
    if recorded is not None:
        return recorded
    suffix = scores.method.rsplit("-", 1)[-1]
    return suffix if "-" in scores.method and suffix in BASELINES else None


def metric_of(scores: HeadScores) -> Any:
    """The metric ``scores`` measured (``extra["metric"]``, any JSON value; ``nll`` where the file does not say)."""
    return scores.extra.get("metric", "nll")


def provenance_differences(a: HeadScores, b: HeadScores) -> dict[str, tuple[Any, Any]]:
    """What the two files were measured under that differs, as (A's, B's): ``metric`` and ``baseline`` (a baseline
    only where both files say which), in that order; empty when nothing does. Comparing across them is
    legitimate (AtP against zero ablation, say), but the maps then answer different questions."""
    out = {}
    for name, of in (("metric", metric_of), ("baseline", baseline_of)):
        x, y = of(a), of(b)
        if x is not None and y is not None and x != y:
            out[name] = (x, y)
    return out


def compare(a: HeadScores, b: HeadScores, k: int = 10) -> Agreements:
    """Agreement per task between two results over their common tasks (in ``a``'s order), a dict shown as a
    table in a notebook; HeadscoreError if either holds an infinite score (:func:`require_finite`) or ``k`` is no
    whole number >= 1."""
    whole_at_least(k, 1, "compare needs k")
    require_finite(a, "A")
    require_finite(b, "B")
    if a.values.shape[1:] != b.values.shape[1:]:
        raise HeadscoreError(f"cannot compare maps of {a.num_layers}x{a.num_heads} and "
                             f"{b.num_layers}x{b.num_heads} heads")
    common = [t for t in a.tasks if t in b.tasks]
    if not common:
        raise HeadscoreError(f"no task in common: {a.tasks} vs {b.tasks}")
    return Agreements({t: agreement(a.task(t), b.task(t), k) for t in common})


def compare_edges(a: HeadScores, b: HeadScores, k: int = 10) -> Agreements:
    """Agreement per common task of two files' edge scores over the edges both have a value for (e.g. edge
    scores against exact edge patching of their top edges): Spearman, Kendall and top-k overlap."""
    whole_at_least(k, 1, "compare_edges needs k")
    for scores, name in ((a, "A"), (b, "B")):
        if not scores.has_edges:
            raise HeadscoreError(f"{name} has no edge scores (score with --edges, or ablate --edges)")
    if a.edge_nodes != b.edge_nodes:
        raise HeadscoreError("the two files' edge nodes differ (scores of different models?)")
    out = Agreements()
    for task in (t for t in a.tasks if t in b.tasks):
        x, y = a.edges(task), b.edges(task)
        both = ~torch.isnan(x) & ~torch.isnan(y)
        if int(both.sum()) < 2:
            continue
        if not (torch.isfinite(x[both]).all() and torch.isfinite(y[both]).all()):
            raise HeadscoreError(f"task {task!r}: edge scores must be finite")
        out[task] = agreement(x[both], y[both], k)
    if not out:
        raise HeadscoreError(f"no task in common with two or more edges measured in both: {a.tasks} vs {b.tasks}")
    return out


def _common_positions(a: HeadScores, b: HeadScores) -> list[str]:
    if not (a.has_positions and b.has_positions):
        raise HeadscoreError("both files need per-position maps (score/ablate with --per-position)")
    names = [p for p in a.positions if p in b.positions]
    if not names:
        raise HeadscoreError(f"no position in common: {a.positions} vs {b.positions}")
    return names


def compare_positions(a: HeadScores, b: HeadScores, k: int = 10) -> Agreements:
    """Agreement per task of two per-position maps over every (layer, head, position) that both files
    name and where the task has examples with a token in both (top-k over those entries)."""
    whole_at_least(k, 1, "compare_positions needs k")
    require_finite(a, "A")
    require_finite(b, "B")
    if a.values.shape[1:] != b.values.shape[1:]:
        raise HeadscoreError(f"cannot compare maps of {a.num_layers}x{a.num_heads} and "
                             f"{b.num_layers}x{b.num_heads} heads")
    names = _common_positions(a, b)
    ia = [a.positions.index(p) for p in names]
    ib = [b.positions.index(p) for p in names]
    out = Agreements()
    for task in (t for t in a.tasks if t in b.tasks):
        ta, tb = a.tasks.index(task), b.tasks.index(task)
        present = (a.position_counts[ta, ia] > 0) & (b.position_counts[tb, ib] > 0)
        cols_a, cols_b = torch.tensor(ia)[present], torch.tensor(ib)[present]
        out[task] = agreement(a.position_values[ta][..., cols_a], b.position_values[tb][..., cols_b], k)
    if not out:
        raise HeadscoreError(f"no task in common: {a.tasks} vs {b.tasks}")
    return out


@dataclass(frozen=True)
class Miss:
    """A head where two maps differ most: its values in each, the difference a - b, and whether each value is
    exact (``HeadScores.exact``; False where that side has no mask)."""

    layer: int
    head: int
    a: float
    b: float
    a_exact: bool = False
    b_exact: bool = False

    @property
    def difference(self) -> float:
        """a - b."""
        return self.a - self.b


def largest_differences(a: HeadScores, b: HeadScores, task: str, n: int = 5) -> list[Miss]:
    """The ``n`` heads of ``task`` with the largest |a - b| (e.g. where a first-order estimate misses its
    ground truth), largest first, each marked with which of its two values are exact."""
    diff = (a.task(task) - b.task(task)).abs().flatten()
    idx = torch.topk(torch.nan_to_num(diff, nan=-1.0), min(n, diff.numel())).indices
    heads = a.num_heads
    ea, eb = exact_of_task(a, task), exact_of_task(b, task)
    return [Miss(int(i) // heads, int(i) % heads, float(a.task(task).flatten()[i]), float(b.task(task).flatten()[i]),
                 ea is not None and bool(ea[i]), eb is not None and bool(eb[i]))
            for i in idx]


def exact_of_task(scores: HeadScores, task: str) -> torch.Tensor | None:
    """The flat [L*H] exact mask of ``task`` (None when ``scores`` has no mask)."""
    if scores.exact is None:
        return None
    return scores.exact[scores.tasks.index(task)].flatten()


def exact_counts(scores: HeadScores, tasks: list[str]) -> dict[str, int] | None:
    """Per task of ``tasks`` (all in ``scores``), how many heads are exact; None when ``scores`` has no mask."""
    if scores.exact is None:
        return None
    return {t: int(exact_of_task(scores, t).sum()) for t in tasks}
