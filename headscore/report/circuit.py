"""Circuit pictures: a layers x heads graph of a circuit's edges (width by |score|, red where patching the edge
raises the loss, blue where it lowers it), and the faithfulness of circuits against their size.

Duck-typed like the rest of the report: a circuit is any object with ``task``, ``upstream``, ``downstream``
(node names as in :mod:`headscore.edges.graph`), ``edges`` (bool [U, V]) and ``scores`` (float [U, V]); a
curve point has ``edges`` and ``faithfulness``.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..figures import literal, save_figure
from .layout import grid_shape

_HEAD = re.compile(r"L(\d+)\.H(\d+)$")
_MLP = re.compile(r"L(\d+)\.mlp$")
_QUERY = re.compile(r"L(\d+)\.H(\d+)\.q$")
_KV = re.compile(r"L(\d+)\.KV(\d+)\.([kv])$")


def model_shape(upstream: Sequence[str], downstream: Sequence[str]) -> tuple[int, int, int]:
    """(layers, heads, KV heads) read from the node names."""
    heads = [tuple(map(int, m.groups())) for m in map(_HEAD.match, upstream) if m]
    kv = [int(m.group(2)) for m in map(_KV.match, downstream) if m]
    layers = 1 + max(layer for layer, _ in heads)
    return layers, 1 + max(h for _, h in heads), 1 + max(kv)


class NodePlaces:
    """Where each node sits: heads of layer l at (h, l), its MLP at (H + 0.6, l + 0.5), the embeddings below
    layer 0 and the logits above the last layer; a reader just below the head (or key/value group) it feeds."""

    def __init__(self, upstream: Sequence[str], downstream: Sequence[str]):
        self.layers, self.heads, self.kv = model_shape(upstream, downstream)
        self.group = self.heads // self.kv
        self.mid = (self.heads - 1) / 2

    def writer(self, name: str) -> tuple[float, float]:
        """Position of an upstream node."""
        if name == "emb":
            return self.mid, -1.0
        m = _HEAD.match(name)
        if m:
            return float(m.group(2)), float(m.group(1))
        m = _MLP.match(name)
        return self.heads + 0.6, int(m.group(1)) + 0.5

    def reader(self, name: str) -> tuple[float, float, str]:
        """Position of a downstream node and its kind (q, k, v, mlp, logits)."""
        if name == "logits":
            return self.mid, float(self.layers), "logits"
        m = _QUERY.match(name)
        if m:
            return float(m.group(2)), int(m.group(1)) - 0.18, "q"
        m = _KV.match(name)
        if m:
            layer, j, kind = int(m.group(1)), int(m.group(2)), m.group(3)
            return j * self.group + (self.group - 1) / 2, layer - 0.18, kind
        m = _MLP.match(name)
        return self.heads + 0.6, int(m.group(1)) + 0.5 - 0.18, "mlp"


STYLES = {"q": "-", "k": "--", "v": ":", "mlp": "-", "logits": "-"}


MAX_DRAWN = 150
"""The most edges a static picture draws (the largest by |score|); the title says how many the circuit has."""


def drawn_edges(circuit: Any, limit: int) -> tuple[np.ndarray, int]:
    """The circuit's edges to draw, [k, 2] (writer, reader), the largest ``limit`` by |score|, and how many
    it has."""
    pairs = np.argwhere(np.asarray(circuit.edges, dtype=bool))
    scores = np.asarray(circuit.scores, dtype=float)
    if len(pairs) > limit:
        size = np.abs(scores[pairs[:, 0], pairs[:, 1]])
        pairs = pairs[np.argsort(-size, kind="stable")[:limit]]
    return pairs, int(np.asarray(circuit.edges, dtype=bool).sum())


def draw_circuit(ax: Any, circuit: Any, *, max_width: float = 4.0, limit: int = MAX_DRAWN,
                 title_inches: float | None = None) -> None:
    """One circuit on ``ax``: every head and MLP as a faint dot, the drawn edges' nodes as solid ones, each edge
    a line from its writer to its reader (solid into a query or an MLP, dashed into a key, dotted into a
    value); at most ``limit`` edges, the largest by |score|. ``title_inches``: the panel's width, to which the
    title's lines are wrapped (none by default)."""
    places = NodePlaces(circuit.upstream, circuit.downstream)
    scores = np.asarray(circuit.scores, dtype=float)
    pairs, total = drawn_edges(circuit, limit)
    top = float(np.nanmax(np.abs(scores[pairs[:, 0], pairs[:, 1]]))) if len(pairs) else 1.0
    top = top if top > 0 else 1.0  # every drawn edge scored 0: thin lines, no 0 / 0
    used_writers = {int(u) for u, _ in pairs}
    for u, name in enumerate(circuit.upstream):
        x, y = places.writer(name)
        on = u in used_writers
        ax.plot([x], [y], "o" if name != "emb" else "s", ms=6 if on else 3,
                color="black" if on else "0.8", zorder=3)
    ax.plot([places.mid], [places.layers], "s", ms=6, color="black", zorder=3)
    order = sorted(pairs.tolist(), key=lambda p: abs(scores[p[0], p[1]]))  # the largest drawn last, on top
    for u, v in order:
        x0, y0 = places.writer(circuit.upstream[u])
        x1, y1, kind = places.reader(circuit.downstream[v])
        s = scores[u, v]
        ax.plot([x0, x1], [y0, y1], STYLES[kind], color="#c0392b" if s > 0 else "#2e6fd6",
                lw=0.4 + max_width * abs(s) / top, alpha=0.75, zorder=2)
    ax.set_xlim(-0.8, places.heads + 1.3)
    ax.set_ylim(-1.6, places.layers + 0.6)
    ax.set_xticks(list(range(places.heads)) + [places.heads + 0.6])
    ax.set_xticklabels([str(h) for h in range(places.heads)] + ["mlp"], fontsize=7)
    ticks = list(range(0, places.layers, max(1, places.layers // 10)))
    ax.set_yticks([-1, *ticks, places.layers])
    ax.set_yticklabels(["emb", *map(str, ticks), "logits"], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    faith = getattr(circuit, "faithfulness", None)
    extra = f", faithfulness {faith:.2f}" if isinstance(faith, float) and faith == faith else ""
    shown = f"\nlargest {len(pairs)} by |score| drawn" if len(pairs) < total else \
        ("\nnone of the top edges lies on an input -> logits path" if total == 0 else "")
    ax.set_title(literal(_wrapped(f"{circuit.task}: {total} edges{extra}{shown}", title_inches, 8)), fontsize=8)


def _wrapped(title: str, inches: float | None, fontsize: float) -> str:
    """``title`` with each line wrapped to ``inches`` at ``fontsize`` points (as it is without a width)."""
    if inches is None:
        return title
    chars = max(8, int(inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in title.split("\n"))


def _legend(fig: Figure, columns: int = 5) -> None:
    handles = [Line2D([], [], color="#c0392b", lw=2, label="patching raises the loss"),
               Line2D([], [], color="#2e6fd6", lw=2, label="patching lowers it"),
               Line2D([], [], color="0.3", ls="-", label="into a query / MLP / logits"),
               Line2D([], [], color="0.3", ls="--", label="into a key"),
               Line2D([], [], color="0.3", ls=":", label="into a value")]
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=7, frameon=False)


def circuit_figure(circuits: Sequence[Any]) -> Figure:
    """One panel per circuit (task), on a shared legend."""
    rows, cols = grid_shape(len(circuits))
    places = NodePlaces(circuits[0].upstream, circuits[0].downstream)
    width = max(3.2, 0.32 * (places.heads + 2))
    height = max(3.6, 0.22 * (places.layers + 3))
    fig = Figure(figsize=(cols * width, rows * height + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, circuit in zip(axes.flat, circuits, strict=False):
        draw_circuit(ax, circuit, title_inches=width)
    for ax in list(axes.flat)[len(circuits):]:
        ax.set_visible(False)
    wide = cols * width >= 7.5  # the legend's five entries need about 7 inches in one row
    _legend(fig, 5 if wide else 3)
    fig.get_layout_engine().set(rect=(0, 0.05 if wide else 0.09, 1, 0.95 if wide else 0.91))
    return fig


def circuit_pictures(circuits: Sequence[Any], path: str | os.PathLike) -> list[Path]:
    """:func:`circuit_figure` saved as ``<path>.png`` and ``.pdf``."""
    return save_figure(circuit_figure(circuits), path)


def faithfulness_figure(circuits: Sequence[Any]) -> Figure:
    """Faithfulness against the number of edges kept, one line per task (1 = clean, 0 = no edge)."""
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for circuit in circuits:
        xs = [max(p.edges, 1) for p in circuit.curve]
        ax.plot(xs, [p.faithfulness for p in circuit.curve], "o-", ms=3, label=str(circuit.task))
    ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("edges in the circuit (after pruning)")
    ax.set_ylabel("faithfulness")
    ax.set_title("circuit faithfulness (clean = 1, no edge = 0)", fontsize=9)
    if len(circuits) <= 12:
        ax.legend(fontsize=7)
    return fig


def faithfulness_pictures(circuits: Sequence[Any], path: str | os.PathLike) -> list[Path]:
    """:func:`faithfulness_figure` saved as ``<path>.png`` and ``.pdf``."""
    return save_figure(faithfulness_figure(circuits), path)
