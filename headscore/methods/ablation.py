"""Ablation ground truth: the real loss change when heads are set to their baseline.

Three modes compute the same numbers:

- ``prefix`` (default): rows are grouped by the first layer whose gates they change; layers
  below it are the same as in a run with every gate at 1, so they run once per batch
  (:mod:`headscore.methods.prefix`) and each pass runs only the layers from there on. Ablating
  each head of an L-layer model once costs about (L + 1) / 2L of ``batched``.
- ``batched``: each row of one forward pass carries its own gate vector (the batch tiled
  once per gate row), every layer runs for every row.
- ``naive`` (alias ``sequential``): one forward pass of the batch per gate row, the plain
  sweep the others must equal.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch

from ..data.batching import Batch
from ..gate import gate_dtype
from ..loss import NLL, Metric, example_losses, trusted_vocabulary
from ..patch import HeadGates
from .prefix import PrefixReplay, boundaries_to_check, decoder_layers, replay_tolerance

ABLATION_MODES = ("prefix", "batched", "naive", "sequential")
"""Accepted ``mode`` names; ``sequential`` is another name for ``naive``."""


def single_head_gates(num_layers: int, num_heads: int, value: float = 0.0) -> torch.Tensor:
    """Gate rows [L*H, L, H]: row l*H + h is all ones except ``value`` at head (l, h)."""
    n = num_layers * num_heads
    rows = torch.ones(n, n, dtype=torch.float64)
    rows.fill_diagonal_(value)
    return rows.view(n, num_layers, num_heads)


def head_set_gates(heads_to_change: list[tuple[int, int]], num_layers: int, num_heads: int,
                   value: float = 0.0) -> torch.Tensor:
    """One gate row [1, L, H]: ``value`` at every listed (layer, head), ones elsewhere."""
    row = torch.ones(1, num_layers, num_heads, dtype=torch.float64)
    for layer, head in heads_to_change:
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise ValueError(f"head ({layer}, {head}) is outside the model's {num_layers} x {num_heads} heads")
        row[0, layer, head] = value
    return row


def position_gates(layer: int, num_layers: int, num_heads: int, positions: int, value: float = 0.0,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-position gate rows [H * T, L, T, H] for one layer: row h * T + t is all ones except ``value`` at
    (``layer``, t, h), i.e. head h changed at token t only (``dtype``: the passes' gate dtype, float64 for a
    float64 model, so that a ``value`` such as 0.1 is not rounded to float32's on the way)."""
    n = num_heads * positions
    rows = torch.ones(n, num_layers, positions, num_heads, dtype=dtype)
    h = torch.arange(n) // positions
    t = torch.arange(n) % positions
    rows[torch.arange(n), layer, t, h] = value
    return rows


def check_mode(mode: str) -> str:
    """The canonical name of an ablation mode (``sequential`` -> ``naive``); ValueError for an unknown one."""
    if mode not in ABLATION_MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; choose one of {', '.join(ABLATION_MODES[:3])}")
    return "naive" if mode == "sequential" else mode


def first_changed_layer(gate_rows: torch.Tensor) -> torch.Tensor:
    """[K] for gate rows [K, L, H] (or per position [K, L, T, H]): the first layer with a gate other than 1
    (L for a row that changes none)."""
    changed = (gate_rows != 1).flatten(2).any(-1)
    num_layers = gate_rows.shape[1]
    first = torch.where(changed, torch.arange(num_layers), num_layers)
    return first.min(-1).values


def _passes(gate_rows: torch.Tensor, per_pass: int, prefix: bool) -> list[tuple[torch.Tensor, int]]:
    """(row indices, layers to skip) of each forward pass: consecutive rows, or with ``prefix`` rows
    grouped by their first changed layer (each pass skips the layers below it), each group split
    into the fewest passes of at most ``per_pass`` rows, of equal size (9 rows at 8 a pass: 5 + 4)."""
    k = gate_rows.shape[0]
    if not prefix:
        return [(torch.arange(s, min(s + per_pass, k)), 0) for s in range(0, k, per_pass)]
    first = first_changed_layer(gate_rows.cpu())
    out = []
    for depth in first.unique().tolist():
        idx = (first == depth).nonzero().flatten()
        n = -(-len(idx) // per_pass)  # as few passes as the limit allows, of (nearly) equal size
        out += [(part, int(depth)) for part in torch.tensor_split(idx, n)]
    return out


PASS_COST_TOKENS = 320
"""What one forward pass costs beyond its rows' layers, in token-layers (hooks, the model's head, launching;
measured on SmolLM2-135M on a 2-core CPU: about 10 rows x layers at 31 tokens)."""
LAYER_COST_TOKENS = 64
"""What each layer a pass runs costs beyond its rows, in token-layers (the same measurement: about 2 rows)."""


def cheapest_passes(depths: torch.Tensor, num_layers: int, max_rows: int, tokens: int
                    ) -> list[tuple[torch.Tensor, int]]:
    """(row indices, layers to skip) of forward passes covering rows whose first changed layers are
    ``depths`` [N], at the least estimated cost.

    A pass of r rows that skips the layers below its shallowest row's runs ``num_layers - depth`` layers
    (and the model's head) for every row: cost ``(num_layers - depth + 1) * (r * tokens + LAYER_COST_TOKENS)
    + PASS_COST_TOKENS``. Sorted by depth, the rows are cut into consecutive passes of at most ``max_rows``
    by dynamic programming (an optimal cut of sorted rows is consecutive): rows spread thinly over many
    layers share passes, dense groups get passes of their own.
    """
    order = torch.argsort(depths.cpu(), stable=True)
    d = depths.cpu()[order].tolist()
    n = len(d)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + (num_layers - d[i] + 1) * ((j - i) * tokens + LAYER_COST_TOKENS) + PASS_COST_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    passes = []
    j = n
    while j > 0:
        i = cut[j]
        passes.append((order[i:j], int(d[i])))
        j = i
    return passes[::-1]


@torch.no_grad()
def gated_losses(model: torch.nn.Module, heads: HeadGates, batch: Batch, gate_rows: torch.Tensor,
                 baseline: torch.Tensor | None = None, *, mode: str = "prefix",
                 max_rows: int = 64, on_pass: Callable[[int], None] | None = None,
                 metric: Metric = NLL) -> torch.Tensor:
    """Loss of every example under every gate row: [K, B] for ``gate_rows`` [K, L, H] (or per position
    [K, L, T, H]); ``baseline`` [L, H, D] or per example [L, B, T, H, D]; the loss is ``metric``'s.

    ``batched`` and ``prefix`` pack as many (gate row, example) pairs into one forward pass as
    ``max_rows`` allows; ``prefix`` also skips the layers below each pass's first changed gate
    (after one recording pass of the batch with every gate at 1), and falls back to ``batched``
    for a model whose decoder layers it cannot find. ``naive`` runs one forward pass of the batch
    per gate row. ``on_pass(n)`` is called after each pass with the number of gate rows it covered.
    """
    mode = check_mode(mode)
    k, b = gate_rows.shape[0], batch.size
    num_layers = heads.layout.num_layers
    dtype = gate_dtype(model)
    gate_rows = gate_rows.to(batch.input_ids.device, dtype)
    trusted_vocabulary(model, metric, batch)  # the passes compute only the logits the metric reads
    replay = None
    if mode == "prefix":
        layers = decoder_layers(model, num_layers)
        if layers is not None:
            replay = PrefixReplay(layers)
            with replay.recording(), heads.using(torch.ones_like(gate_rows[:1]), baseline):
                example_losses(model, batch, metric)
    per_pass = 1 if mode == "naive" else max(1, max_rows // b)
    out = torch.empty(k, b, dtype=torch.float64)
    for idx, depth in _passes(gate_rows, per_pass, replay is not None):
        n = len(idx)
        rows = batch.tile(n) if n > 1 else batch
        skip = replay.skipping(depth, n) if replay is not None else contextlib.nullcontext()
        with skip, heads.using(gate_rows[idx.to(gate_rows.device)].repeat_interleave(b, 0), baseline):
            out[idx] = example_losses(model, rows, metric).view(n, b).cpu().double()
        if on_pass is not None:
            on_pass(n)
    return out


@torch.no_grad()
def selected_losses(model: torch.nn.Module, heads: HeadGates, batch: Batch, rows: torch.Tensor,
                    gate_rows: torch.Tensor, baseline: torch.Tensor | None = None, *, prefix: bool = True,
                    max_rows: int = 64, on_pass: Callable[[int], None] | None = None,
                    metric: Metric = NLL) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's loss with every gate at 1 [B], and for chosen pairs the loss of example row ``rows[i]``
    under gate row ``gate_rows[i]`` [N] (``gate_rows`` [N, L, H]); ``baseline`` as in :func:`gated_losses`.

    For a few gate rows per example, different for each (verified heads, one set per task), where
    :func:`gated_losses` would run every row on every example. One recording pass of the batch gives the
    losses at 1 and, with ``prefix``, the layer outputs each pass replays below its shallowest changed
    layer; the pairs are cut into passes of at most ``max_rows`` by :func:`cheapest_passes`.
    ``prefix=False`` (or a model whose decoder layers are not found) runs every layer for every pair.
    """
    num_layers = heads.layout.num_layers
    dtype = gate_dtype(model)
    gate_rows = gate_rows.to(batch.input_ids.device, dtype)
    trusted_vocabulary(model, metric, batch)
    layers = decoder_layers(model, num_layers) if prefix else None
    replay = None if layers is None else PrefixReplay(layers)
    recording = contextlib.nullcontext() if replay is None else replay.recording()
    with recording, heads.using(torch.ones_like(gate_rows[:1]), baseline):
        clean = example_losses(model, batch, metric).cpu().double()
    depths = first_changed_layer(gate_rows.cpu()) if replay is not None else torch.zeros(len(rows), dtype=torch.long)
    out = torch.empty(len(rows), dtype=torch.float64)
    for idx, depth in cheapest_passes(depths, num_layers, max_rows, int(batch.input_ids.shape[1])):
        chosen = rows[idx]
        part = baseline if baseline is None or baseline.dim() != 5 else baseline[:, chosen.to(baseline.device)]
        skip = contextlib.nullcontext() if replay is None else replay.skipping(depth, chosen)
        with skip, heads.using(gate_rows[idx.to(gate_rows.device)], part):
            out[idx] = example_losses(model, batch.select(chosen), metric).cpu().double()
        if on_pass is not None:
            on_pass(len(idx))
    return clean, out


@torch.no_grad()
def prefix_reuse_works(model: torch.nn.Module, heads: HeadGates, batch: Batch,
                       baseline: torch.Tensor | None = None, metric: Metric = NLL) -> bool:
    """Whether ``prefix`` mode reproduces a full forward pass on this model: at each depth that
    :func:`~headscore.methods.prefix.boundaries_to_check` names (the deepest of each kind of layer boundary,
    and every boundary next to a hooked layer), the loss of a gate row that changes a head of that layer
    (every layer below replayed) against the same row run in full, on the batch's first example. A replayed
    pass hands the model only its deepest replayed layer's output, so each depth checks its own boundary
    (state passed to the next layer other than the output, a hook the replay would get wrong); what the check
    looks for does not depend on the number of rows. For a model of one layer class without hooks: one row,
    about three passes of one example.

    False, with a warning saying why, for a model whose decoder layers are not found or whose layers
    pass state other than their outputs (the replayed loss then differs beyond rounding).
    """
    layout = heads.layout
    layers = decoder_layers(model, layout.num_layers)
    if layers is None:
        warnings.warn(f"{type(model).__name__}: no ModuleList of decoder layers found; prefix reuse is off "
                      "(ablation runs in batched mode)", stacklevel=2)
        return False
    depths = boundaries_to_check(layers, [layout.heads_of(d) > 0 for d in range(layout.num_layers)])
    if not depths:  # no pass ever replays a layer (one layer, say)
        return True
    row = torch.ones(len(depths), layout.num_layers, layout.num_heads, dtype=torch.float64)
    row[torch.arange(len(depths)), depths, 0] = 0.0
    first = torch.tensor([0])
    batch = batch.select(first)
    if baseline is not None and baseline.dim() == 5:
        baseline = baseline[:, first.to(baseline.device)]
    try:
        replayed = gated_losses(model, heads, batch, row, baseline, mode="prefix", metric=metric)
    except Exception as exc:  # noqa: BLE001 - any failure of the replay means: do not use it
        warnings.warn(f"{type(model).__name__}: prefix reuse failed ({exc}); ablation runs in batched mode",
                      stacklevel=2)
        return False
    full = gated_losses(model, heads, batch, row, baseline, mode="batched", metric=metric)
    dtype = next(model.parameters()).dtype
    tol = replay_tolerance(dtype)
    if torch.allclose(replayed, full, rtol=tol, atol=tol):
        return True
    worst = int((replayed - full).abs().flatten().argmax())
    warnings.warn(f"{type(model).__name__}: replaying the layers below a changed head of layer {depths[worst]} "
                  f"does not reproduce the full pass (loss {replayed.flatten()[worst]:.6g} vs "
                  f"{full.flatten()[worst]:.6g}); ablation runs in batched mode", stacklevel=2)
    return False


@torch.no_grad()
def clean_losses(model: torch.nn.Module, heads: HeadGates, batch: Batch, metric: Metric = NLL) -> torch.Tensor:
    """Loss of every example with all heads on: [B] (from the same logits as the changed passes' losses:
    :func:`headscore.loss.trusted_vocabulary` is asked first)."""
    trusted_vocabulary(model, metric, batch)
    with heads.using(None, None):
        return example_losses(model, batch, metric).cpu().double()
