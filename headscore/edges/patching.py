"""Exact edge patching, the ground truth of edge scores: v's input recomputed with u's contribution replaced by
its baseline, nothing else changed.

Only reader v sees the change: its residual input becomes x_v + a_u(baseline) - a_u(clean) before its own
norm, while every other reader (the other heads' projections of the same layer included) reads the clean
stream; what v then outputs flows on as the model computes it. u's clean output is the same in the patched
run (u writes before v reads), so its change is taken from the clean run. Several edges run as rows of one
forward pass (the batch repeated once per edge), the layers below each pass's first patched reader
replayed from the clean run where :func:`edge_replay_works` has shown that this reproduces full passes.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.batching import Batch
from ..loss import NLL, Metric, example_losses, trusted_vocabulary
from ..methods.ablation import cheapest_passes
from ..methods.prefix import PrefixReplay, boundaries_to_check, replay_tolerance
from ..patch import HeadGates
from .attribution import WriterOutputs, recording_writers
from .residual import Projection, ResidualModel

Edge = tuple[int, int]
"""(upstream index, downstream index), as in :class:`~headscore.edges.graph.EdgeGraph`."""


def writer_change(rm: ResidualModel, delta: WriterOutputs, upstream: int) -> torch.Tensor:
    """What upstream node ``upstream`` adds to the stream at baseline minus clean: [B, T, d]."""
    graph = rm.graph
    if upstream == 0:
        return delta.emb
    layer, offset = divmod(upstream - 1, graph.writers_per_layer)
    if offset == graph.num_heads:
        return delta.mlp[layer]
    w = rm.o_weight(layer)[:, offset]  # [d, D]
    raw = torch.einsum("btk,dk->btd", delta.heads[layer][:, :, offset].to(w.dtype), w)
    norm = rm.layers[layer].attn_out_norm
    if norm is None:
        return raw
    clean = delta.attn_raw[layer]  # the head's slice changed, the attention's output norm recomputed
    return norm.forward(clean + raw.to(clean.dtype)) - norm.forward(clean)


def _reader(rm: ResidualModel, downstream: int) -> tuple[int, str, int]:
    """(layer, kind, offset within the layer) of a downstream index; kind attn, mlp or logits."""
    graph = rm.graph
    if downstream == len(graph.downstream) - 1:
        return graph.num_layers - 1, "logits", 0
    layer, offset = divmod(downstream, graph.readers_per_layer)
    return layer, "mlp" if offset == graph.readers_per_layer - 1 else "attn", offset


class _PatchHooks:
    """Forward hooks that give each patched row's reader its changed input."""

    def __init__(self, rm: ResidualModel, rows: list[tuple[int, int, str, int, torch.Tensor]]):
        # rows: (row, layer, kind, offset, change [T, d])
        self.rm = rm
        self.rows = rows
        self.normed: dict[int, torch.Tensor] = {}  # row -> its attention reader's changed norm output
        self.mlp_in: dict[int, torch.Tensor] = {}  # row -> the stream its MLP norm reads

    def install(self) -> list:
        rm, handles = self.rm, []
        for layer, lm in enumerate(rm.layers):
            mine = [r for r in self.rows if r[1] == layer]
            attn = [r for r in mine if r[2] == "attn"]
            mlp = [r for r in mine if r[2] == "mlp"]
            if attn:
                handles.append(lm.attn_norm.register_forward_hook(self._attn_norm(lm.attn_norm, attn)))
                for proj in lm.projections:
                    cols = dict(proj.readers)
                    chosen = [(r[0], cols[r[3]]) for r in attn if r[3] in cols]
                    if chosen:
                        handles.append(proj.module.register_forward_hook(self._projection(proj, chosen)))
            if mlp:
                handles.append(lm.mlp_norm.register_forward_pre_hook(self._mlp_stream(mlp)))
                handles.append(lm.mlp.register_forward_pre_hook(self._mlp_input(lm.mlp_norm, mlp)))
        logits = [r for r in self.rows if r[2] == "logits"]
        if logits:
            handles.append(rm.final_norm.register_forward_hook(self._renormed(rm.final_norm, logits)))
        return handles

    def _attn_norm(self, norm, rows):
        def hook(module, args, out):
            x = args[0]
            for row, _, _, _, change in rows:
                self.normed[row] = norm.forward(x[row] + change.to(x.dtype))
        return hook

    def _projection(self, proj: Projection, rows: list[tuple[int, torch.Tensor]]):
        def hook(module, args, out):
            out = out.clone()
            for row, cols in rows:
                cols = cols.to(out.device)
                bias = None if proj.bias is None else proj.bias[cols]
                out[row, :, cols] = F.linear(self.normed[row], proj.weight[cols], bias)
            return out
        return hook

    def _mlp_stream(self, rows):
        def pre_hook(module, args):
            for row, *_ in rows:
                self.mlp_in[row] = args[0][row]
        return pre_hook

    def _mlp_input(self, norm, rows):
        """The MLP's own normed input for the patched rows (a norm output may feed the attention too)."""
        def pre_hook(module, args):
            x = args[0].clone()
            for row, _, _, _, change in rows:
                stream = self.mlp_in[row]
                x[row] = norm.forward(stream + change.to(stream.dtype))
            return (x, *args[1:])
        return pre_hook

    def _renormed(self, norm, rows):
        def hook(module, args, out):
            x, out = args[0], out.clone()
            for row, _, _, _, change in rows:
                out[row] = norm.forward(x[row] + change.to(x.dtype))
            return out
        return hook


def reader_depth(rm: ResidualModel, downstream: int) -> int:
    """The first decoder layer a patched reader changes: its own (the logits: past every layer)."""
    layer, kind, _ = _reader(rm, downstream)
    return rm.graph.num_layers if kind == "logits" else layer


@torch.no_grad()
def edge_replay_works(model: torch.nn.Module, heads: HeadGates, rm: ResidualModel, batch: Batch,
                      baseline: WriterOutputs, metric: Metric = NLL) -> bool:
    """Whether replaying the layers below a pass's first patched reader reproduces the full pass on this model,
    as :func:`~headscore.methods.ablation.prefix_reuse_works` checks it for heads: at each depth that
    :func:`~headscore.methods.prefix.boundaries_to_check` names (and past the last layer, for the logits'
    reader), an edge from the embedding to a reader there, in a pass of its own with the batch tiled twice (as a
    run's passes tile it), layers below replayed, against the same pass run in full. False, with a warning
    saying why, where the losses differ beyond rounding (state handed between layers outside their outputs) or
    the replay fails."""
    graph = rm.graph
    depths = boundaries_to_check([lm.block for lm in rm.layers])
    checks = [(0, d * graph.readers_per_layer) for d in depths] + [(0, len(graph.downstream) - 1)]
    dtype = next(model.parameters()).dtype
    tol = replay_tolerance(dtype)
    for k, edge in enumerate(checks):
        where = "the logits" if k == len(depths) else f"layer {depths[k]}"
        run = [edge, edge]
        try:
            _, replayed = edge_patched_losses(model, heads, rm, batch, run, baseline, metric=metric, prefix=True,
                                              max_rows=2 * batch.size)
        except Exception as exc:  # noqa: BLE001 - any failure of the replay means: do not use it
            warnings.warn(f"{type(model).__name__}: replaying the layers below a patched reader of {where} failed "
                          f"({exc}); edge patching runs every layer", stacklevel=2)
            return False
        _, full = edge_patched_losses(model, heads, rm, batch, run, baseline, metric=metric, prefix=False,
                                      max_rows=2 * batch.size)
        if not torch.allclose(replayed, full, rtol=tol, atol=tol):
            worst = int((replayed - full).abs().flatten().argmax())
            warnings.warn(f"{type(model).__name__}: replaying the layers below a patched reader of {where} does not "
                          f"reproduce the full pass (loss {replayed.flatten()[worst]:.6g} vs "
                          f"{full.flatten()[worst]:.6g}); edge patching runs every layer", stacklevel=2)
            return False
    return True


@torch.no_grad()
def edge_patched_losses(model: torch.nn.Module, heads: HeadGates, rm: ResidualModel, batch: Batch,
                        edges: Sequence[Edge], baseline: WriterOutputs, *, metric: Metric = NLL, max_rows: int = 64,
                        prefix: bool = True, on_pass: Callable[[int], None] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's clean loss [B] float64 and its loss with each edge patched alone [K, B] for K ``edges``.

    ``baseline``: every writer's baseline output on ``batch`` (see
    :func:`~headscore.edges.attribution.writer_baselines`). One clean pass records the writers' outputs, the
    clean losses and (with ``prefix``) the layer outputs later passes replay. Edges that do not exist (u writes
    after v reads) are refused with ValueError. Edges are ordered by their reader's layer and cut into forward
    passes of as many as ``max_rows`` rows allow at the least estimated cost
    (:func:`~headscore.methods.ablation.cheapest_passes`); with ``prefix`` the layers below a pass's first patched
    reader are not run again. ``on_pass(n)`` is called after each forward pass of n edges.
    """
    allowed = rm.graph.allowed
    outside = [e for e in edges if not (0 <= e[0] < allowed.shape[0] and 0 <= e[1] < allowed.shape[1])]
    if outside:
        raise ValueError(f"edge {tuple(outside[0])} is outside the graph's {allowed.shape[0]} upstream x "
                         f"{allowed.shape[1]} downstream nodes")
    bad = [e for e in edges if not bool(allowed[e[0], e[1]])]
    if bad:
        u, v = bad[0]
        raise ValueError(f"no edge {rm.graph.upstream[u]} -> {rm.graph.downstream[v]}: it writes after that "
                         "node reads")
    b = batch.size
    trusted_vocabulary(model, metric, batch)  # the passes compute only the logits the metric reads
    replay = PrefixReplay([lm.block for lm in rm.layers]) if prefix else None
    with replay.recording() if replay is not None else contextlib.nullcontext(), \
            recording_writers(rm, heads, ungated=True) as clean, heads.using(None, None):
        before = example_losses(model, batch, metric).to(torch.float64).cpu()
    delta = baseline.minus(clean)
    depth = torch.tensor([reader_depth(rm, v) if prefix else 0 for _, v in edges], dtype=torch.long)
    out = torch.empty(len(edges), b, dtype=torch.float64)
    passes = cheapest_passes(depth, rm.graph.num_layers, max(1, max_rows // b), b * batch.input_ids.shape[1])
    with heads.using(None, None):
        for idx, first in passes:
            chunk = idx.tolist()
            rows = []
            for c, i in enumerate(chunk):
                u, v = edges[i]
                change = writer_change(rm, delta, u)
                layer, kind, offset = _reader(rm, v)
                rows += [(c * b + r, layer, kind, offset, change[r]) for r in range(b)]
            tiled = batch.tile(len(chunk)) if len(chunk) > 1 else batch
            skip = replay.skipping(first, len(chunk)) if replay is not None else contextlib.nullcontext()
            handles = _PatchHooks(rm, rows).install()
            try:
                with skip:
                    losses = example_losses(model, tiled, metric)
            finally:
                for h in handles:
                    h.remove()
            out[idx] = losses.to(torch.float64).view(len(chunk), b).cpu()
            if on_pass is not None:
                on_pass(len(chunk))
    return before, out
