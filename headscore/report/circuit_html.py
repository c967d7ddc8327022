"""``circuit.html``: the circuits as one self-contained interactive page (Bokeh, JavaScript inlined, offline).

One graph per task, laid out as the static picture (:mod:`headscore.report.circuit`): hover an edge for its
writer, reader and score, hover a node for its name and how many circuit edges go in and out; click a head
(or an MLP, the embeddings) to light its incoming and outgoing edges and list them under the graph. As the
report page does, a script writes what BokehJS rendered into ``<pre id="render-check">`` (panels, edges per
panel, the tooltips) and script errors into ``<pre id="js-errors">``, for a headless browser to check.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from bokeh.embed import components
from bokeh.models import ColumnDataSource, CustomJS, HoverTool, TapTool
from bokeh.plotting import figure

from .circuit import _KV, _QUERY, NodePlaces, drawn_edges
from .page import page, plain_title

__all__ = ["circuit_divs", "circuit_page", "circuit_panel", "circuit_panels"]

_TAP_JS = """
const i = nodes.selected.indices[0];
const e = edges.data;
const n = e.upstream.length;
const alpha = new Array(n), lines = [];
if (i === undefined) {
  for (let k = 0; k < n; k++) alpha[k] = e.base_alpha[k];
  document.getElementById(info).innerHTML = "Click a node to see its edges.";
} else {
  const name = nodes.data.name[i];
  for (let k = 0; k < n; k++) {
    const into = e.feeds[k].split(",").includes(name), out = e.upstream[k] === name;
    alpha[k] = (into || out) ? 0.95 : 0.06;
    if (into || out) lines.push((out ? "out: " : "in: ") + e.upstream[k] + " -> " + e.downstream[k] + " (" +
                               e.score[k].toPrecision(3) + ")");
  }
  document.getElementById(info).innerHTML = "<b>" + name + "</b>: " + lines.length + " edges<br>" +
    lines.join("<br>");
}
edges.data = Object.assign({}, e, {alpha: alpha});
"""

_CHECK_JS = """
<script>
(function () {
  var expected = %(expected)s;
  function check(tries) {
    var B = window.Bokeh, out = {panels: [], edges: {}, tooltips: [], click: null};
    var first = null;
    if (B && B.index) {
      Array.from(B.index.all_views()).forEach(function (v) {
        var name = v.model && v.model.name;
        if (name && name.indexOf("circuit:") === 0) {
          var task = name.slice(8);
          out.panels.push(task);
          v.model.renderers.forEach(function (r) {
            if (r.name === "edges") out.edges[task] = r.data_source.data.upstream.length;
            if (r.name === "nodes" && first === null) first = r.data_source;
          });
          v.model.toolbar.tools.forEach(function (tool) {
            if (tool.tooltips) tool.tooltips.forEach(function (t) { out.tooltips.push(t[0]); });
          });
        }
      });
    }
    if (out.panels.length < expected && tries > 0) { setTimeout(function () { check(tries - 1); }, 100); return; }
    if (first !== null) {  // click the first panel's busiest node, as a user would
      var d = first.data, best = 0;
      for (var i = 0; i < d.name.length; i++) if (d.in[i] + d.out[i] > d.in[best] + d.out[best]) best = i;
      first.selected.indices = [best];
      setTimeout(function () {  // the click's callback runs asynchronously
        out.click = {node: d.name[best], in: d.in[best], out: d.out[best],
                     info: document.getElementById("circuit-info-0").textContent};
        document.getElementById("render-check").textContent = JSON.stringify(out);
      }, 300);
      return;
    }
    document.getElementById("render-check").textContent = JSON.stringify(out);
  }
  document.addEventListener("DOMContentLoaded", function () { check(100); });
})();
</script>
"""


def _feeds(places: NodePlaces, reader: str) -> str:
    """The upstream nodes a reader feeds, comma-joined (a key/value head feeds its whole group)."""
    if reader == "logits":
        return "logits"
    m = _QUERY.match(reader)
    if m:
        return f"L{m.group(1)}.H{m.group(2)}"
    m = _KV.match(reader)
    if m:
        layer, j = m.group(1), int(m.group(2))
        return ",".join(f"L{layer}.H{h}" for h in range(j * places.group, (j + 1) * places.group))
    return reader  # an MLP's input feeds that MLP, named alike


MAX_DRAWN_HTML = 600
"""The most edges a page's panel draws (the largest by |score|)."""


def circuit_panel(circuit: Any, info: str) -> Any:
    """One task's graph; a click on a node lists its edges in the page's element ``info``."""
    places = NodePlaces(circuit.upstream, circuit.downstream)
    scores = np.asarray(circuit.scores, dtype=float)
    drawn, total = drawn_edges(circuit, MAX_DRAWN_HTML)
    pairs = [tuple(p) for p in drawn.tolist()]
    pairs.sort(key=lambda p: abs(scores[p]))
    top = max((abs(scores[p]) for p in pairs), default=1.0) or 1.0
    e: dict[str, list] = {k: [] for k in ("x0", "y0", "x1", "y1", "upstream", "downstream", "feeds", "score",
                                          "width", "color", "alpha", "base_alpha", "dash")}
    for u, v in pairs:
        up, down = circuit.upstream[u], circuit.downstream[v]
        x0, y0 = places.writer(up)
        x1, y1, kind = places.reader(down)
        s = float(scores[u, v])
        for key, value in (("x0", x0), ("y0", y0), ("x1", x1), ("y1", y1), ("upstream", up), ("downstream", down),
                           ("feeds", _feeds(places, down)), ("score", s), ("width", 0.6 + 5 * abs(s) / top),
                           ("color", "#c0392b" if s > 0 else "#2e6fd6"), ("alpha", 0.7), ("base_alpha", 0.7),
                           ("dash", {"k": "dashed", "v": "dotted"}.get(kind, "solid"))):
            e[key].append(value)
    edge_src = ColumnDataSource(e)
    names = [*circuit.upstream, "logits"]
    ins = {n: 0 for n in names}
    outs = {n: 0 for n in names}
    for up, feeds in zip(e["upstream"], e["feeds"], strict=True):
        outs[up] += 1
        for f in feeds.split(","):
            ins[f] = ins.get(f, 0) + 1
    xy = [places.writer(n) for n in circuit.upstream] + [(places.mid, float(places.layers))]
    used = [ins[n] + outs[n] > 0 for n in names]
    node_src = ColumnDataSource({"x": [p[0] for p in xy], "y": [p[1] for p in xy], "name": names,
                                 "in": [ins[n] for n in names], "out": [outs[n] for n in names],
                                 "size": [9 if u else 4 for u in used],
                                 "color": ["black" if u else "#cccccc" for u in used]})
    width = int(max(560, 44 * (places.heads + 2)))
    height = int(max(380, 22 * (places.layers + 3)))
    faith = getattr(circuit, "faithfulness", float("nan"))
    title = f"{circuit.task}: {total} edges" + (f", faithfulness {faith:.2f}" if faith == faith else "") + \
        (f"; largest {len(pairs)} drawn" if len(pairs) < total else "") + \
        ("; none of the top edges lies on a path from the input to the logits" if total == 0 else "")
    fig = figure(width=width, height=height, title=plain_title(title), tools="pan,wheel_zoom,reset",
                 name=f"circuit:{circuit.task}",
                 x_range=(-0.8, places.heads + 1.3), y_range=(-1.6, places.layers + 0.6))
    fig.xaxis.axis_label, fig.yaxis.axis_label = "head (mlp at the right)", "layer (emb below, logits above)"
    lines = fig.segment("x0", "y0", "x1", "y1", source=edge_src, line_width="width", line_color="color",
                        line_alpha="alpha", line_dash="dash", name="edges")
    dots = fig.scatter("x", "y", source=node_src, size="size", color="color", name="nodes")
    fig.add_tools(HoverTool(renderers=[lines], tooltips=[("edge", "@upstream -> @downstream"),
                                                         ("score", "@score{0.0000}")], line_policy="interp"))
    fig.add_tools(HoverTool(renderers=[dots], tooltips=[("node", "@name"), ("edges in", "@in"),
                                                        ("edges out", "@out")]))
    fig.add_tools(TapTool(renderers=[dots]))
    node_src.selected.js_on_change("indices", CustomJS(args={"nodes": node_src, "edges": edge_src, "info": info},
                                                       code=_TAP_JS))
    return fig


def circuit_panels(circuits: Sequence[Any]) -> list[Any]:
    """One graph per circuit, for :func:`bokeh.embed.components`; :func:`circuit_divs` places their divs."""
    return [circuit_panel(c, f"circuit-info-{i}") for i, c in enumerate(circuits)]


def circuit_divs(divs: Sequence[str]) -> str:
    """The graphs' divs, each followed by the paragraph a click on one of its nodes fills."""
    return "".join(f"{div}<p id='circuit-info-{i}' class='info'>Click a node to see its edges.</p>"
                   for i, div in enumerate(divs))


def circuit_page(circuits: Sequence[Any], *, title: str = "Circuits", curve_png: bytes | None = None) -> str:
    """The interactive page of ``circuits`` (one graph per task) as a self-contained HTML string; with
    ``curve_png`` the faithfulness curve (PNG bytes) is shown under the graphs."""
    import base64

    script, divs = components(circuit_panels(circuits))
    panels = circuit_divs(divs)
    rows = "".join(f"<tr><th scope='row'>{html.escape(str(c.task))}</th><td>{int(np.asarray(c.edges).sum())}</td>"
                   f"<td>{getattr(c, 'faithfulness', float('nan')):.3f}</td></tr>" for c in circuits)
    curve = "" if curve_png is None else (
        f"<h2>Faithfulness against size</h2><img alt='faithfulness curve' style='max-width:100%' "
        f"src='data:image/png;base64,{base64.b64encode(curve_png).decode()}'>")
    check = _CHECK_JS % {"expected": json.dumps(len(circuits))}
    style = """table { border-collapse: collapse; margin-bottom: 1em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th[scope=row] { text-align: left; }"""
    body = f"""<p>Edges from writers (embeddings, heads, MLPs) to readers (a head's query: solid; a key: dashed;
a value: dotted; an MLP or the logits: solid), width by |score|, red where patching the edge raises the loss, blue where
it lowers it. Hover an edge or a node; click a node to light its edges.</p>
<table><tr><th>task</th><th>edges</th><th>faithfulness</th></tr>{rows}</table>
{panels}
{curve}"""
    return page(title, style=style, scripts=f"{script}\n{check}", body=body)
