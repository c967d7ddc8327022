"""Bootstrap intervals and the sign-flip permutation test against independent references."""

import itertools
import math

import pytest
import torch

from headscore import stats


def test_bootstrap_mean_interval_matches_normal_theory():
    """For the mean of 400 standard normal draws, the 95% percentile interval is mean +- 1.96 / sqrt(n),
    to within the bootstrap's own Monte Carlo error (2000 resamples: about 3% of the half-width)."""
    x = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    iv = stats.bootstrap_mean(x, resamples=2000)
    se = float(x.std()) / math.sqrt(len(x))
    assert iv.value == pytest.approx(float(x.mean()))
    assert iv.low == pytest.approx(iv.value - 1.96 * se, abs=0.12 * 1.96 * se)
    assert iv.high == pytest.approx(iv.value + 1.96 * se, abs=0.12 * 1.96 * se)
    assert iv.resamples == 2000 and iv.level == 0.95
    assert iv.format(".2f") == f"{iv.value:.2f} [{iv.low:.2f}, {iv.high:.2f}]"


def test_bootstrap_coverage():
    """Over 150 data sets of 40 exponential draws, the 90% interval of the mean covers the true mean about
    90% of the time (binomial sd 2.4%; the percentile bootstrap undercovers a little for skewed data)."""
    gen = torch.Generator().manual_seed(7)
    hits = 0
    for _ in range(150):
        x = torch.empty(40, dtype=torch.float64).exponential_(1.0, generator=gen)
        iv = stats.bootstrap_mean(x, resamples=300, level=0.9, seed=int(torch.randint(0, 10**6, (1,), generator=gen)))
        hits += iv.low <= 1.0 <= iv.high
    assert 0.78 <= hits / 150 <= 0.97


def test_bootstrap_resamples_groups_independently_and_is_seeded():
    seen = []

    def stat(i, j):
        seen.append((i.clone(), j.clone()))
        return float(i.double().mean() - j.double().mean())

    a = stats.bootstrap(stat, [7, 6], resamples=50, seed=3)
    assert torch.equal(seen[0][0], torch.arange(7)) and torch.equal(seen[0][1], torch.arange(6))
    resampled, jackknife = seen[1:51], seen[51:]
    assert all(len(i) == 7 and len(j) == 6 and int(i.max()) < 7 and int(j.max()) < 6 for i, j in resampled)
    assert sorted((len(i), len(j)) for i, j in jackknife) == [(6, 6)] * 7 + [(7, 5)] * 6  # leave one out
    assert a == stats.bootstrap(lambda i, j: float(i.double().mean() - j.double().mean()), [7, 6], resamples=50,
                                seed=3)
    assert a != stats.bootstrap(lambda i, j: float(i.double().mean() - j.double().mean()), [7, 6], resamples=50,
                                seed=4)


@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99])
def test_bootstrap_gives_no_interval_from_fewer_examples_than_its_level_holds(level):
    """A percentile interval of n examples' mean stays within their range, which holds the centre of a symmetric
    distribution with probability 1 - 2^(1 - n) only (checked by counting the 2^n sign patterns): below
    min_examples_for(level) examples in any group, no interval and no resampling; from it on, one."""
    n = stats.min_examples_for(level)
    for m in (n - 1, n):
        patterns = list(itertools.product((0, 1), repeat=m))
        straddle = sum(0 < sum(p) < m for p in patterns) / len(patterns)  # some below, some above the centre
        assert straddle == pytest.approx(1 - 2.0 ** (1 - m))
        assert (straddle >= level) == (m == n)
    calls = []

    def mean(i):
        calls.append(len(i))
        return float(torch.arange(20, dtype=torch.float64)[i].mean())

    short = stats.bootstrap(mean, [n - 1], resamples=30, level=level)
    assert short.value == pytest.approx((n - 2) / 2) and math.isnan(short.low) and math.isnan(short.high)
    assert calls == [n - 1] and not short.excludes(-100.0)  # no resample drawn; no star from it
    two = stats.bootstrap(lambda i, j: mean(i) - mean(j), [n + 4, n - 1], resamples=30, level=level)
    assert math.isnan(two.low)  # any group short
    full = stats.bootstrap(mean, [n], resamples=30, level=level)
    assert full.low <= full.value <= full.high and math.isfinite(full.low)


@pytest.mark.parametrize("name", ["mean", "std"])
def test_bca_interval_matches_scipy(name):
    """The BCa interval against scipy.stats.bootstrap(method='BCa') on the same data: equal to within the
    Monte Carlo error of 4000 resamples each (a few percent of the interval's width). The standard deviation
    is biased under resampling, so it exercises the bias correction and the acceleration."""
    import numpy as np
    from scipy.stats import bootstrap as scipy_bootstrap

    x = torch.empty(60, dtype=torch.float64).exponential_(1.0, generator=torch.Generator().manual_seed(3))
    fn = {"mean": lambda v: float(v.mean()), "std": lambda v: float(v.std(unbiased=False))}[name]
    ours = stats.bootstrap(lambda i: fn(x[i]), [len(x)], resamples=4000, level=0.9)
    ref = scipy_bootstrap((x.numpy(),), {"mean": np.mean, "std": np.std}[name], n_resamples=4000,
                          confidence_level=0.9, method="BCa", random_state=0).confidence_interval
    width = ref.high - ref.low
    assert ours.low == pytest.approx(ref.low, abs=0.06 * width)
    assert ours.high == pytest.approx(ref.high, abs=0.06 * width)


def test_bootstrap_undefined_cases():
    one = stats.bootstrap_mean(torch.tensor([2.0]))
    assert one.value == 2.0 and math.isnan(one.low) and not one.defined and one.format() == "2.000"
    nan = stats.bootstrap(lambda i: math.nan, [4])
    assert nan.format() == "n/a" and nan.resamples == 0
    assert stats.Interval(0.5, 0.1, 0.9, 0.95, 10).excludes(0.0)
    assert not stats.Interval(0.5, -0.1, 0.9, 0.95, 10).excludes(0.0)
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_mean(torch.ones(3), level=1.5)


def brute_force_pvalue(d):
    obs = sum(d) / len(d)
    flips = [sum(s * x for s, x in zip(signs, d, strict=True)) / len(d)
             for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(f >= obs - 1e-12 for f in flips) / len(flips)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_flip_exact_matches_brute_force(seed):
    d = torch.randn(9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.3
    assert stats.sign_flip_pvalue(d) == pytest.approx(brute_force_pvalue(d.tolist()), abs=1e-12)


def test_sign_flip_extremes_and_monte_carlo():
    assert stats.sign_flip_pvalue(torch.ones(10)) == pytest.approx(1 / 1024)
    assert stats.sign_flip_pvalue(-torch.ones(10)) == 1.0
    assert math.isnan(stats.sign_flip_pvalue(torch.zeros(0)))
    d = torch.randn(18, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.4
    exact = stats.sign_flip_pvalue(d[:16])  # exact path
    assert exact == pytest.approx(brute_force_pvalue(d[:16].tolist()), abs=1e-12)
    # Monte Carlo path (n > 16) against brute force: 20000 draws give a standard error below 0.004
    mc = stats.sign_flip_pvalue(d, resamples=20000)
    assert mc == pytest.approx(brute_force_pvalue(d.tolist()), abs=0.015)


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e-11, 1e-13, 1e9])
def test_sign_flip_does_not_depend_on_the_unit(scale):
    """Ties (patterns of equal sums) are ties at any scale; a difference of 1e-11 is no tie with 0."""
    d = torch.tensor([3.0, 1.0, 2.0, -1.0, 1.0, 2.0, -2.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    ref = sum(f >= 1 - 1e-9 for f in [  # in units of the observed mean, exact in binary for these values
        sum(s * x for s, x in zip(signs, d.tolist(), strict=True)) / float(d.sum())
        for signs in itertools.product((1, -1), repeat=len(d))]) / 2 ** len(d)
    assert stats.sign_flip_pvalue(d * scale) == pytest.approx(ref, abs=1e-15)
    wide = torch.cat([d, d[:8]]) * scale  # 18: the Monte Carlo path, the same at every scale (one seed)
    assert stats.sign_flip_pvalue(wide) == stats.sign_flip_pvalue(torch.cat([d, d[:8]]))


@pytest.mark.parametrize("n", [5, 21])
def test_sign_flip_of_a_non_finite_difference_is_nan(n):
    for bad in (math.nan, math.inf, -math.inf):
        d = torch.ones(n, dtype=torch.float64)
        d[2] = bad
        assert math.isnan(stats.sign_flip_pvalue(d)), (n, bad)


def test_the_bootstrap_counts_its_resamples_for_a_progress_bar(monkeypatch):
    """agreement_intervals drives one bar over tasks x figures x resamples (shown on a terminal only, after 2 s:
    100,000 resamples ran minutes without a word), and the numbers do not depend on it."""
    from tiny import counting_bars

    import headscore.intervals as intervals

    Bar, bars = counting_bars()
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 7 + [1] * 8)
    a = intervals.ExampleMaps(torch.rand(15, 2, 3, generator=g, dtype=torch.float64), labels, ["x", "y"])
    b = intervals.ExampleMaps(torch.rand(15, 2, 3, generator=g, dtype=torch.float64), labels, ["x", "y"])
    quiet = intervals.agreement_intervals(a, b, 2, resamples=50)
    monkeypatch.setattr(intervals, "tqdm", Bar)
    monkeypatch.setattr(intervals.sys.stderr, "isatty", lambda: True, raising=False)
    shown = intervals.agreement_intervals(a, b, 2, resamples=50, progress=True)
    assert [(bar.total, bar.n, bar.disable) for bar in bars] == [(2 * 2 * 50, 2 * 2 * 50, False)]
    assert {t: {k: (iv.low, iv.high) for k, iv in row.items()} for t, row in shown.items()} == \
        {t: {k: (iv.low, iv.high) for k, iv in row.items()} for t, row in quiet.items()}


def _efron_acceleration(statistic, samples):
    """Efron and Tibshirani (1993, 14.3) for several samples, written from the book: each sample's jackknife
    values centred on their own mean, U = (n - 1)(mean - value), a = sum U^3 / n^3 / (6 (sum U^2 / n^2)^1.5)."""
    num = den = 0.0
    for g, sample in enumerate(samples):
        n = len(sample)
        values = []
        for i in range(n):
            rest = [s if h != g else torch.cat([s[:i], s[i + 1:]]) for h, s in enumerate(samples)]
            values.append(statistic(*rest))
        u = [(n - 1) * (sum(values) / n - v) for v in values]
        num += sum(x ** 3 for x in u) / n ** 3
        den += sum(x ** 2 for x in u) / n ** 2
    return num / (6 * den ** 1.5)


@pytest.mark.parametrize("sizes", [[7], [6, 9], [12, 6, 8]])
def test_acceleration_of_several_groups_follows_efron(sizes):
    """The acceleration of a statistic of several independent groups (a difference of means, a ratio of a
    skewed group's mean to another's) equals the several-sample formula, which centres each group's jackknife
    values on their own mean (the pooled form was 0.049 where the formula gives 0.017); one group is the usual
    sum d^3 / (6 (sum d^2)^1.5)."""
    gen = torch.Generator().manual_seed(sum(sizes))
    samples = [torch.empty(n, dtype=torch.float64).exponential_(1.0 + g, generator=gen) ** (1 + g)
               for g, n in enumerate(sizes)]

    def statistic(*xs):
        return float(xs[0].mean()) / (1.0 + sum(float(x.mean()) for x in xs[1:]))

    ours = stats._acceleration(lambda *idx: statistic(*(s[i] for s, i in zip(samples, idx, strict=True))), sizes)
    assert ours == pytest.approx(_efron_acceleration(statistic, samples), rel=1e-12, abs=1e-15)
    assert abs(ours) > 1e-3  # skewed enough that a wrong weighting shows


def test_no_interval_where_the_resamples_fall_on_one_side_of_the_figure():
    """The Spearman of two noisy mean maps (270 heads, 40 examples a file, noise 4x the signal): resampling
    duplicates examples and pulls every resample's correlation below the figure, so there is no interval
    (reason 'bias'; the plain percentile interval given before lay wholly below the figure, e.g. 0.750
    [0.517, 0.647]), and ``agreement_table`` lists the figure under ``biased``. Every interval that is given
    holds its figure."""
    from headscore.intervals import agreement_table
    from headscore.results import HeadScores

    n, gen = 40, torch.Generator().manual_seed(1)
    signal = torch.randn(30, 9, generator=gen, dtype=torch.float64)

    def scores(name):
        ex = signal + 4.0 * torch.randn(n, 30, 9, generator=gen, dtype=torch.float64)
        return HeadScores(ex.mean(0)[None], (ex.std(0) / n ** 0.5)[None], torch.tensor([n]), ["task"], "taylor",
                          "m", name, example_values=ex.float(), example_tasks=torch.zeros(n, dtype=torch.long))

    row = agreement_table(scores("a"), scores("b"), 10, resamples=300)["task"]
    assert math.isnan(row["spearman_ci"][0]) and math.isnan(row["spearman_ci"][1])
    assert row["biased"] == ["spearman"]
    low, high = row["topk_overlap_ci"]
    assert low <= row["topk_overlap"] <= high
    # the same figure straight from the bootstrap says why
    a = scores("a").example_values.double()
    b = scores("b").example_values.double()
    iv = stats.bootstrap(lambda i, j: stats.spearman(a[i].mean(0).flatten().numpy(), b[j].mean(0).flatten().numpy()),
                         [n, n], resamples=300)
    assert not iv.defined and iv.reason == "bias" and iv.resamples == 300


@pytest.mark.parametrize("seed", range(6))
def test_every_interval_given_holds_its_figure(seed):
    """Figures of every kind (a mean, a skewed ratio, a correlation, a maximum whose resamples sit below it) on
    small samples: an interval that is given holds its figure; one that is not says why."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty(8, dtype=torch.float64).exponential_(1.0, generator=gen) ** 2
    y = x + torch.randn(8, generator=gen, dtype=torch.float64)
    figures = {"mean": (lambda i: float(x[i].mean()), [8]),
               "ratio": (lambda i, j: float(x[i].mean() / y[j].abs().mean()), [8, 8]),
               "corr": (lambda i: float(torch.corrcoef(torch.stack([x[i], y[i]]))[0, 1]), [8]),
               "max": (lambda i: float(x[i].max()), [8]),
               # every resample below the figure (1): the plain percentile interval was [0.5, 0.75]
               "distinct share": (lambda i: len(set(i.tolist())) / 8, [8])}
    for name, (fn, sizes) in figures.items():
        iv = stats.bootstrap(fn, sizes, resamples=400, seed=seed)
        if iv.defined:
            assert iv.low <= iv.value <= iv.high, name
            assert iv.reason == ""
        else:
            assert iv.reason in {"bias", "undefined"}, name
    assert stats.bootstrap(lambda i: float(x[i].mean()), [5]).reason == "examples"


def test_a_bias_correction_that_would_move_the_interval_past_the_figure_gives_none():
    """97.6% of the resamples below the figure: z0 = 1.98, inside MAX_BIAS_Z, but BCa's lower percentile
    (Phi(2 z0 - 1.96) = 97.7%) lies past the figure's own (97.6%), so the interval would not hold the figure:
    none. At 90% of them below (z0 = 1.28) the interval is given and holds it."""
    draws = torch.arange(1000, dtype=torch.float64) / 1000
    assert stats._bca_levels(draws, 0.9755, 0.0, 0.95) is None
    low, high = stats._bca_levels(draws, 0.8995, 0.0, 0.95)
    assert low <= 0.9 <= high
