"""Uncertainty of per-task figures: bootstrap intervals over examples, and a paired permutation test.

Every figure headscore reports per task (an agreement between two maps, a sparsity, a split-half
stability, an intervention's loss change) is a statistic of the examples it was computed from.
:func:`bootstrap` resamples those examples with replacement (heads are never resampled: they are
what the figure is about), recomputes the statistic, and reports the bias-corrected and accelerated
(BCa, Efron 1987) percentile interval: many of these figures are biased under resampling (the
Spearman correlation of two mean maps drops when duplicated examples add noise), and the plain
percentile interval of such a figure can miss the figure itself. A figure built from two independent
sets of examples (a map from one set against an ablation map from another) resamples each set on
its own; the acceleration comes from a jackknife over every example of every set. Where the bias
correction would be extreme (:data:`MAX_BIAS_Z`: almost every resample on one side of the figure), or
would move the whole interval past the figure, there is no interval (``reason`` ``"bias"``): BCa cannot
reach past its last resample, and the plain percentile interval would lie wholly on one side of the
figure, away from the truth (the Spearman of two noisy mean maps of 270 heads from 40 examples: every
resample below the figure, the percentile interval missing both the figure and the maps' true
agreement).

:func:`sign_flip_pvalue` tests paired per-example differences (e.g. loss change with a function's
own top-k heads ablated minus the mean change with random k-head sets): under the null hypothesis the
sign of each difference is a coin flip; exact for up to 16 examples, Monte Carlo beyond.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

RESAMPLES = 1000
"""Bootstrap resamples unless told otherwise."""
LEVEL = 0.95
"""Confidence level of the intervals unless told otherwise."""
SEED = 0
"""Seed of the resampling unless told otherwise (the same seed gives the same interval)."""
MAX_BIAS_Z = 2.0
"""Largest bias correction BCa applies (in standard normal units: fewer than 2.3% of the resamples on
one side of the figure). Beyond it the corrected percentiles crowd into the last few resamples and
the interval turns spuriously narrow, and the plain percentile interval lies on one side of the figure:
no interval is given (``Interval.reason == "bias"``)."""


@dataclass(frozen=True)
class Interval:
    """A figure with its bootstrap percentile interval.

    ``low``/``high`` are NaN where there is no interval, and ``reason`` says why: ``"examples"`` (a group
    has fewer examples than the level holds, :func:`min_examples_for`), ``"undefined"`` (the figure, or
    most resamples of it, is not finite; or no resamples were asked for), ``"bias"`` (almost every resample
    falls on one side of the figure, :data:`MAX_BIAS_Z`, or the corrected interval would not hold the
    figure); ``""`` for an interval. ``resamples`` counts the resamples whose statistic was finite.
    """

    value: float
    low: float
    high: float
    level: float
    resamples: int
    reason: str = ""

    @property
    def defined(self) -> bool:
        """Whether the interval has finite ends."""
        return math.isfinite(self.low) and math.isfinite(self.high)

    def excludes(self, x: float = 0.0) -> bool:
        """Whether ``x`` lies outside the interval (the figure differs from ``x`` at the stated level)."""
        return self.defined and not (self.low <= x <= self.high)

    def as_dict(self) -> dict[str, float | int]:
        """Plain data: value, low, high, level, resamples."""
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level,
                "resamples": self.resamples}

    def format(self, spec: str = ".3f", *, star: bool = False) -> str:
        """:func:`format_interval` of this interval."""
        return format_interval(self.value, [self.low, self.high], spec, star=star)


def format_interval(value: float | None, ci: Sequence[float] | None, spec: str = ".3f", *,
                    star: bool = False) -> str:
    """``value [low, high]``; ``value`` alone without a finite interval; ``n/a`` for a missing value.

    ``star`` appends ``*`` to the value when the interval excludes 0.
    """
    if value is None or not math.isfinite(value):
        return "n/a"
    if ci is None or len(ci) != 2 or not all(c is not None and math.isfinite(c) for c in ci):
        return format(value, spec)
    mark = "*" if star and not (ci[0] <= 0.0 <= ci[1]) else ""
    return f"{format(value, spec)}{mark} [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def min_examples_for(level: float) -> int:
    """The fewest examples per resampled group from which a bootstrap interval can hold ``level``: the smallest
    n >= 2 with 1 - 2**(1 - n) >= ``level`` (5 at 0.9, 6 at 0.95, 8 at 0.99).

    A percentile interval (BCa included) never leaves the range of its resamples, and the resampled means of n
    examples never leave the range of those n examples, which holds the centre of a symmetric distribution with
    probability 1 - 2**(1 - n) only: 50% for 2 examples, 75% for 3, 97% for 6. Below this n the interval falls
    short of its level even for a plain mean, whatever the resampling; at or above it the usual bootstrap
    approximations apply (a necessary condition, not a sufficient one). A t interval would be honest at n = 2,
    but with 1 degree of freedom it spans 12.7 standard errors each side: all of a correlation's [-1, 1].
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    n = 2
    while 1.0 - 2.0 ** (1 - n) < level:
        n += 1
    return n


def bootstrap(statistic: Callable[..., float], sizes: Sequence[int], *, resamples: int = RESAMPLES,
              level: float = LEVEL, seed: int = SEED, on_resample: Callable[[], object] | None = None) -> Interval:
    """BCa bootstrap interval of ``statistic(*indices)`` over one or more independent groups of examples.

    ``statistic`` takes one index tensor per group (positions 0 .. sizes[g] - 1 of that group's
    examples) and returns a float. The figure is its value on every example; each resample draws
    every group's indices with replacement, independently. A group of fewer examples than ``level`` asks for
    (:func:`min_examples_for`: 6 at 95%) gives no interval (NaN ends): every figure built on it, a star
    included, then says nothing it cannot hold. ``on_resample()`` is called after each resample (a progress bar).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    full = [torch.arange(n) for n in sizes]
    value = float(statistic(*full))
    if any(n < min_examples_for(level) for n in sizes):
        return Interval(value, math.nan, math.nan, level, 0, "examples")
    if resamples < 1 or not math.isfinite(value):
        return Interval(value, math.nan, math.nan, level, 0, "undefined")
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(resamples):
        stat = float(statistic(*(torch.randint(0, n, (n,), generator=gen) for n in sizes)))
        if math.isfinite(stat):
            draws.append(stat)
        if on_resample is not None:
            on_resample()
    if len(draws) < max(2, resamples // 2):  # the statistic is undefined on most resamples
        return Interval(value, math.nan, math.nan, level, len(draws), "undefined")
    q = torch.tensor(draws, dtype=torch.float64)
    levels = _bca_levels(q, value, _acceleration(statistic, sizes), level)
    if levels is None:
        return Interval(value, math.nan, math.nan, level, len(draws), "bias")
    low, high = torch.quantile(q, torch.tensor(levels, dtype=torch.float64)).tolist()
    return Interval(value, low, high, level, len(draws))


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _normal_quantile(p: float) -> float:
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def _bca_levels(draws: torch.Tensor, value: float, accel: float, level: float) -> tuple[float, float] | None:
    """The percentiles of the bootstrap draws that bound the BCa interval; None where the bias correction would
    be extreme (the figure lies outside the bulk of its resamples: no interval)."""
    b = len(draws)
    below = float((draws < value).sum()) + 0.5 * float((draws == value).sum())
    z0 = _normal_quantile(min(max(below / b, 0.5 / b), 1.0 - 0.5 / b))
    if abs(z0) > MAX_BIAS_Z:
        return None
    out = []
    for tail in ((1.0 - level) / 2, 1.0 - (1.0 - level) / 2):
        z = _normal_quantile(tail)
        denom = 1.0 - accel * (z0 + z)
        out.append(_normal_cdf(z0 + (z0 + z) / denom) if denom > 0 else (0.0 if tail < 0.5 else 1.0))
    # the figure's own place among the draws must lie inside: past it, the correction has moved the whole interval
    # into the few resamples beyond the figure (|z0| above the level's normal quantile, or a large acceleration)
    if not out[0] <= below / b <= out[1]:
        return None
    return out[0], out[1]


def _acceleration(statistic: Callable[..., float], sizes: Sequence[int]) -> float:
    """BCa's acceleration from the jackknife: each example of each group left out once, each group's values
    centred on their own mean and weighted by its size (Efron and Tibshirani 1993, 14.3, for several samples;
    ``scipy.stats.bootstrap``'s too): a = sum_g sum_i U^3 / n_g^3 / (6 (sum_g sum_i U^2 / n_g^2)^1.5), with
    U = (n_g - 1)(mean_g - value_gi). One group gives the usual sum d^3 / (6 (sum d^2)^1.5)."""
    full = [torch.arange(n) for n in sizes]
    num = den = 0.0
    for g, n in enumerate(sizes):
        values = []
        for i in range(n):
            idx = list(full)
            idx[g] = torch.cat([full[g][:i], full[g][i + 1:]])
            v = float(statistic(*idx))
            if math.isfinite(v):
                values.append(v)
        if len(values) < 2:
            continue
        t = torch.tensor(values, dtype=torch.float64)
        u = (n - 1) * (t.mean() - t)
        num += float((u ** 3).sum()) / n ** 3
        den += float((u ** 2).sum()) / n ** 2
    return num / (6.0 * den ** 1.5) if den > 0 else 0.0


def bootstrap_mean(values: torch.Tensor, **kwargs) -> Interval:
    """Bootstrap interval of the mean of ``values`` [N] (keyword options as :func:`bootstrap`)."""
    v = values.double().flatten()
    return bootstrap(lambda i: float(v[i].mean()), [len(v)], **kwargs)


def sign_flip_pvalue(differences: torch.Tensor, *, resamples: int = 10000, seed: int = SEED) -> float:
    """One-sided p-value that the mean of paired ``differences`` [N] is > 0 (sign-flip permutation test).

    All 2^N sign patterns for N <= 16, else ``resamples`` random ones (the observed pattern counted
    once, so p >= 1 / (resamples + 1)). NaN for no differences or a non-finite one.
    """
    d = differences.double().flatten()
    n = len(d)
    if n == 0 or not bool(torch.isfinite(d).all()):
        return math.nan
    observed = float(d.mean())
    # ties (the observed pattern itself, patterns of equal sums) count as extreme: a tolerance on the
    # differences' own scale, above the float64 round-off of a mean of n of them (at most n x 2^-53 x max |d|)
    tol = max(1e-12, 4 * n * 2.0 ** -53) * float(d.abs().max())
    if n <= 16:
        patterns = torch.arange(2 ** n)[:, None].bitwise_right_shift(torch.arange(n)).bitwise_and(1)
        means = ((1 - 2 * patterns).double() * d).mean(1)
        return float((means >= observed - tol).double().mean())
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (resamples, n), generator=gen).double() * 2 - 1
    hits = int(((signs * d).mean(1) >= observed - tol).sum())
    return (hits + 1) / (resamples + 1)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho over the entries finite in both; NaN for fewer than two or a constant input (the rank
    correlation of every agreement figure: :func:`headscore.compare.agreement`, the report's scatter)."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: rho is undefined (NaN), shown as such
        return float(stats.spearmanr(x[ok], y[ok]).statistic)
