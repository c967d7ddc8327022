"""Bootstrap intervals of per-task map agreement, from per-example values.

A task's map is the mean of its examples' values (:class:`ExampleMaps`: taylor's -dL/dg, ablation's
loss changes, the probe's gradient x activation with the trained probe held fixed). The intervals
resample those examples (:func:`headscore.stats.bootstrap`) within each task: independently for maps
made from different examples, jointly (``paired``) for maps of the same examples. Heads are never
resampled.

A bootstrap interval needs enough examples to hold its level (:func:`headscore.stats.min_examples_for`: 6
per file at 95%); ``headscore compare`` asks :func:`agreement_table` for none below that.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import stats
from .compare import compare, spearman, topk_overlap
from .results import HeadScores, whole_at_least


@dataclass(frozen=True)
class ExampleMaps:
    """Per-example head values [N, L, H] and each example's task (index into ``tasks``)."""

    values: torch.Tensor
    labels: torch.Tensor
    tasks: list[str]

    @classmethod
    def from_scores(cls, scores: HeadScores) -> ExampleMaps | None:
        """The per-example values a HeadScores kept (None when it kept none)."""
        if scores.example_values is None:
            return None
        return cls(scores.example_values.double(), scores.example_tasks.long(), list(scores.tasks))

    @classmethod
    def of(cls, values: torch.Tensor, examples: Sequence, tasks: Sequence[str]) -> ExampleMaps:
        """From values in the order of ``examples`` (objects with a ``task``)."""
        labels = torch.tensor([list(tasks).index(ex.task) for ex in examples], dtype=torch.long)
        return cls(values.double(), labels, list(tasks))

    def subset(self, rows: Sequence[int]) -> ExampleMaps:
        """The maps of the examples at ``rows``."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return ExampleMaps(self.values[idx], self.labels[idx], self.tasks)

    def rows(self, task: str) -> torch.Tensor:
        """Positions of ``task``'s examples (empty for a task this set has none of)."""
        if task not in self.tasks:
            return torch.zeros(0, dtype=torch.long)
        return (self.labels == self.tasks.index(task)).nonzero().flatten()

    def mean(self, task: str, pick: torch.Tensor | None = None) -> torch.Tensor:
        """The task's map [L, H]: mean over its examples (``pick`` indexes into :meth:`rows`)."""
        rows = self.rows(task)
        return self.values[rows if pick is None else rows[pick]].mean(0)


def agreement_intervals(a: ExampleMaps, b: ExampleMaps, k: int, *, paired: bool = False,
                        figures: Sequence[str] = ("spearman", "topk_overlap"), resamples: int = stats.RESAMPLES,
                        level: float = stats.LEVEL, seed: int = stats.SEED,
                        tasks: Sequence[str] | None = None,
                        progress: bool = False) -> dict[str, dict[str, stats.Interval]]:
    """Per common task (of ``tasks``, default all of ``a``'s): Spearman and top-k overlap (the ``figures`` asked
    for) of ``a``'s map against ``b``'s, with intervals.

    ``paired``: both are maps of the same examples (in the same order), resampled together. ``progress``: a bar
    counting resamples, on a terminal, for a run that lasts over 2 s (many resamples).
    """
    out = {}
    tasks = list(a.tasks if tasks is None else tasks)
    bar = tqdm(total=len(tasks) * len(figures) * max(resamples, 0), desc="bootstrap", unit="resample", leave=False,
               delay=2.0, disable=not progress or not sys.stderr.isatty())
    with bar:
        for task in tasks:
            intervals = _task_intervals(a, b, task, k, paired, figures, {"resamples": resamples, "level": level,
                                                                         "seed": seed, "on_resample": bar.update})
            if intervals is not None:
                out[task] = intervals
    return out


def _task_intervals(a: ExampleMaps, b: ExampleMaps, task: str, k: int, paired: bool, figures: Sequence[str],
                    opts: dict) -> dict[str, stats.Interval] | None:
    """One task's intervals of :func:`agreement_intervals` (None where either map has no example of it)."""
    na, nb = len(a.rows(task)), len(b.rows(task))
    if na == 0 or nb == 0:
        return None
    if paired:
        if na != nb:
            raise ValueError(f"paired maps need the same examples; {task!r} has {na} and {nb}")
        sizes = [na]

        def maps(i):
            return a.mean(task, i), b.mean(task, i)
    else:
        sizes = [na, nb]

        def maps(i, j):
            return a.mean(task, i), b.mean(task, j)

    def rho(*i):
        x, y = maps(*i)
        return spearman(x.flatten().numpy(), y.flatten().numpy())

    def top(*i):
        x, y = maps(*i)
        return topk_overlap(x, y, k)

    statistic = {"spearman": rho, "topk_overlap": top}
    return {name: stats.bootstrap(statistic[name], sizes, **opts) for name in figures}


def agreement_table(a: HeadScores, b: HeadScores, k: int = 10, *, resamples: int = stats.RESAMPLES,
                    level: float = stats.LEVEL, seed: int = stats.SEED, min_examples: int = 1,
                    progress: bool = False) -> dict[str, dict]:
    """Per common task, :func:`headscore.compare.compare`'s figures as plain data, plus ``spearman_ci`` and
    ``topk_overlap_ci`` ([low, high]) when both results kept per-example values.

    Results of the same examples (equal ``data_hash``) are resampled together (paired), others
    independently. Each entry with intervals also says ``level``, ``resamples`` and ``paired``.

    ``min_examples``: a task with fewer examples than that in either file gets no interval, and says instead
    ``examples`` (A's, B's), ``min_examples`` and ``level``. ``headscore compare`` passes
    :func:`headscore.stats.min_examples_for` of the level; the default 1 leaves it to the bootstrap, which gives
    NaN ends below that floor too (without those keys). Where intervals were computed, every entry says
    ``examples``, and ``biased`` lists the figures whose interval has NaN ends because almost every resample
    fell on one side of the figure (a bias the bootstrap cannot correct, :data:`headscore.stats.MAX_BIAS_Z`).
    HeadscoreError if ``k`` is no whole number >= 1. ``progress``: a bar over the resamples on a terminal (see
    :func:`agreement_intervals`).
    """
    whole_at_least(k, 1, "agreement_table needs k")
    table = {t: ag.as_dict() for t, ag in compare(a, b, k).items()}
    ma, mb = ExampleMaps.from_scores(a), ExampleMaps.from_scores(b)
    if ma is None or mb is None or resamples < 1:
        return table
    paired = bool(a.data_hash) and a.data_hash == b.data_hash and len(ma.labels) == len(mb.labels)
    examples = {t: [len(ma.rows(t)), len(mb.rows(t))] for t in table}
    few = {t for t, sizes in examples.items() if min(sizes) < min_examples}
    intervals = agreement_intervals(ma, mb, k, paired=paired, resamples=resamples, level=level, seed=seed,
                                    tasks=[t for t in table if t not in few], progress=progress)
    for task, row in table.items():
        if task in few:
            row.update(examples=examples[task], min_examples=min_examples, level=level)
            continue
        for name, iv in intervals.get(task, {}).items():
            row[f"{name}_ci"] = [iv.low, iv.high]
            if iv.reason == "bias":
                row.setdefault("biased", []).append(name)
        row.update(level=level, resamples=resamples, paired=paired, examples=examples[task])
    return table
