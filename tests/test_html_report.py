"""index.html: self-contained, small enough, and really rendered by a headless Chromium without network.

The browser tests need Debian's ``chromium``. When it is missing they try ``apt-get install chromium``
(as root, where apt-get exists) and otherwise skip, saying why.
"""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from headscore.compare import compare
from headscore.report import html_page, write_report
from headscore.results import HeadScores

NO_NETWORK = ["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]


def make_scores(tasks: int, layers: int, heads: int, seed: int = 0, names: list[str] | None = None,
                method: str = "taylor") -> HeadScores:
    g = torch.Generator().manual_seed(seed)
    return HeadScores(values=torch.randn(tasks, layers, heads, generator=g, dtype=torch.float64),
                      stderr=torch.rand(tasks, layers, heads, generator=g, dtype=torch.float64) * 0.1,
                      counts=torch.full((tasks,), 12, dtype=torch.int64),
                      tasks=names or [f"task {i}" for i in range(tasks)], method=method, model="random-model",
                      data_hash="abc123", extra={"seconds": 1.5})


def external_references(page: str) -> list[str]:
    """src= / href= attributes of the page's elements that point anywhere but into the page itself.

    Script bodies are left out: BokehJS carries a MathJax loader with a CDN address that runs only for
    LaTeX labels, which the report never draws: its titles of user text are PlainText, not parsed for TeX
    (the browser test renders with the network blocked)."""
    markup = re.sub(r"<script[^>]*>.*?</script>", "<script></script>", page, flags=re.S)
    return [m for m in re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", markup)
            if not m.startswith(("data:", "#"))]


def test_page_is_self_contained_and_escapes_names():
    names = ["<script>alert(1)</script>", "Math & logic"]
    s = make_scores(2, 4, 3, names=names)
    page = html_page(s, comparison={n: {"spearman": 0.5, "kendall": 0.4, "topk_overlap": 0.3} for n in names},
                     png=b"\x89PNG fake")
    assert external_references(page) == []
    assert names[0] not in page  # nowhere raw: not in the markup, not in any script's data
    assert html_lib.escape(names[0]) in page and "Math &amp; logic" in page
    assert "data:image/png;base64," in page  # the static fallback, inline
    assert "Agreement with ablation" in page and "0.500" in page
    # intervals over examples, where the comparison has them
    with_ci = {n: {"spearman": 0.5, "kendall": 0.4, "topk_overlap": 0.3, "spearman_ci": [0.2, 0.7],
                   "topk_overlap_ci": [0.1, 0.6], "level": 0.95, "resamples": 1000, "paired": False} for n in names}
    page = html_page(s, comparison=with_ci)
    assert "<td>0.500 [0.200, 0.700]</td>" in page and "<td>0.30 [0.10, 0.60]</td>" in page
    assert "95% bootstrap intervals over examples (1000 resamples, each file resampled on its own)" in page


def test_page_for_32x32_with_8_tasks_stays_small():
    s = make_scores(8, 32, 32, seed=1)
    page = html_page(s, ablation=make_scores(8, 32, 32, seed=2, method="ablation-zero"))
    size = len(page.encode("utf-8"))
    assert size < 5 * 2**20, f"{size / 2**20:.2f} MiB"


def test_report_compare_table(tmp_path):
    a, b = make_scores(3, 5, 4, seed=3), make_scores(3, 5, 4, seed=4, method="fisher")
    paths = write_report(a, tmp_path / "r", other_comparison=compare(a, b), other_name="fisher (b.hs)")
    page = paths["html"].read_text()
    assert "Agreement with fisher (b.hs)" in page
    for task in a.tasks:
        assert f"<th scope='row'>{task}</th>" in page


def _models(page_scores: HeadScores, ablation: HeadScores | None = None) -> dict[str, object]:
    """The page's Bokeh models by name (panels ``panel:TASK``, ``detail-bars``, ``detail-scatter``), as drawn."""
    from headscore.report.html import _figures
    from headscore.report.inputs import ablation_values, stderr_values, task_values

    vals = task_values(page_scores)
    abl = None if ablation is None else ablation_values(page_scores, ablation)
    grid, detail, known = _figures(page_scores, vals, stderr_values(page_scores, vals.shape), abl, None)
    named = {m.name: m for root in (grid, detail) for m in root.references() if getattr(m, "name", None)}
    return {**named, "known": known}


def test_a_page_of_40_tasks_is_drawn():
    """Each panel's click callback once held every panel's source: Bokeh's serializer recursed from one to the
    next, and a file of about 30 tasks raised RecursionError (40 here, to stay fast; the browser test clicks a
    page of 60). One callback serves every panel now."""
    s = make_scores(40, 2, 2, seed=8)
    page = html_page(s, ablation=make_scores(40, 2, 2, seed=9, names=list(s.tasks), method="ablation-zero"))
    assert page.count('"name":"panel:') == 40
    assert page.count('"name":"CustomJS"') == 1


TEX_NAMES = ["$$x^2$$ sums", r"ratio \(a/b\)", r"\[y\] display", "cost in $$"]


def test_task_names_are_shown_as_written_not_typeset():
    """BokehJS typesets a title's string between $$, \\( \\) or \\[ \\] as TeX; the titles of user text are
    PlainText, which it draws as written (the circuit graphs' titles: tests/test_circuit_report.py)."""
    from bokeh.models import PlainText

    s = make_scores(4, 3, 2, seed=10, names=TEX_NAMES)
    models = _models(s, make_scores(4, 3, 2, seed=11, names=TEX_NAMES, method="ablation-zero"))
    for name in TEX_NAMES:
        title = models[f"panel:{name}"].title.text
        assert isinstance(title, PlainText) and title.text == name
    scatter = models["detail-scatter"].title.text
    assert isinstance(scatter, PlainText) and re.fullmatch(rf"{re.escape(TEX_NAMES[0])}: L\d\.H\d in red", scatter.text)
    assert isinstance(models["detail-bars"].yaxis[0].axis_label, PlainText)


def test_infinite_scores_are_ranked_and_only_empty_cells_are_not():
    """+inf is the largest score (rank 1, where the page opens), -inf the smallest ranked one; a NaN cell (a head
    its layer lacks) has no rank."""
    v = torch.arange(12, dtype=torch.float64).reshape(1, 3, 4) / 10
    v[0, 1, 1], v[0, 2, 3], v[0, 0, 2] = float("inf"), float("-inf"), float("nan")
    s = HeadScores(values=v, stderr=torch.full_like(v, 0.01), counts=torch.tensor([5]), tasks=["a"],
                   method="taylor", model="m")
    models = _models(s)
    rank = models["panel:a"].renderers[0].data_source.data["rank"]
    flat = v.flatten().tolist()
    ranked = sorted((i for i in range(12) if flat[i] == flat[i]), key=lambda i: -flat[i])  # NaN != NaN
    expected = [float("nan")] * 12
    for r, i in enumerate(ranked, start=1):
        expected[i] = float(r)
    assert np.array_equal(rank, expected, equal_nan=True)
    assert rank[5] == 1 and rank[11] == 11 and np.isnan(rank[2])
    assert models["known"] == {"task": "a", "index": 5}
    assert models["detail-bars"].title.text.startswith("Head L1.H1: ")


def test_the_detail_view_holds_its_whiskers():
    """The bars' y range covers the 95% t intervals, not only the bars (score +- t(0.975, 3) x 0.3 here)."""
    v = torch.zeros(3, 2, 2, dtype=torch.float64)
    v[:, 0, 0] = torch.tensor([1.0, 0.5, 0.8])
    s = HeadScores(values=v, stderr=torch.full_like(v, 0.3), counts=torch.tensor([4, 4, 4]), tasks=["a", "b", "c"],
                   method="taylor", model="m")
    bars = _models(s)["detail-bars"]
    half = 3.182446305284263 * 0.3  # t(0.975, 3 degrees of freedom), from a table
    assert bars.title.text.startswith("Head L0.H0: ")
    assert list(bars.renderers[0].data_source.data["hi"]) == pytest.approx([1.0 + half, 0.5 + half, 0.8 + half])
    assert bars.y_range.start <= min(0.0, 0.5 - half) and bars.y_range.end >= 1.0 + half
    assert bars.y_range.end < 1.0 + 2 * half  # and fits them, not some far larger range


# ------------------------------------------------------------------------------------------- the browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _chromium()
    if path is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        for step in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                     ["apt-get", "install", "-y", "-q", "chromium"]):  # the package lists may be empty at first
            subprocess.run(step, capture_output=True, timeout=900)
            path = _chromium()
            if path:
                break
    if path is None:
        pytest.skip("no chromium: install Debian's package (apt-get install chromium) to run the browser tests")
    return path


def render(chromium: str, page: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *NO_NETWORK,
           "--virtual-time-budget=15000", *flags, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def pre(dom: str, ident: str) -> str:
    m = re.search(rf'<pre id="{ident}"[^>]*>(.*?)</pre>', dom, re.S)
    assert m, f"no <pre id={ident}> in the rendered DOM"
    return html_lib.unescape(m.group(1))


@pytest.mark.slow
@pytest.mark.browser
def test_page_renders_in_chromium(chromium, tmp_path):
    """Every task panel is a rendered Bokeh view, a known cell's hover data is right, no script error."""
    s = make_scores(5, 6, 4, seed=5, names=["alpha", "beta", "gamma & co", "delta", "epsilon"])
    abl = make_scores(5, 6, 4, seed=6, names=list(s.tasks), method="ablation-zero")
    paths = write_report(s, tmp_path / "rep", ablation=abl, comparison=compare(s, abl))
    done = render(chromium, paths["html"], "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert pre(dom, "js-errors").strip() == "", pre(dom, "js-errors")
    check = json.loads(pre(dom, "render-check"))
    assert check["panels"] == list(s.tasks)
    top = int(s.values[0].flatten().argmax())  # the cell the page reports: task 0's top head
    layer, head = divmod(top, 4)
    hover = check["hover"]
    assert (hover["task"], hover["layer"], hover["head"], hover["rank"]) == ("alpha", layer, head, 1)
    assert hover["value"] == pytest.approx(float(s.values[0, layer, head]), rel=1e-12)
    assert hover["stderr"] == pytest.approx(float(s.stderr[0, layer, head]), rel=1e-12)
    assert check["tooltips"] == ["task", "layer", "head", "score", "stderr", "rank", "ablation"]
    table = re.search(r"<table class=\"agreement\">.*?</table>", dom, re.S)
    assert table and all(f">{html_lib.escape(t)}</th>" in table.group(0) for t in s.tasks)


@pytest.mark.slow
@pytest.mark.browser
def test_screenshot_shows_the_grid(chromium, tmp_path):
    s = make_scores(8, 30, 9, seed=7)
    paths = write_report(s, tmp_path / "rep")
    shot = tmp_path / "shot.png"
    done = render(chromium, paths["html"], f"--screenshot={shot}", "--window-size=1400,1200")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@pytest.mark.slow
@pytest.mark.browser
def test_a_page_of_60_tasks_clicks_in_chromium(chromium, tmp_path):
    """A click on the last of 60 panels (one callback serves them all) shows its head on every task, with a y
    range that holds every finite whisker (an infinite score among them), titles of TeX-like task names as
    written (PlainText, also after the click), and a scatter title that fits its plot for a long task name (cut
    at 420 px before)."""
    from headscore.report.html import BAR_CAPTION

    long_name = "high_school_macroeconomics, WWW MMM (a long name, as MMLU's subjects are)"
    names = [f"task {i}" for i in range(55)] + TEX_NAMES + [long_name]  # the click goes to the last
    s = make_scores(60, 3, 2, seed=12, names=names)
    start = int(s.values[0].flatten().argmax())
    index = (start + 1) % 6  # another head than the one the page opens on
    layer, head = divmod(index, 2)
    s.values[7, layer, head], s.stderr[59, layer, head] = float("inf"), 4.0  # whiskers of +-8.8, off the first view
    abl = make_scores(60, 3, 2, seed=13, names=names, method="ablation-zero")
    page = html_page(s, ablation=abl)
    known = re.search(r"known = (\{.*?\});", page)
    assert known and json.loads(known.group(1)) == {"task": "task 0", "index": start}
    path = tmp_path / "index.html"
    path.write_text(page.replace(known.group(0), f"known = {json.dumps({'task': names[-1], 'index': index})};"))
    done = render(chromium, path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert pre(done.stdout, "js-errors").strip() == "", pre(done.stdout, "js-errors")
    check = json.loads(pre(done.stdout, "render-check"))
    assert check["panels"] == names
    assert check["titles"][:-1] == [{"kind": "PlainText", "text": n} for n in names[:-1]]
    cut = check["titles"][-1]  # too long for its panel: what fits, and an ellipsis (the hover has it all)
    assert cut["kind"] == "PlainText" and cut["text"].endswith("\u2026") and long_name.startswith(cut["text"][:-1])
    assert 10 < len(cut["text"]) < len(long_name) // 2
    bars = check["bars"]
    assert bars["title"] == f"Head L{layer}.H{head}: {BAR_CAPTION}"
    assert bars["value"][:7] == pytest.approx(s.values[:7, layer, head].tolist(), rel=1e-12)
    assert bars["value"][7] is None  # JSON's inf
    ends = [y for y in bars["lo"] + bars["hi"] if y is not None]
    assert max(ends) > 8 and bars["range"][0] <= min(*ends, 0) and bars["range"][1] >= max(ends)
    fit = check["scatter"].pop("fit")
    assert check["scatter"] == {"kind": "PlainText", "text": f"{names[-1]}: L{layer}.H{head} in red"}
    assert 0 < fit["title_px"] <= fit["frame_px"], fit  # the title is not cut
