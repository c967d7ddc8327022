"""What the report claims and leaves out: no blank head heatmap for a file without head values (exact edge
patching), and no interval or spread from too few examples (one or two per task)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from bokeh.models import Whisker
from scipy import stats as scipy_stats
from test_html_report import chromium, pre, render  # noqa: F401 - chromium: a fixture
from tiny import random_examples, tiny_model

import headscore
from headscore.edges.faithfulness import score_circuits
from headscore.intervals import agreement_table
from headscore.report import html as html_report
from headscore.report import markdown_summary, write_report
from headscore.report.heatmaps import build_heatmap_figure
from headscore.results import HeadScores

# ------------------------------------------------------------------------------- a file without head values


@pytest.fixture(scope="module")
def exact_edges() -> HeadScores:
    """Exact patching of every edge of a 2-layer, 2-head model: edge values, every head value NaN."""
    torch.manual_seed(0)
    lm = tiny_model("llama", layers=2, heads=2, kv_heads=1, dtype=torch.float64)
    examples = random_examples(4, tasks=("alpha", "beta"), seed=3)
    return headscore.ablate_edges(lm, examples, baseline="zero", progress=False)


def test_the_report_of_exact_edge_patching_draws_no_blank_heatmap(exact_edges, tmp_path):
    assert bool(exact_edges.values.isnan().all()) and exact_edges.has_edges  # what `ablate --edges` writes
    circuits = score_circuits(exact_edges, 12)
    paths = write_report(exact_edges, tmp_path / "rep", circuits=circuits)
    written = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert written == ["circuit.pdf", "circuit.png", "index.html", "summary.md"], written
    assert "heatmaps_png" not in paths and "heatmaps_pdf" not in paths
    summary = paths["summary"].read_text(encoding="utf-8")
    assert "heatmaps.png" not in summary and "(circuit.png)" in summary
    notes = [line for line in summary.splitlines() if line.startswith("No head heatmap")]
    assert len(notes) == 1 and "edge" in notes[0] and "NaN" not in notes[0], notes
    assert "## Top" not in summary  # no table of heads, when no head has a value
    page = paths["html"].read_text(encoding="utf-8")
    assert '"name":"panel:alpha"' not in page and '"name":"panel:beta"' not in page  # no grid of empty panels
    assert '"name":"detail-bars"' not in page and "Static grid (PNG)" not in page and "alt='heatmap grid'" not in page
    assert re.search(r"<p class='no-heatmap'>No head heatmap[^<]*edge", page)
    assert "circuit:alpha" in page and "circuit:beta" in page  # the circuits are still there


def test_a_task_without_head_values_is_labelled_not_left_blank():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    values[1] = math.nan
    s = HeadScores(values, values.abs() * 0.1, torch.tensor([5, 5]), ["has values", "none"], "taylor", "m")
    fig = build_heatmap_figure(s)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["has values", "none"]
    assert [t.get_text() for t in panels[0].texts] == []
    assert [t.get_text() for t in panels[1].texts] == ["no head values"]


# --------------------------------------------------------------------------------------- too few examples


def scores_of(per_example: dict[str, np.ndarray], method: str, data_hash: str = "h") -> HeadScores:
    """HeadScores of per-example maps ({task: [n, L, H]}): mean and standard error computed here, with numpy."""
    tasks = list(per_example)
    values = np.stack([x.mean(0) for x in per_example.values()])
    stderr = np.stack([x.std(0, ddof=1) / math.sqrt(len(x)) if len(x) > 1 else np.full(x.shape[1:], np.nan)
                       for x in per_example.values()])
    examples = np.concatenate(list(per_example.values()))
    labels = np.concatenate([np.full(len(x), i) for i, x in enumerate(per_example.values())])
    return HeadScores(torch.from_numpy(values), torch.from_numpy(stderr),
                      torch.tensor([len(x) for x in per_example.values()]), tasks, method, "m", data_hash,
                      example_values=torch.from_numpy(examples).float(), example_tasks=torch.from_numpy(labels))


@pytest.fixture(scope="module")
def few() -> tuple[HeadScores, HeadScores]:
    """Scores and ablation of the same examples: 'one' has 1, 'two' 2, 'six' 6 (4 layers x 3 heads)."""
    rng = np.random.default_rng(0)
    sizes = {"one": 1, "two": 2, "six": 6}
    base = {t: rng.normal(size=(4, 3)) for t in sizes}
    est = {t: base[t] + 0.5 * rng.normal(size=(n, 4, 3)) for t, n in sizes.items()}
    truth = {t: base[t] + 0.5 * rng.normal(size=(n, 4, 3)) for t, n in sizes.items()}
    return scores_of(est, "taylor"), scores_of(truth, "ablation-zero")


def _rows(text: str) -> dict[str, str]:
    """The agreement table's rows of a summary: task -> its Spearman cell."""
    table = text.split("## Agreement with ablation")[1].split("## ")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ("one", "two", "six"):
            rows[cells[0]] = cells[1]
    return rows


def test_no_agreement_interval_from_one_or_two_examples(few):
    scores, ablation = few
    table = agreement_table(scores, ablation, 3, resamples=200)
    text = markdown_summary(scores, ablation=ablation, comparison=table, k=3)
    rows = _rows(text)
    low, high = table["six"]["spearman_ci"]
    assert rows["six"] == f"{table['six']['spearman']:.3f} [{low:.3f}, {high:.3f}]"  # six examples: shown
    for task in ("one", "two"):  # a bootstrap of one or two examples is no interval: the figure alone
        assert rows[task] == f"{table[task]['spearman']:.3f}", rows[task]
    notes = [line for line in text.splitlines() if line.startswith("No interval")]
    assert len(notes) == 1 and "one (1 example)" in notes[0] and "two (2 examples)" in notes[0], notes
    assert "a 95% bootstrap interval needs at least 6 examples" in notes[0]
    page = html_report.html_page(scores, ablation=ablation, comparison=table)
    assert f"<td>{table['two']['spearman']:.3f}</td>" in page and f"<td>{table['one']['spearman']:.3f}</td>" in page
    assert f"<td>{table['six']['spearman']:.3f} [{low:.3f}, {high:.3f}]</td>" in page
    assert "one (1 example), two (2 examples)" in page


def test_the_other_file_needs_enough_examples_too(few):
    """Files of different examples are resampled each on its own: the --compare file's count counts as well."""
    scores, _ = few
    rng = np.random.default_rng(1)
    other = scores_of({"one": rng.normal(size=(7, 4, 3)), "two": rng.normal(size=(9, 4, 3)),
                       "six": rng.normal(size=(2, 4, 3))}, "fisher", data_hash="other")
    table = agreement_table(scores, other, 3, resamples=200)
    assert not table["six"]["paired"] and not any(math.isfinite(c) for c in table["six"]["spearman_ci"])
    page = html_report.html_page(scores, other_comparison=table, other_name="fisher (o.hs)")
    assert f"<td>{table['six']['spearman']:.3f}</td>" in page  # 6 examples here, 2 there: no interval
    assert "No interval for one (1 and 7 examples), two (2 and 9 examples), six (6 and 2 examples)" in page
    assert "Brackets:" not in page


def test_no_interval_where_the_bias_is_too_large_and_the_report_says_why():
    """An agreement figure whose resamples almost all fall on one side of it has no interval in the summary and
    on the page, and a note names the task and the figure."""
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(30, 9))
    est = {"noisy": signal + 4.0 * rng.normal(size=(40, 30, 9))}
    truth = {"noisy": signal + 4.0 * rng.normal(size=(40, 30, 9))}
    scores, ablation = scores_of(est, "taylor", "a"), scores_of(truth, "ablation-zero", "b")
    table = agreement_table(scores, ablation, 10, resamples=200)
    assert table["noisy"]["biased"] == ["spearman"]
    text = markdown_summary(scores, ablation=ablation, comparison=table, k=10)
    note = "No interval for noisy (Spearman): almost every resample fell on one side of the figure"
    assert note in text
    page = html_report.html_page(scores, ablation=ablation, comparison=table)
    assert note in page and f"<td>{table['noisy']['spearman']:.3f}</td>" in page


def test_no_bracket_note_without_a_bracket(few):
    scores, ablation = few
    only = [t for t in scores.tasks if t != "six"]
    table = agreement_table(scores.select(only), ablation.select(only), 3, resamples=200)
    text = markdown_summary(scores.select(only), ablation=ablation.select(only), comparison=table, k=3)
    assert "Brackets:" not in text and "[" not in "".join(_rows(text).values())


def test_one_example_shows_no_standard_error(few):
    scores, _ = few
    text = markdown_summary(scores, k=2)
    one = text.split("### one")[1].split("###")[0]
    assert "nan" not in one and "±" not in one.split("|---")[-1]
    assert "no standard error" in one.splitlines()[0]
    six = text.split("### six")[1]
    assert " ± " in six  # six examples: score ± standard error


def test_the_page_whiskers_are_t_intervals_with_n_minus_1_degrees_of_freedom(few):
    scores, _ = few
    vals = scores.values.numpy()
    se = scores.stderr.numpy()
    _, detail, known = html_report._figures(scores, vals, se, None, None)
    whisker = detail.children[0].select_one({"type": Whisker})
    data = whisker.source.data
    layer, head = divmod(known["index"], 3)
    for t, n in enumerate(scores.counts.tolist()):
        v = vals[t, layer, head]
        if n < 2:  # no interval from one example
            assert math.isnan(data["lo"][t]) and math.isnan(data["hi"][t])
            continue
        half = scipy_stats.t.ppf(0.975, n - 1) * se[t, layer, head]
        assert data["lo"][t] == pytest.approx(v - half, rel=1e-12)
        assert data["hi"][t] == pytest.approx(v + half, rel=1e-12)
    assert "95% t interval" in detail.children[0].title.text


@pytest.mark.slow
@pytest.mark.browser
def test_the_pages_render_their_intervals_and_notes_in_chromium(chromium, few, exact_edges, tmp_path):  # noqa: F811
    scores, ablation = few
    paths = write_report(scores, tmp_path / "few", ablation=ablation,
                         comparison=agreement_table(scores, ablation, 3, resamples=200))
    done = render(chromium, paths["html"], "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert pre(done.stdout, "js-errors").strip() == "", pre(done.stdout, "js-errors")
    bars = json.loads(pre(done.stdout, "render-check"))["bars"]  # after a click on the first task's top head
    layer, head = divmod(int(np.nanargmax(scores.values[0].numpy())), 3)
    assert bars["task"] == list(scores.tasks) and "95% t interval" in bars["title"]
    for t, n in enumerate(scores.counts.tolist()):
        v, se = float(scores.values[t, layer, head]), float(scores.stderr[t, layer, head])
        assert bars["value"][t] == pytest.approx(v, rel=1e-12)
        if n < 2:  # NaN in the page, null in its JSON: no whisker
            assert bars["lo"][t] is None and bars["hi"][t] is None
            continue
        half = scipy_stats.t.ppf(0.975, n - 1) * se
        assert bars["lo"][t] == pytest.approx(v - half, rel=1e-9) and bars["hi"][t] == pytest.approx(v + half, rel=1e-9)
    paths = write_report(exact_edges, tmp_path / "exact", circuits=score_circuits(exact_edges, 12))
    done = render(chromium, paths["html"], "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert pre(done.stdout, "js-errors").strip() == "", pre(done.stdout, "js-errors")
    assert json.loads(pre(done.stdout, "render-check"))["panels"] == []
    assert "No head heatmap" in done.stdout
