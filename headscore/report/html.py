"""``index.html``: one self-contained interactive page of a scores file, for a browser, offline.

The page holds the per-task heatmap grid (x = head, y = layer, viridis, one colour scale; hover a cell for
its task, layer, head, score, standard error, rank and ablation value; with an ``exact`` mask, exact cells
are outlined in black and the hover says ``exact: yes``), a detail view for the clicked head (its score on every
task, with 95% t intervals as whiskers inside its y range; with an ablation file, the task's score-vs-ablation
scatter with the head highlighted), the agreement tables, the provenance and the static PNG grid as a fallback.
Titles of user text (task names) are ``PlainText`` (:func:`~headscore.report.page.plain_title`): shown as
written, never typeset as TeX.

Plots are drawn by Bokeh with its JavaScript inlined (``Resources(mode="inline")``): no request leaves the
page. Bokeh rather than plotly: its inline bundle is about 2 MB where plotly's single bundle is 4.8 MB, which
alone would nearly fill the page's 5 MB budget, and its hover and tap tools and ``CustomJS`` callbacks cover
the interactions with a few lines of glue.

Once BokehJS has drawn the panels, a small script shortens a panel title wider than its plot (a long task name)
to what fits, with an ellipsis, measured in the title's font (the hover still shows the whole name). It also
writes what BokehJS really rendered (the panel views it built and the data under a known
cell's tooltip) into ``<pre id="render-check">`` and any script error into ``<pre id="js-errors">``, so a
headless browser's DOM dump can check the page (``tests/test_html_report.py``).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from bokeh.embed import components
from bokeh.layouts import column, gridplot, row
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    CustomJS,
    FactorRange,
    FixedTicker,
    HoverTool,
    LinearColorMapper,
    PlainText,
    Range1d,
    TapTool,
    Whisker,
)
from bokeh.palettes import Viridis256
from bokeh.plotting import figure

from .circuit_html import circuit_divs, circuit_panels
from .heatmaps import COLORBAR_LABEL
from .inputs import ablation_values, exact_mask, head_map_note, head_order, stderr_values, task_counts, task_values
from .layout import grid_shape, panel_size, tick_positions
from .page import page, plain_title
from .summary import comparison_cells
from .uncertainty import T_LEVEL, checked_comparison, counts_by_task, interval_notes, t_multiplier

__all__ = ["html_page"]

_PX_PER_INCH = 90
BAR_CAPTION = f"score per task, whiskers {T_LEVEL:.0%} t interval"
"""The detail view's title after ``Head L3.H5: `` (:data:`BAR_NOTE` says more under the heading)."""
BAR_NOTE = (f"Bars: the clicked head's score on each task; whiskers: the {T_LEVEL:.0%} t interval of the task's "
            "mean over its examples (n - 1 degrees of freedom: wide for few examples; none for a task of one).")

SCATTER_CAPTION = "L{layer}.H{head} in red"
"""The scatter's title after the task's name and ``: `` (:data:`SCATTER_NOTE` says more under the heading)."""
SCATTER_NOTE = ("Scatter (when the report has an ablation): the clicked task's heads, one point each, its score (x) "
                "against its ablation (y); the clicked head in red. A head with an infinite score is not drawn.")
SCATTER_WIDTH = 420
"""The scatter's width in pixels, widened where the longest title (a long task name) would be cut
(:func:`_scatter_width`)."""

BAR_PAD = 0.05
"""The detail view's y range: the finite bars, whiskers and 0, widened by this fraction of their span each side
(:func:`_bar_range`; ``_CLICK_JS`` computes the same after a click)."""

# One callback for every panel's selection (cb_obj: the Selection that changed; its panel is the one whose source
# holds it). One per panel, each holding every source, chained source -> selection -> callback -> next source, and
# Bokeh's serializer recursed down the chain: RecursionError from about 30 tasks. A title of user text is
# PlainText, made from the one already there (its constructor): a string would be typeset as TeX between $$,
# \( \) or \[ \].
_CLICK_JS = """
const i = cb_obj.indices[0];
if (i === undefined) return;
const own = srcs.find(function (s) { return s.selected === cb_obj; }).data, l = own.layer[i], h = own.head[i];
const tasks = [], v = [], lo = [], hi = [];
srcs.forEach(function (s, k) {
  const d = s.data, x = d.value[i], e = mult[k] * d.stderr[i];  // mult: NaN for one example, no whisker
  tasks.push(d.task[i]); v.push(x); lo.push(x - e); hi.push(x + e);
});
bar_src.data = {task: tasks, value: v, lo: lo, hi: hi};
const ys = v.concat(lo, hi, [0]).filter(Number.isFinite);
const top = Math.max.apply(null, ys), bottom = Math.min.apply(null, ys);
const pad = top > bottom ? pad_fraction * (top - bottom) : 0.5;
bar_fig.y_range.setv({start: bottom - pad, end: top + pad});
function plain(old, text) { return new old.constructor({text: text}); }
bar_fig.title.text = `Head L${l}.H${h}: ${bar_caption}`;  // no user text: a string
if (sc_src !== null) {
  sc_src.data = {x: own.value, y: own.ablation};
  hl_src.data = {x: [own.value[i]], y: [own.ablation[i]]};
  sc_fig.title.text = plain(sc_fig.title.text, `${own.task[i]}: ` + scatter_caption.replace("{layer}", l)
                                                                              .replace("{head}", h));
}
"""

_CHECK_JS = """
<script>
(function () {
  var expected = %(expected)s, known = %(known)s;
  // a panel's title wider than its plot (a long task name) is cut short with an ellipsis, measured in its own
  // font (Bokeh cut it off mid-letter); the hover shows the whole name
  var measure = document.createElement("canvas").getContext("2d");
  function width(t, text) {  // of ``text`` in title ``t``'s font
    measure.font = t.text_font_style + " " + t.text_font_size + " " + t.text_font;
    return measure.measureText(text).width;
  }
  function fitTitle(v) {
    var t = v.model.title, text = typeof t.text === "string" ? t.text : t.text.text, room = v.frame.bbox.width;
    if (width(t, text) <= room) return;
    var n = text.length;
    while (n > 1 && width(t, text.slice(0, n) + "\u2026") > room) n--;
    var short = text.slice(0, n) + "\u2026";
    t.text = typeof t.text === "string" ? short : new t.text.constructor({text: short});
  }
  function check(tries) {
    var B = window.Bokeh, out = {panels: [], titles: [], hover: null, tooltips: [], bars: null, scatter: null};
    var cells = null, bars = null, scatter = null, scatterView = null, panelViews = [];
    function label(t) { return typeof t === "string" ? {kind: "string", text: t} : {kind: t.type, text: t.text}; }
    if (B && B.index) {
      var views = Array.from(B.index.all_views());
      views.forEach(function (v) {
        var name = v.model && v.model.name;
        if (name && name.indexOf("panel:") === 0) {
          out.panels.push(name.slice(6));
          panelViews.push(v);
        }
        if (name === "detail-bars") bars = v.model;
        if (name === "detail-scatter") { scatter = v.model; scatterView = v; }
        if (name === "panel:" + known.task) {
          cells = v.model.renderers[0].data_source;
          var data = cells.data, i = known.index;
          out.hover = {task: data.task[i], layer: data.layer[i], head: data.head[i], value: data.value[i],
                       stderr: data.stderr[i], rank: data.rank[i]};
          v.model.toolbar.tools.forEach(function (tool) {
            if (tool.tooltips) out.tooltips = tool.tooltips.map(function (t) { return t[0]; });
          });
        }
      });
    }
    if (out.panels.length < expected && tries > 0) { setTimeout(function () { check(tries - 1); }, 100); return; }
    panelViews.forEach(function (v) { fitTitle(v); out.titles.push(label(v.model.title.text)); });
    if (cells !== null && bars !== null) {  // click the known cell, as a user would: the bars show its head
      cells.selected.indices = [known.index];
      setTimeout(function () {  // the click's callback runs asynchronously
        var d = bars.renderers[0].data_source.data;
        out.bars = {title: bars.title.text, task: Array.from(d.task), value: Array.from(d.value),
                    lo: Array.from(d.lo), hi: Array.from(d.hi), range: [bars.y_range.start, bars.y_range.end]};
        if (scatter !== null) {  // the title's width in its own font, against the plot frame it sits over
          out.scatter = label(scatter.title.text);
          out.scatter.fit = {title_px: width(scatter.title, out.scatter.text), frame_px: scatterView.frame.bbox.width};
        }
        cells.selected.indices = [];  // as it was: no cell highlighted until the user clicks one
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


def _ranks(vals: np.ndarray) -> np.ndarray:
    """Rank of each cell within its task, 1 = largest value, in :func:`~headscore.report.inputs.head_order`'s
    order; NaN for a cell without a value (NaN: a head its layer does not have), which has no rank.

    An infinite score is a value, the most extreme one: +inf ranks first, -inf after every finite score. (Taking
    it for "no value" left the largest head unranked, the ranks starting at 2 and the page opening on the
    second head.)"""
    flat = vals.reshape(vals.shape[0], -1)
    order = head_order(flat)  # NaN last, so the cells with a value hold ranks 1..k
    ranks = np.empty(order.shape, dtype=np.float64)
    rows = np.arange(flat.shape[0])[:, None]
    ranks[rows, order] = np.arange(1, flat.shape[1] + 1)[None, :]
    ranks[np.isnan(flat)] = np.nan
    return ranks.reshape(vals.shape)


def _bar_range(*columns: np.ndarray) -> tuple[float, float]:
    """The detail view's y range: its finite bars and whiskers (``columns``) and the bars' base 0, widened by
    :data:`BAR_PAD` of their span each side (0.5 when they are all one value). Bokeh's automatic range fits the
    bars only, and whiskers ran off the plot; ``_CLICK_JS`` computes the same range for a clicked head."""
    ys = np.concatenate([np.ravel(c) for c in columns] + [np.zeros(1)])
    ys = ys[np.isfinite(ys)]
    bottom, top = float(ys.min()), float(ys.max())
    pad = BAR_PAD * (top - bottom) if top > bottom else 0.5
    return bottom - pad, top + pad


_TITLE_PX_PER_CHAR = 8.5
"""An upper bound of a character's width in a plot title (Bokeh's bold 13 px sans-serif: 'W' and 'M' are about
12 px, most letters 6 to 8; a title of 60 mixed characters measured 410 px in Chromium)."""


def _scatter_width(task_names: Sequence[str], num_layers: int, num_heads: int) -> int:
    """The scatter's width: :data:`SCATTER_WIDTH`, or wide enough for its longest title (at most 1600 px; a
    longer task name is cut there, and shown whole in the panel's own title and the hover)."""
    caption = SCATTER_CAPTION.format(layer=num_layers - 1, head=num_heads - 1)
    longest = max((len(f"{name}: {caption}") for name in task_names), default=0)
    return int(min(max(SCATTER_WIDTH, 40 + _TITLE_PX_PER_CHAR * longest), 1600))


def _script_json(obj: Any) -> str:
    """JSON that is safe inside a <script> element: no user text can close the element or open a comment."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _agreement_table(title: str, comparison: Mapping[str, Any], counts: Mapping[str, int] | None,
                     other_counts: Mapping[str, int] | None) -> str:
    """An agreement table with its notes; intervals only where enough examples back them
    (:func:`~headscore.report.uncertainty.checked_comparison`)."""
    checked = checked_comparison(comparison, counts, other_counts)
    rows = []
    for task, entry in checked.entries.items():
        cells = comparison_cells(entry)
        tds = "".join(f"<td>{html.escape(cells[key])}</td>" for key in ("spearman", "kendall", "topk_overlap"))
        rows.append(f"<tr><th scope='row'>{html.escape(str(task))}</th>{tds}</tr>")
    notes = "".join(f"<p class='note'>{html.escape(note)}</p>" for note in interval_notes(checked))
    return (f"<h2>{html.escape(title)}</h2>" + notes
            + "<table class='agreement'><thead><tr><th>Task</th><th>Spearman</th>"
            f"<th>Kendall</th><th>Top-k overlap</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _provenance(scores: Any, counts: list[int] | None, exact: np.ndarray | None) -> str:
    items = [("Model", scores.model), ("Method", scores.method),
             ("Grid", f"{scores.values.shape[1]} layers x {scores.values.shape[2]} heads")]
    if getattr(scores, "data_hash", ""):
        items.append(("Data hash", scores.data_hash))
    if counts is not None:
        items.append(("Examples per task", ", ".join(f"{t}: {c}" for t, c in zip(scores.tasks, counts, strict=True))))
    if exact is not None:
        items.append((f"Exact heads per task (of {exact[0].size})", ", ".join(
            f"{t}: {int(m.sum())}" for t, m in zip(scores.tasks, exact, strict=True))))
    extra = getattr(scores, "extra", None) or {}
    if "seconds" in extra:
        items.append(("Time", f"{float(extra['seconds']):.1f} s"))
    versions = getattr(scores, "versions", None) or {}
    if versions:
        items.append(("Versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))))
    return "<h2>Provenance</h2><dl class='provenance'>" + "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items) + "</dl>"


def _figures(scores: Any, vals: np.ndarray, se: np.ndarray | None, abl: np.ndarray | None, ncols: int | None,
             exact: np.ndarray | None = None):
    n, num_layers, num_heads = vals.shape
    nrows, ncols = grid_shape(n, ncols)
    pw, ph = panel_size(num_layers, num_heads)
    width, height = max(int(pw * _PX_PER_INCH), 150) + 60, int(ph * _PX_PER_INCH) + 70
    xticks, yticks = tick_positions(num_heads, pw), tick_positions(num_layers, ph, spacing=0.22)
    finite = vals[np.isfinite(vals)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if low == high:
        low, high = low - 0.5, high + 0.5
    mapper = LinearColorMapper(palette=Viridis256, low=low, high=high, nan_color="#dddddd")
    ranks = _ranks(vals)
    layer, head = np.divmod(np.arange(num_layers * num_heads), num_heads)
    se = np.full_like(vals, np.nan) if se is None else se
    task_names = [str(t) for t in scores.tasks]

    # the detail view opens on task 0's top head; a click on any cell replaces it (_CLICK_JS)
    first = ranks[0].ravel()
    start_task, start_index = 0, int(np.nanargmin(first)) if np.isfinite(first).any() else 0
    sl, sh = divmod(start_index, num_heads)
    counts = task_counts(scores)
    mult = np.array([t_multiplier(c) for c in counts] if counts is not None else [np.nan] * n, dtype=np.float64)
    v0, e0 = vals[:, sl, sh], mult * se[:, sl, sh]
    bar_src = ColumnDataSource({"task": task_names, "value": v0, "lo": v0 - e0, "hi": v0 + e0})
    bar_fig = figure(x_range=FactorRange(*task_names), y_range=Range1d(*_bar_range(v0, v0 - e0, v0 + e0)),
                     height=300, width=max(500, 70 * n), title=f"Head L{sl}.H{sh}: {BAR_CAPTION}",
                     toolbar_location=None, name="detail-bars")
    bar_fig.vbar(x="task", top="value", width=0.7, source=bar_src, color="#3b528b")
    bar_fig.add_layout(Whisker(base="task", lower="lo", upper="hi", source=bar_src))
    bar_fig.xaxis.major_label_orientation = 0.6
    bar_fig.yaxis.axis_label = PlainText(f"Score ({scores.method})")
    detail = [bar_fig]
    sc_src = hl_src = sc_fig = None
    if abl is not None:
        sc_src = ColumnDataSource({"x": vals[start_task].ravel(), "y": abl[start_task].ravel()})
        hl_src = ColumnDataSource({"x": [vals[start_task, sl, sh]], "y": [abl[start_task, sl, sh]]})
        sc_fig = figure(height=360, width=_scatter_width(task_names, num_layers, num_heads),
                        toolbar_location=None, name="detail-scatter",
                        title=plain_title(f"{scores.tasks[start_task]}: "
                                          + SCATTER_CAPTION.format(layer=sl, head=sh)))
        sc_fig.scatter("x", "y", source=sc_src, size=6, alpha=0.6, color="#3b528b")
        sc_fig.scatter("x", "y", source=hl_src, size=12, color="#d62728")
        sc_fig.xaxis.axis_label = PlainText(f"Score ({scores.method})")
        sc_fig.yaxis.axis_label = "Ablation loss increase"
        detail.append(sc_fig)

    tooltips = [("task", "@task"), ("layer", "@layer"), ("head", "@head"), ("score", "@value{0.0000}"),
                ("stderr", "@stderr{0.0000}"), ("rank", "@rank")]
    if abl is not None:
        tooltips.append(("ablation", "@ablation{0.0000}"))
    if exact is not None:
        tooltips.append(("exact", "@exact"))
    panels, sources = [], []
    for t, task in enumerate(scores.tasks):
        cols = {"head": head, "layer": layer, "value": vals[t].ravel(), "stderr": se[t].ravel(),
                "rank": ranks[t].ravel(), "task": [str(task)] * len(head)}
        if abl is not None:
            cols["ablation"] = abl[t].ravel()
        if exact is not None:
            cols["exact"] = ["yes" if e else "no" for e in exact[t].ravel()]
        src = ColumnDataSource(cols)
        p = figure(title=plain_title(str(task)), x_range=(-0.5, num_heads - 0.5), y_range=(-0.5, num_layers - 0.5),
                   width=width, height=height, tools="reset", toolbar_location=None, name=f"panel:{task}")
        cells = p.rect("head", "layer", 1, 1, source=src, fill_color={"field": "value", "transform": mapper},
                       line_color=None)
        if exact is not None:  # exact cells outlined; plain lists, so the page's data shows them as written
            ls, hs = np.nonzero(exact[t])
            p.rect("head", "layer", 1, 1, source=ColumnDataSource({"head": hs.tolist(), "layer": ls.tolist()}),
                   fill_color=None, line_color="black", line_width=1.5, name=f"exact:{task}")
        p.add_tools(TapTool(renderers=[cells]), HoverTool(tooltips=tooltips, renderers=[cells]))
        p.grid.visible = False
        p.xaxis.ticker = FixedTicker(ticks=[int(x) for x in xticks])
        p.yaxis.ticker = FixedTicker(ticks=[int(y) for y in yticks])
        p.axis.minor_tick_line_color = None
        p.title.text_font_size = "10pt"
        p.xaxis.axis_label = "Head" if t + ncols >= n else None
        p.yaxis.axis_label = "Layer" if t % ncols == 0 else None
        panels.append(p)
        sources.append(src)
    # the shared colour bar in a plot of its own, beside the grid (an invisible glyph keeps Bokeh's checks quiet)
    bar_plot = figure(width=110, height=min(height * nrows, 2 * height), toolbar_location=None,
                      outline_line_color=None, name="colorbar")
    bar_plot.rect(x=[0], y=[0], width=0, height=0, alpha=0)
    bar_plot.axis.visible = False
    bar_plot.grid.visible = False
    bar_plot.add_layout(ColorBar(color_mapper=mapper, title=COLORBAR_LABEL, width=14), "left")
    grid = row(gridplot(panels, ncols=ncols, toolbar_location=None), bar_plot)
    # attached after gridplot, which searches each panel's references for plots: through the shared callback each
    # search would walk every panel (seconds for many tasks)
    click = CustomJS(args=dict(srcs=sources, bar_src=bar_src, bar_fig=bar_fig, sc_src=sc_src, hl_src=hl_src,
                               sc_fig=sc_fig, mult=mult, bar_caption=BAR_CAPTION, pad_fraction=BAR_PAD,
                               scatter_caption=SCATTER_CAPTION),
                     code=_CLICK_JS)
    for src in sources:  # one callback for every panel (_CLICK_JS says why); the sources passed by reference
        src.selected.js_on_change("indices", click)
    return grid, column(*detail), {"task": str(scores.tasks[start_task]), "index": start_index}


def html_page(scores: Any, *, ablation: Any = None, comparison: Mapping[str, Any] | None = None,
              other_comparison: Mapping[str, Any] | None = None, other_name: str = "",
              png: bytes | None = None, ncols: int | None = None, circuits: Any = None) -> str:
    """The self-contained interactive report of ``scores`` as an HTML string.

    Args:
        scores: a ``HeadScores`` (or look-alike, see :mod:`headscore.report`).
        ablation: optional ablation result (as for :func:`headscore.report.scatter_vs_ablation`): hover
            shows each head's ablation value, and a click draws the task's score-vs-ablation scatter.
        comparison: agreement with the ablation per task (``{task: Agreement or dict}``).
        other_comparison, other_name: agreement with another scores file (``headscore report --compare``).
        png: the static heatmap grid (PNG bytes), embedded as a fallback.
        ncols: panel columns (default as in the PNG grid).
        circuits: optional circuits (one per task, :mod:`headscore.report.circuit`): their interactive
            graphs in a section of their own (hover an edge, click a node for its edges).

    The agreement tables show an interval only where enough examples back it (the entries' ``examples``, else
    the scores' and the ablation's counts; :func:`~headscore.report.uncertainty.checked_comparison`) and name the
    tasks that have none. A file in which no head has a value (exact edge patching) gets no grid and no detail
    view, but a one-line note saying why (:func:`~headscore.report.inputs.head_map_note`); its circuits and tables
    are kept.
    """
    vals = task_values(scores)
    abl = None if ablation is None else ablation_values(scores, ablation)
    exact = exact_mask(scores, vals.shape)
    note = head_map_note(scores, vals, circuits=bool(circuits))
    heads, known = [], {}
    if not note:
        grid, detail, known = _figures(scores, vals, stderr_values(scores, vals.shape), abl, ncols, exact)
        heads = [grid, detail]
    graphs = circuit_panels(circuits or [])
    script, divs = components((*heads, *graphs)) if heads or graphs else ("", ())
    counts = counts_by_task(scores)
    tables = ""
    if comparison:
        tables += _agreement_table("Agreement with ablation", comparison, counts, counts_by_task(ablation))
    if other_comparison:
        tables += _agreement_table(f"Agreement with {other_name or 'the other scores file'}", other_comparison,
                                   counts, None)
    title = f"Head importance ({scores.method}) - {scores.model}"
    check = _CHECK_JS % {"expected": len(scores.tasks) if heads else 0, "known": _script_json(known)}
    body = "\n".join([_head_section(note, divs[:len(heads)], exact, scatter=abl is not None), tables,
                      _circuit_section(divs[len(heads):]) if circuits else "",
                      _provenance(scores, task_counts(scores), exact), "" if note else _fallback(png)])
    return page(title, style=_STYLE, scripts=f"{script}\n{check}", body=body)


_STYLE = """table.agreement { border-collapse: collapse; margin-bottom: 1em; }
table.agreement td, table.agreement th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
table.agreement th[scope=row] { text-align: left; }
dl.provenance dt { font-weight: bold; }
dl.provenance dd { margin: 0 0 0.4em 1em; }"""


def _head_section(note: str, divs: Sequence[str], exact: np.ndarray | None, *, scatter: bool) -> str:
    """The grid and the selected head's view (``divs``; with the ablation ``scatter``), or the note saying why
    there are none."""
    if note:
        return f"<p class='no-heatmap'>{html.escape(note)}</p>"
    grid_div, detail_div = divs
    exact_note = "" if exact is None else (
        "<p class='exact-note'>Outlined cells: exact values (measured by ablation or patching), the others "
        "estimates; the hover says <code>exact: yes</code> or <code>no</code>.</p>")
    return f"""<p>Hover a cell for its layer, head, score, standard error and rank; click it to see that head on every
task.</p>
{exact_note}{grid_div}
<h2>Selected head</h2>
<p class='note'>{BAR_NOTE}</p>
{f"<p class='note'>{SCATTER_NOTE}</p>" if scatter else ""}
{detail_div}"""


def _circuit_section(graph_divs: Sequence[str]) -> str:
    """The circuits' heading, what they are, and their graphs."""
    return ("<h2>Circuits</h2><p>Each task's top edges by |score| on paths from the input to the logits (from "
            "<code>score --edges</code> or <code>ablate --edges</code>; <code>headscore circuit</code> measures "
            "their faithfulness). Hover an edge or a node; click a node to list its edges.</p>"
            + circuit_divs(graph_divs))


def _fallback(png: bytes | None) -> str:
    """The static heatmap grid, inline, folded ('' without one)."""
    if png is None:
        return ""
    return ("<details><summary>Static grid (PNG)</summary><img alt='heatmap grid' style='max-width:100%' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'></details>")
