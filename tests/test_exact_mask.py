"""The per-head ``exact`` mask of HeadScores: kept in the file, refused when broken, shown by compare and report."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
import torch
from matplotlib.patches import Rectangle

from headscore.checksum import checksummed
from headscore.cli import main
from headscore.compare import largest_differences
from headscore.errors import HeadscoreError
from headscore.report import html_page, markdown_summary
from headscore.report.heatmaps import EXACT_NOTE, build_heatmap_figure
from headscore.results import HeadScores

EXACT_CELLS = [(0, 1, 2), (0, 3, 0), (1, 0, 0), (2, 4, 3), (2, 2, 1), (2, 0, 3)]  # (task, layer, head)


def scores(exact: bool = True, seed: int = 0, method: str = "taylor") -> HeadScores:
    """3 tasks x 5 layers x 4 heads; with ``exact``, the cells of EXACT_CELLS are marked exact."""
    g = torch.Generator().manual_seed(seed)
    mask = None
    if exact:
        mask = torch.zeros(3, 5, 4, dtype=torch.bool)
        for cell in EXACT_CELLS:
            mask[cell] = True
    return HeadScores(torch.randn(3, 5, 4, generator=g, dtype=torch.float64),
                      torch.rand(3, 5, 4, generator=g, dtype=torch.float64), torch.tensor([3, 4, 5]),
                      ["a", "b", "c"], method, "tiny", "abc123", exact=mask)


def test_round_trip_select_and_absence(tmp_path):
    s = scores()
    back = HeadScores.load(s.save(tmp_path / "x.hs"))
    assert back.exact.dtype == torch.bool and torch.equal(back.exact, s.exact)
    assert back.exact_counts() == [2, 1, 3]
    sub = back.select(["c", "a"])
    assert torch.equal(sub.exact, s.exact[[2, 0]]) and sub.exact_counts() == [3, 2]
    plain = HeadScores.load(scores(exact=False).save(tmp_path / "plain.hs"))
    assert plain.exact is None and not plain.has_exact and plain.exact_counts() is None
    assert plain.select(["b"]).exact is None


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(3, 5, 3, dtype=torch.bool), "exact must be a bool mask [3, 5, 4], got torch.bool [3, 5, 3]"),
    (torch.zeros(3, 5, 4, dtype=torch.uint8), "exact must be a bool mask [3, 5, 4], got torch.uint8 [3, 5, 4]"),
    (torch.zeros(5, 4, dtype=torch.bool), "exact must be a bool mask [3, 5, 4], got torch.bool [5, 4]"),
])
def test_a_broken_mask_is_refused(tmp_path, bad, message):
    s = scores(exact=False)
    tensors = {"values": s.values, "stderr": s.stderr, "counts": s.counts, "exact": bad}
    path = tmp_path / "bad.hs"
    path.write_bytes(checksummed(tensors, s._metadata()))
    with pytest.raises(HeadscoreError) as err:
        HeadScores.load(path)
    assert str(err.value) == f"{path}: broken scores file ({message})"
    with pytest.raises(ValueError, match=re.escape(message)):
        HeadScores(s.values, s.stderr, s.counts, s.tasks, s.method, s.model, exact=bad)


def test_csv_and_json_carry_the_mask():
    s = scores()
    rows = list(csv.DictReader(io.StringIO(s.export_bytes(".csv").decode())))
    assert len(rows) == 60 and {r["exact"] for r in rows} == {"True", "False"}
    marked = {(s.tasks.index(r["task"]), int(r["layer"]), int(r["head"])) for r in rows if r["exact"] == "True"}
    assert marked == set(EXACT_CELLS)
    doc = json.loads(s.export_bytes(".json"))
    assert torch.equal(torch.tensor(doc["exact"]), s.exact)
    plain = scores(exact=False)
    assert "exact" not in plain.export_bytes(".csv").decode().splitlines()[0]
    assert "exact" not in json.loads(plain.export_bytes(".json")) and "exact" not in plain.to_rows()[0]


def test_compare_shows_exact_counts_and_marks_misses(tmp_path, capsys):
    a, b = scores(seed=1), scores(exact=False, seed=2, method="ablation-zero")
    b.values[0, 1, 2] = a.values[0, 1, 2] + 100  # task a's largest difference is at an exact head of A
    pa, pb = a.save(tmp_path / "a.hs"), b.save(tmp_path / "b.hs")
    misses = largest_differences(a, b, "a", 2)
    assert (misses[0].layer, misses[0].head, misses[0].a_exact, misses[0].b_exact) == (1, 2, True, False)
    assert not misses[1].a_exact  # (1, 2) is task a's only exact head with a big difference; the next is not
    assert main(["compare", str(pa), str(pb), "--misses", "2", "--resamples", "0",
                 "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "exact A / exact B: heads per task whose value is exact" in out and "of 20" in out
    header = next(line for line in out.splitlines() if line.startswith("task"))
    assert header.split()[-4:] == ["exact", "A", "exact", "B"]
    counts = {line.split()[0]: line.split()[-2:] for line in out.splitlines() if line[:2] in ("a ", "b ", "c ")}
    assert counts == {"a": ["2", "-"], "b": ["1", "-"], "c": ["3", "-"]}
    assert "; * = an exact value)" in out
    assert re.search(r"  a: 1\.2: [+-][\d.e+-]+\*, [+-][\d.e+-]+, ", out), out
    assert json.loads((tmp_path / "c.json").read_text())["_exact"] == {"A": {"a": 2, "b": 1, "c": 3}}
    # without a mask on either side: no exact column, no legend, no marks
    assert main(["compare", str(pb), str(pb), "--misses", "2", "--resamples", "0"]) == 0
    plain = capsys.readouterr().out
    assert "exact" not in plain and "*" not in plain


def _outlines(fig) -> list[list[tuple[float, float]]]:
    """Per panel, the lower-left corners of its Rectangle patches."""
    return [[r.get_xy() for r in ax.patches if isinstance(r, Rectangle)] for ax in fig.axes if ax.images]


def test_heatmap_outlines_each_exact_cell():
    s = scores()
    fig = build_heatmap_figure(s)
    outlines = _outlines(fig)
    assert [len(p) for p in outlines] == [2, 1, 3]
    for t, panel in enumerate(outlines):
        want = {(head - 0.5, layer - 0.5) for tt, layer, head in EXACT_CELLS if tt == t}
        assert set(panel) == want
    patch = next(ax for ax in fig.axes if ax.images).patches[0]
    assert not patch.get_fill() and patch.get_edgecolor()[:3] == (0.0, 0.0, 0.0)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [EXACT_NOTE]
    plain = build_heatmap_figure(scores(exact=False))
    assert _outlines(plain) == [[], [], []] and not plain.legends


def test_summary_and_html_mark_exact_heads():
    s = scores()
    md = markdown_summary(s, k=20)
    assert "- **Exact heads per task** (value measured by ablation/patching, not estimated; of 20): " \
           "a: 2, b: 1, c: 3" in md
    assert "| Score ± stderr | Exact |" in md and md.count("| yes |") == len(EXACT_CELLS)
    assert "Exact" not in markdown_summary(scores(exact=False))

    page = html_page(s)
    assert "Outlined cells: exact values" in page and '["exact","@exact"]' in page
    for t, task in enumerate(s.tasks):
        m = re.search(rf'"name":"exact:{task}".*?"entries":\[\["head",\[([\d,]*)\]\],\["layer",\[([\d,]*)\]\]\]',
                      page)
        assert m, f"no outline data for task {task}"
        cells = set(zip(map(int, m.group(2).split(",")), map(int, m.group(1).split(",")), strict=True))
        assert cells == {(layer, head) for tt, layer, head in EXACT_CELLS if tt == t}
    assert "Exact heads per task (of 20)</dt><dd>a: 2, b: 1, c: 3</dd>" in page
    plain = html_page(scores(exact=False))
    assert '"name":"exact:' not in plain and "@exact" not in plain and "Outlined cells" not in plain
