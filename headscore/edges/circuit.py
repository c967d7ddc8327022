"""Circuits: the top edges by score, pruned to those on a path from the input to the logits, and their
faithfulness: the metric with only the circuit's edges clean and every other edge patched to its baseline.

In a circuit run every reader v reads its own input: the stream as the run computes it, with each writer u
whose edge u -> v is not in the circuit replaced by its baseline output (x_v + sum over those u of a_u(baseline)
- a_u(run)); writers' outputs are this run's own, so a change flows on through the circuit's edges only.
With every edge in the circuit the run is the clean one; with none (baseline ``corrupt``) it is the corrupted
one. Faithfulness is (m(circuit) - m(none)) / (m(clean) - m(none)) for the metric's loss m, per task: 1 = the
circuit alone carries the clean behaviour, 0 = no more than no edges at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..data.batching import Batch
from ..loss import NLL, Metric, example_losses, trusted_vocabulary
from ..patch import HeadGates
from .attribution import WriterOutputs
from .graph import EdgeGraph
from .residual import ResidualModel, layer_input, module_output


def reader_nodes(graph: EdgeGraph) -> list[list[int]]:
    """For each downstream reader, the upstream nodes it feeds: a query head its head, a key or value head every
    head of its group, an MLP input its MLP, the logits none."""
    group = graph.num_heads // graph.num_kv_heads
    out: list[list[int]] = []
    for layer in range(graph.num_layers):
        heads = [graph.head_index(layer, h) for h in range(graph.num_heads)]
        out += [[heads[h]] for h in range(graph.num_heads)]
        out += [heads[j * group:(j + 1) * group] for j in range(graph.num_kv_heads)] * 2
        out.append([graph.mlp_index(layer)])
    return [*out, []]


def connected(graph: EdgeGraph, edges: torch.Tensor) -> torch.Tensor:
    """The edges of bool [U, V] ``edges`` that lie on a path from the input (``emb``) to the logits."""
    feeds = reader_nodes(graph)
    num_up, num_down = edges.shape
    # forward: which writers the input reaches (through readers into their nodes), in layer order
    reached = torch.zeros(num_up, dtype=torch.bool)
    reached[0] = True
    for v in range(num_down):  # readers come in layer order, and a node writes after its readers read
        if bool((edges[:, v] & reached).any()):
            reached[feeds[v]] = True
    # backward: which writers reach the logits
    useful = torch.zeros(num_down, dtype=torch.bool)
    useful[-1] = True
    reaches = torch.zeros(num_up, dtype=torch.bool)
    for v in range(num_down - 1, -1, -1):
        if v < num_down - 1:
            useful[v] = bool(reaches[feeds[v]].any())
        if useful[v]:
            reaches |= edges[:, v]
    keep = edges & reached[:, None] & useful[None, :]
    return keep


SELECTIONS = ("abs", "signed")
"""How circuits rank edges: by |score|, or by score (largest first: the edges whose patching raises the
loss most; those that lower it come last)."""


def top_circuit(graph: EdgeGraph, scores: torch.Tensor, n: int, by: str = "abs") -> torch.Tensor:
    """The ``n`` edges ranked first by ``by`` (:data:`SELECTIONS`) of [U, V] ``scores`` (NaN = no edge), pruned
    to those on a path from the input to the logits: bool [U, V]."""
    if by not in SELECTIONS:
        raise ValueError(f"unknown selection {by!r}; choose {' or '.join(SELECTIONS)}")
    exists = ~torch.isnan(scores)
    key = (scores.abs() if by == "abs" else scores).masked_fill(~exists, -float("inf")).flatten()
    top = torch.zeros(key.numel(), dtype=torch.bool)
    top[torch.topk(key, min(n, int(exists.sum()))).indices] = True
    return connected(graph, top.view(scores.shape) & graph.allowed)


class _CircuitHooks:
    """Forward hooks that give every reader of every row its circuit input (see the module docstring)."""

    def __init__(self, rm: ResidualModel, patched: torch.Tensor, base: WriterOutputs, rows: int):
        self.rm = rm
        self.patched = patched  # float [R, U, V]: 1 where the edge is patched (not in the row's circuit)
        self.base = base  # baseline outputs of one copy of the batch
        self.rows = rows
        graph = rm.graph
        self.change_emb: torch.Tensor | None = None  # baseline - run, per writer: [R, T, d]
        self.change_heads: list[torch.Tensor | None] = [None] * graph.num_layers  # [R, T, H, D]
        self.change_mlp: list[torch.Tensor | None] = [None] * graph.num_layers  # [R, T, d]
        self.normed: torch.Tensor | None = None
        self.mlp_stream: torch.Tensor | None = None
        self.attn_raw: list[torch.Tensor | None] = [None] * graph.num_layers  # this run's output projections

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """A baseline output for every row: per-example ones ([B, T, ...]) repeated per circuit; per-node
        means ([d] or [H, D]) broadcast as they are."""
        if x.dim() < 3 or x.shape[0] == self.rows:
            return x
        return x.repeat(self.rows // x.shape[0], *([1] * (x.dim() - 1)))

    def shift(self, readers: slice | list[int], last: int) -> torch.Tensor:
        """sum over writers up to layer ``last`` of patched[u, v] * (a_u(base) - a_u(run)): [R, T, n, d]."""
        graph, p = self.rm.graph, self.patched[:, :, readers]  # [R, U, n]
        out = torch.einsum("run,rtd->rtnd", p[:, :1], self.change_emb)
        for lu in range(last + 1):
            dz = self.change_heads[lu]
            if dz is None:
                continue
            h0 = graph.head_index(lu, 0)
            w = self.rm.o_weight(lu).to(dz.dtype)  # [d, H, D]
            heads = torch.einsum("rthk,dhk,rhn->rtnd", dz, w, p[:, h0:h0 + graph.num_heads])
            norm = self.rm.layers[lu].attn_out_norm
            if norm is not None:  # the patched heads' slices changed, the attention's output norm recomputed
                raw = self.attn_raw[lu]
                heads = norm.forward(raw.unsqueeze(2) + heads.to(raw.dtype)) - norm.forward(raw).unsqueeze(2)
            out = out + heads
            if self.change_mlp[lu] is not None:
                out = out + torch.einsum("rn,rtd->rtnd", p[:, graph.mlp_index(lu)], self.change_mlp[lu])
        return out

    def install(self) -> list:
        rm, graph, handles = self.rm, self.rm.graph, []

        def first(module, args, kwargs):
            x = layer_input(args, kwargs)
            self.change_emb = self._tiled(self.base.emb).to(x.dtype) - x

        handles.append(rm.layers[0].block.register_forward_pre_hook(first, with_kwargs=True))
        for i, lm in enumerate(rm.layers):
            start = graph.reader_start(i)
            attn = list(range(start, start + graph.readers_per_layer - 1))
            handles.append(lm.attn_norm.register_forward_hook(self._attn_readers(lm.attn_norm, attn, i)))
            for proj in lm.projections:
                handles.append(proj.module.register_forward_hook(self._projection(proj)))
            handles.append(lm.mlp_norm.register_forward_pre_hook(self._keep_stream(i)))
            handles.append(lm.mlp.register_forward_pre_hook(self._mlp_reader(lm.mlp_norm, start + len(attn), i)))
            handles.append(lm.mlp_writer.register_forward_hook(self._mlp_written(i)))
            if lm.attn_out_norm is not None:
                handles.append(lm.o_proj.register_forward_hook(
                    lambda m, args, o, i=i: self.attn_raw.__setitem__(i, module_output(o))))
        handles.append(rm.final_norm.register_forward_hook(self._logits_reader(rm.final_norm)))
        return handles

    def observe(self, layer: int, z: torch.Tensor) -> None:
        self.change_heads[layer] = self._tiled(self.base.heads[layer]).to(z.dtype) - z

    def _attn_readers(self, norm, readers: list[int], layer: int):
        def hook(module, args, out):
            x = args[0]
            # the layer's own heads and MLP write after its attention reads
            shifted = x.unsqueeze(2) + self.shift(readers, layer - 1)
            self.normed = norm.forward(shifted)  # [R, T, n, d]
        return hook

    def _projection(self, proj):
        offsets, cols = proj.offsets, proj.columns  # [n_p, D]

        def hook(module, args, out):
            out = module_output(out)
            idx = cols.to(out.device)
            w = proj.weight[idx]  # [n_p, D, d]
            mine = torch.einsum("rtnd,nkd->rtnk", self.normed[:, :, offsets], w.to(self.normed.dtype))
            if proj.bias is not None:
                mine = mine + proj.bias[idx].to(mine.dtype)
            new = out.clone()
            new[..., idx.flatten()] = mine.reshape(*mine.shape[:2], -1).to(out.dtype)
            return new
        return hook

    def _keep_stream(self, layer: int):
        def pre_hook(module, args):
            self.mlp_stream = args[0]
        return pre_hook

    def _mlp_reader(self, norm, reader: int, layer: int):
        def pre_hook(module, args):
            # writers up to this layer; ``patched`` has no edge from the layer's own MLP (nor, in a parallel
            # block, from its heads), so those terms are zero
            shifted = self.mlp_stream + self.shift([reader], layer)[:, :, 0]
            return (norm.forward(shifted), *args[1:])
        return pre_hook

    def _mlp_written(self, layer: int):
        def hook(module, args, out):
            out = module_output(out)
            self.change_mlp[layer] = self._tiled(self.base.mlp[layer]).to(out.dtype) - out
        return hook

    def _logits_reader(self, norm):
        def hook(module, args, out):
            v = len(self.rm.graph.downstream) - 1
            return norm.forward(args[0] + self.shift([v], self.rm.graph.num_layers - 1)[:, :, 0])
        return hook


@torch.no_grad()
def circuit_losses(model: torch.nn.Module, heads: HeadGates, rm: ResidualModel, batch: Batch,
                   circuits: torch.Tensor, base: WriterOutputs, *, metric: Metric = NLL, max_rows: int = 64,
                   on_pass: Callable[[int], None] | None = None) -> torch.Tensor:
    """Each example's loss with only each circuit's edges clean: [K, B] float64 for bool ``circuits`` [K, U, V]
    (an edge outside the graph is ignored); ``base`` the writers' baseline outputs on ``batch``."""
    b = batch.size
    trusted_vocabulary(model, metric, batch)  # the passes compute only the logits the metric reads
    per_pass = max(1, max_rows // b)
    allowed = rm.graph.allowed
    out = torch.empty(circuits.shape[0], b, dtype=torch.float64)
    dtype = next(model.parameters()).dtype
    for start in range(0, circuits.shape[0], per_pass):
        chunk = circuits[start:start + per_pass]
        k = chunk.shape[0]
        patched = (allowed[None] & ~chunk).to(dtype).repeat_interleave(b, 0)  # row c * B + i: circuit c
        hooks = _CircuitHooks(rm, patched.to(batch.input_ids.device), base, k * b)
        handles = hooks.install()
        try:
            with heads.observing(hooks.observe), heads.using(None, None):
                losses = example_losses(model, batch.tile(k) if k > 1 else batch, metric)
        finally:
            for h in handles:
                h.remove()
        out[start:start + k] = losses.to(torch.float64).view(k, b).cpu()
        if on_pass is not None:
            on_pass(k)
    return out


@dataclass(frozen=True)
class FaithfulnessPoint:
    """One circuit size: edges asked for, edges kept after pruning, the metric's loss and the faithfulness."""

    asked: int
    edges: int
    loss: float
    faithfulness: float


def faithfulness(loss: float, clean: float, none: float) -> float:
    """(m(circuit) - m(none)) / (m(clean) - m(none)); NaN when clean and none agree."""
    gap = clean - none
    return float("nan") if gap == 0 else (loss - none) / gap


def circuit_sizes(total: int, start: int = 10) -> list[int]:
    """Circuit sizes for a curve: 10, 20, 50, 100, 200, 500, ... up to ``total`` (which ends the list)."""
    sizes, scale = [], 1
    while True:
        for step in (1, 2, 5):
            n = start * step * scale
            if n >= total:
                return [*sizes, total]
            sizes.append(n)
        scale *= 10


def sizes_for(asked: Sequence[int], total: int) -> list[int]:
    """``asked`` sizes, each at most ``total``, without repeats, in order."""
    return sorted({min(int(n), total) for n in asked})

