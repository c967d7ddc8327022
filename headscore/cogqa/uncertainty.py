"""Bootstrap intervals for the reproduction's map-level figures beyond agreement: sparsity and split-half
stability (agreement: :mod:`headscore.intervals`)."""

from __future__ import annotations

from .. import stats
from ..intervals import ExampleMaps, agreement_intervals
from .findings import sparsity_of


def sparsity_intervals(maps: ExampleMaps, share: float = 0.05, *, resamples: int = stats.RESAMPLES,
                       level: float = stats.LEVEL, seed: int = stats.SEED) -> dict[str, stats.Interval]:
    """Per task: sparsity of the mean map (:func:`headscore.cogqa.findings.sparsity_of`), with an interval."""
    out = {}
    for task in maps.tasks:
        n = len(maps.rows(task))
        if n:
            out[task] = stats.bootstrap(lambda i, task=task: sparsity_of(maps.mean(task, i), share), [n],
                                        resamples=resamples, level=level, seed=seed)
    return out


def stability_intervals(half_a: ExampleMaps, half_b: ExampleMaps, *, resamples: int = stats.RESAMPLES,
                        level: float = stats.LEVEL, seed: int = stats.SEED) -> dict[str, stats.Interval]:
    """Per task: Spearman between the maps of two disjoint halves of the examples, with an interval."""
    return {t: v["spearman"] for t, v in agreement_intervals(half_a, half_b, 1, figures=("spearman",),
                                                              resamples=resamples, level=level, seed=seed).items()}
