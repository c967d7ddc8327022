"""What the report may claim from few examples: an interval only where it is valid, and a note where it has none.

* **Agreement figures** (Spearman, top-k overlap against another file) carry bootstrap intervals over examples
  (:func:`headscore.stats.bootstrap`). One example has no spread to resample, and a percentile interval of n
  examples holds its level only from :func:`headscore.stats.min_examples_for` examples on (6 at 95%; from 2 it
  covers at most half the time). So an interval is shown only where every file resampled for it has that many
  examples of the task (:func:`checked_comparison`, the rule ``headscore compare`` applies); the tables say for
  which tasks there is none, and why (:func:`interval_notes`).
* **A head's score** is a mean over the task's examples. Its interval (the page's whiskers) is Student's t
  interval with n - 1 degrees of freedom, valid from two examples on, if wide (12.7 standard errors each side
  at n = 2, at 95%), and absent for one example (:func:`t_multiplier`). The standard error itself is shown from
  two examples on, never for one (it is undefined there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..stats import LEVEL, min_examples_for

T_LEVEL = 0.95
"""Confidence level of the t intervals of head scores (the page's whiskers)."""


def t_multiplier(n: int, level: float = T_LEVEL) -> float:
    """Student's t quantile for a two-sided ``level`` interval of a mean of ``n`` examples (n - 1 degrees of
    freedom); NaN below two examples, where a mean has no interval."""
    if n < 2:
        return math.nan
    from scipy import stats  # scipy loads in about 0.3 s: only when a page is drawn

    return float(stats.t.ppf(0.5 + level / 2, n - 1))


@dataclass
class CheckedComparison:
    """An agreement table with the intervals of too few examples taken out.

    Attributes:
        entries: task -> entry, as given, but without ``*_ci`` keys where too few examples back them.
        too_few: task -> the examples of that task in each file (the scores file's, the other's), for each task
            that has no interval for too few examples.
        floor: the fewest examples per file the level asks for (:func:`headscore.stats.min_examples_for`).
        level: the intervals' confidence level.
    """

    entries: dict[str, Any]
    too_few: dict[str, tuple[int, ...]] = field(default_factory=dict)
    floor: int = 0
    level: float = LEVEL


def _examples_behind(task: str, entry: Mapping[str, Any], counts: Mapping[str, int] | None,
                     other_counts: Mapping[str, int] | None) -> tuple[int, ...]:
    """The examples of ``task`` in each file its intervals resample: the entry's own ``examples`` (A's, B's; what
    :func:`headscore.intervals.agreement_table` writes), else ``counts`` and ``other_counts`` where known (the
    scores file's alone when the two were resampled together, the same examples); () when none is known."""
    given = entry.get("examples")
    if isinstance(given, Sequence) and given and all(isinstance(n, int) for n in given):
        return tuple(given)
    sides = (counts,) if entry.get("paired") else (counts, other_counts)
    return tuple(c[task] for c in sides if c is not None and task in c)


def checked_comparison(comparison: Mapping[str, Any], counts: Mapping[str, int] | None,
                       other_counts: Mapping[str, int] | None = None) -> CheckedComparison:
    """``comparison`` (task -> agreement entry, see :func:`headscore.intervals.agreement_table`) without the
    intervals of a task with fewer examples in a file they resample than their level asks for
    (:func:`headscore.stats.min_examples_for`: 6 at 95%), and each such task listed in ``too_few`` (so is a task
    whose entry says ``min_examples``: the table was made without its intervals for that reason).

    ``counts``: examples per task of the scores file; ``other_counts``: of the file compared with (the ablation);
    both are read only for entries that do not say their ``examples``.
    """
    first = next((e for e in comparison.values() if isinstance(e, Mapping) and "level" in e), {})
    level = float(first.get("level", LEVEL))
    out = CheckedComparison({}, floor=min_examples_for(level), level=level)
    for task, entry in comparison.items():
        if isinstance(entry, Mapping):
            keys = [k for k in entry if str(k).endswith("_ci")]
            sizes = _examples_behind(task, entry, counts, other_counts)
            if (keys or "min_examples" in entry) and sizes and min(sizes) < out.floor:
                entry = {k: v for k, v in entry.items() if k not in keys}
                out.too_few[task] = sizes
        out.entries[task] = entry
    return out


def _finite_interval(entry: Any) -> bool:
    if not isinstance(entry, Mapping):
        return False
    return any(str(k).endswith("_ci") and isinstance(v, Sequence) and len(v) == 2 and
               all(c is not None and math.isfinite(c) for c in v) for k, v in entry.items())


def _examples(sizes: tuple[int, ...]) -> str:
    """``1 example``, ``2 examples`` (every file the same), ``2 and 9 examples`` (the scores file's, the other's)."""
    if len(set(sizes)) == 1:
        return f"{sizes[0]} example" if sizes[0] == 1 else f"{sizes[0]} examples"
    return f"{' and '.join(map(str, sizes))} examples"


def interval_notes(checked: CheckedComparison, name: Callable[[str], str] = str) -> list[str]:
    """What the brackets of an agreement table mean (when some row has a finite interval), and which tasks have
    none, for too few examples or a bias the bootstrap cannot correct (``biased``); ``name`` makes a task name
    safe for the page or the Markdown."""
    notes = []
    entry = next((e for e in checked.entries.values() if _finite_interval(e)), None)
    if entry is not None:
        paired = "paired: the same examples" if entry.get("paired") else "each file resampled on its own"
        notes.append(f"Brackets: {entry.get('level', 0.95):.0%} bootstrap intervals over examples "
                     f"({entry.get('resamples', '?')} resamples, {paired}).")
    if checked.too_few:
        tasks = ", ".join(f"{name(t)} ({_examples(n)})" for t, n in checked.too_few.items())
        notes.append(f"No interval for {tasks}: a {checked.level:.0%} bootstrap interval needs at least "
                     f"{checked.floor} examples of a task in each file (from fewer it falls short of its level).")
    note = bias_note(checked.entries, name)
    if note is not None:
        notes.append(f"{note[0].upper()}{note[1:]}.")
    return notes


def bias_note(entries: Mapping[str, Any], name: Callable[[str], str] = str, topk: str = "top-k overlap") -> str | None:
    """``no interval for TASK (Spearman), ...: almost every resample fell ...`` for the entries of an agreement
    table whose figures have no interval for a bias the bootstrap cannot correct (``biased``); None for none.
    ``topk`` names the top-k figure (``top-10`` where k is known)."""
    biased = {t: e["biased"] for t, e in entries.items() if isinstance(e, Mapping) and e.get("biased")}
    if not biased:
        return None
    figures = {"spearman": "Spearman", "topk_overlap": topk}
    which = ", ".join(f"{name(t)} ({' and '.join(figures.get(str(n), name(str(n))) for n in names)})"
                      for t, names in biased.items())
    return f"no interval for {which}: almost every resample fell on one side of the figure, a bias the bootstrap " \
           "cannot correct"


def counts_by_task(obj: Any) -> dict[str, int] | None:
    """Examples per task of a scores look-alike (``tasks`` and ``counts``), None when it has no counts (a bare
    array, say)."""
    tasks, counts = getattr(obj, "tasks", None), getattr(obj, "counts", None)
    if tasks is None or counts is None:
        return None
    counts = counts.tolist() if hasattr(counts, "tolist") else list(counts)
    return {str(t): int(c) for t, c in zip(tasks, counts, strict=True)}
