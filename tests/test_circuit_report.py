"""Circuit pictures and the circuit page (issue 25): the static figure draws the circuit's edges (at most the
largest MAX_DRAWN), the faithfulness curve its points, and circuit.html renders in a real browser with the
hover, the node click and no script error."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from test_html_report import chromium, external_references, pre, render  # noqa: F401 - chromium: a fixture

from headscore.edges.circuit import FaithfulnessPoint, connected, top_circuit
from headscore.edges.graph import EdgeGraph
from headscore.report.circuit import MAX_DRAWN, NodePlaces, circuit_figure, drawn_edges, faithfulness_figure
from headscore.report.circuit_html import _feeds, circuit_page, circuit_panel


@dataclass
class FakeCircuit:
    task: str
    upstream: list
    downstream: list
    edges: torch.Tensor
    scores: torch.Tensor
    curve: list = field(default_factory=list)
    faithfulness: float = 0.8


def circuits(n_edges: int, tasks=("alpha", "beta & <b>")) -> list[FakeCircuit]:
    g = EdgeGraph(6, 4, 2)
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in tasks:
        scores = torch.randn(g.allowed.shape, generator=gen, dtype=torch.float64).masked_fill(~g.allowed, float("nan"))
        edges = top_circuit(g, scores, n_edges)
        curve = [FaithfulnessPoint(n, int(top_circuit(g, scores, n).sum()), 0.0, f) for n, f in
                 ((10, 0.1), (50, 0.5), (100, 0.9))]
        out.append(FakeCircuit(t, g.upstream, g.downstream, edges, scores, curve))
    return out


def test_the_figure_draws_the_circuit_edges_and_no_more_than_the_cap():
    small = circuits(20)
    fig = circuit_figure(small)
    ax = fig.axes[0]
    drawn = [line for line in ax.get_lines() if len(line.get_xdata()) == 2]  # edges: two-point lines
    assert len(drawn) == int(small[0].edges.sum()) > 0
    assert ax.get_title().startswith(f"alpha: {int(small[0].edges.sum())} edges")
    big = circuits(400)
    pairs, total = drawn_edges(big[0], MAX_DRAWN)
    assert total == int(big[0].edges.sum()) > MAX_DRAWN and len(pairs) == MAX_DRAWN
    size = big[0].scores.abs().numpy()
    kept = size[pairs[:, 0], pairs[:, 1]]
    rest = np.sort(size[np.asarray(big[0].edges)])[::-1]
    assert np.allclose(np.sort(kept)[::-1], rest[:MAX_DRAWN])  # the largest |score| ones
    ax = circuit_figure(big).axes[0]
    assert f"largest {MAX_DRAWN} by |score| drawn" in ax.get_title()
    curve = faithfulness_figure(big).axes[0]
    assert [list(line.get_ydata()) for line in curve.get_lines()[:2]] == [[0.1, 0.5, 0.9]] * 2


def test_key_and_value_readers_feed_their_whole_group():
    g = EdgeGraph(2, 4, 2)
    places = NodePlaces(g.upstream, g.downstream)
    assert _feeds(places, "L1.KV1.v") == "L1.H2,L1.H3"
    assert _feeds(places, "L0.H3.q") == "L0.H3" and _feeds(places, "L1.mlp") == "L1.mlp"
    assert _feeds(places, "logits") == "logits"
    assert torch.equal(connected(g, torch.zeros_like(g.allowed)), torch.zeros_like(g.allowed))


def test_the_page_is_self_contained_and_escapes_task_names():
    page = circuit_page(circuits(30))
    assert external_references(page) == []
    assert "beta & <b>" not in page and "beta &amp; &lt;b&gt;" in page


def test_task_names_are_titled_as_written():
    """A graph's title is PlainText: BokehJS would typeset a string's $$...$$, \\(...\\) or \\[...\\] as TeX."""
    from bokeh.models import PlainText

    for c in circuits(20, tasks=("$$x^2$$ sums", r"ratio \(a/b\)", r"\[y\] display")):
        title = circuit_panel(c, "circuit-info-0").title.text
        assert isinstance(title, PlainText) and title.text.startswith(f"{c.task}: {int(c.edges.sum())} edges")


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_renders_in_chromium(chromium, tmp_path):  # noqa: F811 - the fixture
    cs = circuits(40)
    path = tmp_path / "circuit.html"
    path.write_text(circuit_page(cs), encoding="utf-8")
    done = render(chromium, path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert pre(dom, "js-errors").strip() == "", pre(dom, "js-errors")
    check = json.loads(pre(dom, "render-check"))
    assert check["panels"] == [c.task for c in cs]
    assert check["edges"] == {c.task: int(c.edges.sum()) for c in cs}
    assert {"edge", "score", "node", "edges in", "edges out"} <= set(check["tooltips"])
    click = check["click"]  # the page clicked the first panel's busiest node: its edges are listed
    assert click["info"].startswith(f"{click['node']}: {click['in'] + click['out']} edges")
    listed = re.findall(r"(in|out): (\S+) -> (\S+) \(", click["info"])
    assert len(listed) == click["in"] + click["out"] > 0
    assert all((kind == "out") == (up == click["node"]) for kind, up, _ in listed)
    shot = tmp_path / "shot.png"
    done = render(chromium, path, f"--screenshot={shot}", "--window-size=1200,1400")
    assert done.returncode == 0 and shot.stat().st_size > 20_000
    assert re.search(r"Click a node to see its edges", dom)


def test_the_report_of_edge_scores_draws_their_circuits(tmp_path, capsys):
    from tiny_saved import save_tiny_model

    from headscore.cli import main

    model = save_tiny_model(tmp_path / "model")
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": p, "target": t, "task": k}) + "\n" for p, t, k in
                             (("ab cd", " e", "x"), ("fg hi", " j", "x"), ("kl mn", " o", "y"))))
    assert main(["score", "--model", str(model), "--tasks", str(tasks), "--edges", "--no-progress",
                 "--out", str(tmp_path / "s.hs")]) == 0
    assert main(["report", str(tmp_path / "s.hs"), "--circuit-edges", "12", "--out", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    assert (tmp_path / "rep" / "circuit.png").stat().st_size > 10_000
    page = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    assert page.count("id='circuit-info-") == 2 and "circuit:x" in page and "circuit:y" in page
    assert external_references(page) == []
    assert "circuit.png" in (tmp_path / "rep" / "summary.md").read_text(encoding="utf-8")
    plain = tmp_path / "plain.hs"
    assert main(["score", "--model", str(model), "--tasks", str(tasks), "--no-progress", "--out", str(plain)]) == 0
    assert main(["report", str(plain), "--out", str(tmp_path / "rep2")]) == 0
    assert not (tmp_path / "rep2" / "circuit.png").exists()
    assert "circuit-info" not in (tmp_path / "rep2" / "index.html").read_text(encoding="utf-8")
    # exact patching of the top edges only (every head value NaN): its circuits are drawn, no head is ranked
    exact = tmp_path / "exact.hs"
    assert main(["ablate", "--model", str(model), "--tasks", str(tasks), "--edges", "--scores", str(tmp_path / "s.hs"),
                 "--top", "6", "--no-progress", "--out", str(exact)]) == 0
    assert main(["report", str(exact), "--out", str(tmp_path / "rep3")]) == 0, capsys.readouterr().err
    assert (tmp_path / "rep3" / "circuit.png").stat().st_size > 10_000
    summary = (tmp_path / "rep3" / "summary.md").read_text(encoding="utf-8")
    assert summary.count("No head heatmap: this file holds edge values only") == 1 and "nan" not in summary
    assert "## Top" not in summary and not (tmp_path / "rep3" / "heatmaps.png").exists()


@pytest.mark.slow
@pytest.mark.browser
def test_the_report_with_circuits_renders_without_errors(chromium, tmp_path):  # noqa: F811 - the fixture
    from test_html_report import make_scores

    from headscore.report import write_report

    s = make_scores(2, 6, 4, seed=3, names=["alpha", "beta & <b>"])
    paths = write_report(s, tmp_path / "rep", circuits=circuits(30))
    done = render(chromium, paths["html"], "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert pre(done.stdout, "js-errors").strip() == "", pre(done.stdout, "js-errors")
    assert json.loads(pre(done.stdout, "render-check"))["panels"] == list(s.tasks)
    assert done.stdout.count('id="circuit-info-') == 2
