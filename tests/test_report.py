"""headscore.report: heatmap grid, scatter vs ablation, Markdown summary, full report."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats

from headscore import figures, report
from headscore.report import heatmaps, scatter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PDF_MAGIC = b"%PDF-"


@dataclass
class FakeScores:
    """Stand-in for headscore.results.HeadScores (only what report.py uses)."""

    values: torch.Tensor
    stderr: torch.Tensor
    counts: torch.Tensor
    tasks: list
    method: str = "taylor"
    model: str = "tiny-model"

    @property
    def num_layers(self) -> int:
        return int(self.values.shape[1])

    @property
    def num_heads(self) -> int:
        return int(self.values.shape[2])


def make_scores(t=8, layers=30, heads=9, seed=0, method="taylor", tasks=None):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(t, layers, heads, generator=g, dtype=torch.float64)
    stderr = torch.rand(t, layers, heads, generator=g, dtype=torch.float64) * 0.1
    return FakeScores(values, stderr, torch.arange(10, 10 + t, dtype=torch.int64),
                      tasks or [f"task {i}" for i in range(t)], method)


def _panels(fig):
    return [ax for ax in fig.axes if ax.images]


def _colorbars(fig):
    return [ax for ax in fig.axes if not ax.images and ax.get_ylabel() == report.COLORBAR_LABEL]


def _check_files(paths, stem):
    assert [p.name for p in paths] == [stem + ".png", stem + ".pdf"]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC
    assert paths[1].read_bytes()[:5] == PDF_MAGIC
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("t, layers, heads, shape", [(8, 30, 9, (2, 4)), (1, 4, 4, (1, 1)), (3, 30, 9, (1, 3)),
                                                     (5, 4, 4, (2, 4)), (10, 4, 4, (3, 4))])
def test_heatmap_figure_layout(t, layers, heads, shape):
    s = make_scores(t, layers, heads)
    assert report.grid_shape(t) == shape
    fig = heatmaps.build_heatmap_figure(s)
    panels = _panels(fig)
    assert len(panels) == t
    assert len(_colorbars(fig)) == 1 and len(fig.axes) == t + 1
    assert [ax.get_title() for ax in panels] == s.tasks
    for ax in panels:
        assert ax.images[0].origin == "lower" and ax.images[0].get_cmap().name == "viridis"
        ticks = [*ax.get_xticks(), *ax.get_yticks()]
        assert all(float(x).is_integer() for x in ticks)
    # shared colour scale over all panels
    lims = {ax.images[0].get_clim() for ax in panels}
    assert lims == {(float(s.values.min()), float(s.values.max()))}
    # axis labels: "Head" under the bottom panel of each column, "Layer" left of each row
    assert panels[-1].get_xlabel() == "Head" and panels[0].get_ylabel() == "Layer"
    assert "taylor" in fig.get_suptitle() and "tiny-model" in fig.get_suptitle()


def test_heatmap_tall_grid_not_squashed_and_ticks_thinned(tmp_path):
    fig = heatmaps.build_heatmap_figure(make_scores(8, 30, 9))
    _check_files(figures.save_figure(fig, tmp_path / "tall"), "tall")  # lays the figure out
    for ax in _panels(fig):
        box = ax.get_window_extent()
        assert box.height > box.width > 0.35 * box.height
        assert len(ax.get_yticks()) <= 10  # 30 layers: thinned
    big = heatmaps.build_heatmap_figure(make_scores(1, 64, 40))
    ax = _panels(big)[0]
    assert len(ax.get_xticks()) < 40 and len(ax.get_yticks()) < 64 and ax.get_yticks()[0] == 0


def test_heatmap_absolute_and_title():
    s = make_scores(3, 4, 4)
    fig = heatmaps.build_heatmap_figure(s, absolute=True, title="My title", ncols=2)
    panels = _panels(fig)
    np.testing.assert_allclose(np.asarray(panels[1].images[0].get_array()), s.values[1].abs().numpy())
    assert panels[0].images[0].get_clim()[0] >= 0
    assert fig.get_suptitle() == "My title"
    signed = heatmaps.build_heatmap_figure(s)
    np.testing.assert_allclose(np.asarray(_panels(signed)[1].images[0].get_array()), s.values[1].numpy())


def test_heatmap_grid_writes_png_and_pdf(tmp_path):
    _check_files(report.heatmap_grid(make_scores(3, 4, 4), tmp_path / "sub" / "heat.png"), "heat")
    assert figures._stem(tmp_path / "a.png") == figures._stem(tmp_path / "a.PDF") == tmp_path / "a"
    assert figures._stem(tmp_path / "a.b") == tmp_path / "a.b"


def test_scatter_spearman_in_titles(tmp_path):
    s = make_scores(2, 5, 4, seed=1)
    abl_vals = s.values + 0.5 * torch.randn(s.values.shape, dtype=torch.float64)
    abl = FakeScores(abl_vals, s.stderr, s.counts, list(s.tasks), "ablation-zero")
    fig = scatter.build_scatter_figure(s, abl)
    axes = [ax for ax in fig.axes if ax.collections]
    assert len(axes) == 2
    for i, ax in enumerate(axes):
        rho = stats.spearmanr(s.values[i].flatten().numpy(), abl_vals[i].flatten().numpy()).statistic
        assert ax.get_title().splitlines()[0] == s.tasks[i]
        assert f"{rho:.3f}" in ax.get_title()
        assert len(ax.collections[0].get_offsets()) == 20  # one point per head
    _check_files(report.scatter_vs_ablation(s, abl, tmp_path / "sc.png"), "sc")


def test_scatter_reorders_tasks_and_accepts_arrays():
    s = make_scores(3, 4, 4)
    abl = FakeScores(s.values.flip(0), s.stderr, s.counts, s.tasks[::-1], "ablation-zero")
    fig = scatter.build_scatter_figure(s, abl)
    assert all("1.000" in ax.get_title() for ax in fig.axes)  # matched by task name, not position
    fig = scatter.build_scatter_figure(s, s.values.numpy() * 2)
    assert all("1.000" in ax.get_title() for ax in fig.axes)


def test_mismatched_ablation_raises(tmp_path):
    s = make_scores(3, 4, 4)
    other_grid = make_scores(3, 4, 5)
    other_tasks = make_scores(3, 4, 4, tasks=["a", "b", "c"])
    for bad, msg in [(other_grid, "layers x"), (other_tasks, "different tasks"), (torch.zeros(2, 4, 4), "tasks")]:
        with pytest.raises(ValueError, match=msg):
            report.scatter_vs_ablation(s, bad, tmp_path / "x")
        with pytest.raises(ValueError, match=msg):
            report.markdown_summary(s, ablation=bad)
        with pytest.raises(ValueError, match=msg):
            report.write_report(s, tmp_path / "rep", ablation=bad)
    assert not (tmp_path / "rep").exists() and not list(tmp_path.iterdir())


def test_markdown_top_k_lists_planted_heads():
    s = make_scores(2, 6, 5, seed=3)
    s.values[1].clamp_(-1, 1)
    planted = [(4, 2, 9.0), (0, 3, 7.0), (5, 0, 5.0)]  # task 1: (layer, head, value), in rank order
    for layer, head, v in planted:
        s.values[1, layer, head] = v
    s.values[1, 2, 2] = -50.0  # very negative: least important, not most
    text = report.markdown_summary(s, k=3)
    assert "tiny-model" in text and "taylor" in text
    section = text.split("### task 1")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    for rank, (row, (layer, head, v)) in enumerate(zip(rows, planted, strict=True), start=1):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == [str(rank), str(layer), str(head)]
        assert cells[3].startswith(f"{v:.4g} ± ")
    # task 0 top-3 match numpy's ordering
    section0 = text.split("### task 0")[1].split("###")[0]
    rows0 = [line for line in section0.splitlines() if line.startswith("| ") and line[2].isdigit()]
    top = np.argsort(-s.values[0].flatten().numpy())[:3]
    assert [tuple(int(c) for c in r.strip("|").split("|")[1:3]) for r in rows0] == [divmod(int(i), 5) for i in top]
    assert "(11 examples)" in text


def test_markdown_ablation_and_comparison():
    s = make_scores(2, 3, 3)
    abl = FakeScores(s.values * 10, s.stderr, s.counts, list(s.tasks), "ablation-zero")
    comparison = {"task 0": {"spearman": 0.91234, "kendall": 0.8, "topk_overlap": 0.5},
                  "task 1": {"spearman": -0.1, "kendall": -0.05, "topk_overlap": 0.0}}
    text = report.markdown_summary(s, k=2, ablation=abl, comparison=comparison)
    assert "| Ablation |" in text
    assert "| task 0 | 0.912 | 0.800 | 0.50 |" in text
    assert "| task 1 | -0.100 | -0.050 | 0.00 |" in text
    layer, head = divmod(int(s.values[0].flatten().argmax()), 3)
    assert f"| 1 | {layer} | {head} |" in text and f"{float(abl.values[0, layer, head]):.4g} |" in text
    # k larger than the grid is capped
    assert report.markdown_summary(s, k=100).count("\n| 9 |") == 2
    # intervals over examples, where the comparison has them
    comparison["task 0"].update(spearman_ci=[0.85, 0.95], topk_overlap_ci=[0.3, 0.7], level=0.9, resamples=500,
                                paired=True)
    text = report.markdown_summary(s, k=2, comparison=comparison)
    assert "| task 0 | 0.912 [0.850, 0.950] | 0.800 | 0.50 [0.30, 0.70] |" in text
    assert "90% bootstrap intervals over examples (500 resamples, paired" in text
    assert "| task 1 | -0.100 | -0.050 | 0.00 |" in text


def test_write_report(tmp_path):
    s = make_scores(2, 4, 4)
    abl = FakeScores(s.values + 0.1, s.stderr, s.counts, list(s.tasks), "ablation-zero")
    paths = report.write_report(s, tmp_path / "out", ablation=abl, k=3,
                                comparison={"task 0": {"spearman": 1.0, "kendall": 1.0, "topk_overlap": 1.0}})
    assert set(paths) == {"heatmaps_png", "heatmaps_pdf", "scatter_png", "scatter_pdf", "summary", "html"}
    assert paths["heatmaps_png"].read_bytes()[:8] == PNG_MAGIC
    assert paths["scatter_pdf"].read_bytes()[:5] == PDF_MAGIC
    summary = paths["summary"].read_text()
    assert "(heatmaps.png)" in summary and "(scatter.png)" in summary
    only = report.write_report(make_scores(1, 2, 2), tmp_path / "plain")
    assert set(only) == {"heatmaps_png", "heatmaps_pdf", "summary", "html"}
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["heatmaps.pdf", "heatmaps.png", "index.html",
                                                                      "summary.md"]
    positions = {"positions.png", "positions.pdf", "circuit.png", "circuit.pdf"}  # no per-position maps, no edges
    assert set(p.name for p in (tmp_path / "out").iterdir()) == set(report.REPORT_FILES) - positions


def test_write_report_with_per_position_scores(tmp_path):
    """Scores with per-position maps also get positions.png/pdf (each task's top heads by position), linked
    from summary.md; together with the ablation scatter that is every file the report may write but the circuit
    pictures of edge scores (tests/test_circuit_report.py)."""
    s = make_scores(2, 4, 4)
    s.positions = ["end-2", "end-1", "end", "end+1"]
    g = torch.Generator().manual_seed(1)
    s.position_values = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    s.position_counts = torch.tensor([[3, 3, 3, 0], [1, 3, 3, 2]])
    abl = FakeScores(s.values + 0.1, s.stderr, s.counts, list(s.tasks), "ablation-zero")
    paths = report.write_report(s, tmp_path / "out", ablation=abl, k=3)
    assert paths["positions_png"].read_bytes()[:8] == PNG_MAGIC
    assert "(positions.png)" in paths["summary"].read_text()
    assert set(p.name for p in (tmp_path / "out").iterdir()) == set(report.REPORT_FILES) - {"circuit.png",
                                                                                             "circuit.pdf"}
    fig = report.positions.build_position_figure(s, k=3)
    panels = _panels(fig)
    assert len(panels) == 2
    first = panels[0].images[0].get_array()
    assert first.shape == (3, 3)  # 3 heads; task 0 has no token at end+1, so 3 positions
    top = report.positions.top_heads(s.values[0].numpy(), 3)[0]
    assert first[0, 0] == s.position_values[0, top[0], top[1], 0]


def test_backend_untouched():
    import matplotlib

    before = matplotlib.get_backend()
    heatmaps.build_heatmap_figure(make_scores(1, 2, 2))
    assert matplotlib.get_backend() == before


LONG_NAMES = ["alpha", "high_school_macroeconomics", "high_school_government_and_politics",
              "PROFESSIONAL_PSYCHOLOGY_AND_MEDICINE", "b", "c"]


def _texts_outside_or_touching(fig) -> list[str]:
    """The figure's texts (titles, axis and tick labels) that reach beyond its edges, and panel titles that run
    into the figure's title, as drawn (measured text by text, not by the layout's own bounding box) at the PNG's
    resolution and at twice that (as the PDF's text, which is not hinted)."""
    bad = []
    for dpi in (figures.DPI, 2 * figures.DPI):
        fig.set_dpi(dpi)
        bad += [f"{dpi} dpi: {b}" for b in _texts_outside_at_this_dpi(fig)]
    return bad


def _texts_outside_at_this_dpi(fig) -> list[str]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    edge = fig.bbox
    suptitle = fig._suptitle.get_window_extent(renderer) if fig._suptitle is not None else None
    bad = []
    for ax in fig.axes:
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label]
        for axis in (ax.xaxis, ax.yaxis):  # the tick labels drawn: those of ticks inside the view
            lo, hi = sorted(axis.get_view_interval())
            texts += [tick.label1 for tick in axis.get_major_ticks() if lo - 1e-9 <= tick.get_loc() <= hi + 1e-9]
        for text in texts:
            if not text.get_text() or not text.get_visible():
                continue
            box = text.get_window_extent(renderer)
            if box.x0 < edge.x0 - 0.5 or box.y0 < edge.y0 - 0.5 or box.x1 > edge.x1 + 0.5 or box.y1 > edge.y1 + 0.5:
                bad.append(f"outside: {text.get_text()!r}")
            if text is ax.title and suptitle is not None and box.overlaps(suptitle):
                bad.append(f"under the figure's title: {text.get_text()!r}")
    return bad


@pytest.mark.parametrize("t, layers, heads", [(4, 30, 9), (6, 30, 9), (4, 6, 4), (6, 6, 4), (1, 30, 9), (8, 30, 9)])
def test_figures_hold_their_labels_and_long_task_names(tmp_path, t, layers, heads):
    """Every label inside the figure and no panel title under the figure's title, for task names of one and two
    lines (a one-row grid of SmolLM2's 30 x 9 cut its 'Head' labels; a two-line name ran into the title), in
    the heatmaps and the scatter; a name is broken after '_' (not inside a word) and shortened with '...'."""
    s = make_scores(t, layers, heads, tasks=LONG_NAMES[:t] + [f"task {i}" for i in range(t - len(LONG_NAMES))])
    for fig in (heatmaps.build_heatmap_figure(s), scatter.build_scatter_figure(s, make_scores(t, layers, heads,
                                                                                             seed=1, tasks=s.tasks))):
        figures.save_figure(fig, tmp_path / "f")
        assert _texts_outside_or_touching(fig) == []
        titles = [ax.get_title().split("\nSpearman")[0] for ax in _panels(fig) or fig.axes[:t]]
        for name, title in zip(s.tasks, titles, strict=False):
            assert title.replace("\n", "") == name or title.endswith("..."), (name, title)
            assert all(not line[-1].isalpha() or line == title.split("\n")[-1] for line in title.split("\n")), title


def test_task_and_model_names_with_dollars_are_drawn_as_written(tmp_path):
    """Two $ open matplotlib's mathtext: a task named 'cost in $$' stopped the whole report with a parse error,
    'x_$\\alpha$' was typeset. Titles, tick labels and the figure's title are drawn as written."""
    names = ["cost in $$", "price_$5_to_$10", "x_$\\alpha$"]
    s = make_scores(3, 4, 4, tasks=names)
    s.model = "my$model$"
    paths = report.write_report(s, tmp_path / "rep", ablation=make_scores(3, 4, 4, seed=1, tasks=names))
    assert paths["heatmaps_png"].is_file() and paths["scatter_png"].is_file()
    for fig in (heatmaps.build_heatmap_figure(s), scatter.build_scatter_figure(s, make_scores(3, 4, 4, seed=1,
                                                                                             tasks=names))):
        figures.save_figure(fig, tmp_path / "f")
        texts = [ax.title for ax in fig.axes if ax.get_title()] + [fig._suptitle]
        for text in texts:
            shown, math = text._preprocess_math(text.get_text())
            assert math is False, shown
        drawn = [t._preprocess_math(t.get_text())[0].replace("\\$", "$") for t in texts]
        assert [d.split("\nSpearman")[0] for d in drawn[:3]] == names and drawn[-1].endswith("my$model$")
