"""Edge attribution patching: every edge's first-order score from one clean forward and one backward.

score(u -> v) = sum over tokens of < a_u(baseline) - a_u(clean), dL/dx_v >, x_v being v's own copy of its
residual input (before its norm): the first-order change of the loss when only v sees u's baseline output.

How it stays in the memory the backward already holds: no d_model vector per upstream node is kept. The
forward keeps each layer's head outputs z [B, T, H, D] (the output projection's input, which the backward
keeps anyway), the MLP outputs and the layer inputs. During the backward, as soon as layer l's readers have
their gradients (the query, key and value projections' outputs and the MLP's normed input), they are taken
back through their weights and the norm's Jacobian to v's residual input, g_v [B, T, n_l, d], and contracted
with every earlier writer: a head's contribution W_o[:, h] dz_h is recomputed there from dz and the output
projection's weights, one upstream layer at a time (a transient [H, B*T, d]), for a block of
:data:`READER_BLOCK` reader layers at once, then dropped. Extra memory: a block's g_v and one layer's
recomputed contributions, plus the per-example scores [B, U, V] (docs/edges.md has the whole formula).

Summed over every downstream node, a head's edge scores equal its taylor (attribution patching) node score:
a check :func:`edge_attributions` returns the gate gradient for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..data.batching import Batch, weighted_tokens_only
from ..errors import UnsupportedModelError
from ..gate import gate_dtype
from ..loss import NLL, Metric, example_losses, refuse_non_finite_mean, run_forward
from ..patch import HeadGates
from .residual import Projection, ResidualModel, layer_input, module_output, with_layer_input


@dataclass
class WriterOutputs:
    """Every upstream node's output on one batch: the stream the first layer receives ``emb`` [B, T, d],
    head outputs ``heads[l]`` [B, T, H, D] (before the output projection), MLP outputs ``mlp[l]`` [B, T, d]."""

    emb: torch.Tensor | None = None
    heads: list[torch.Tensor | None] = field(default_factory=list)
    mlp: list[torch.Tensor | None] = field(default_factory=list)
    leaf: torch.Tensor | None = None
    attn_raw: list[torch.Tensor | None] | None = None  # output projections' outputs, where a norm follows them

    def minus(self, other: WriterOutputs) -> WriterOutputs:
        """``self - other``, node by node (keeping ``other``'s output projections: the point a following norm's
        Jacobian is taken at)."""
        return WriterOutputs(self.emb - other.emb, [a - b for a, b in zip(self.heads, other.heads, strict=True)],
                             [a - b for a, b in zip(self.mlp, other.mlp, strict=True)],
                             attn_raw=other.attn_raw)

    def complete(self) -> bool:
        """Whether every node's output was seen."""
        return self.emb is not None and all(z is not None for z in self.heads) and \
            all(m is not None for m in self.mlp)


@contextlib.contextmanager
def recording_writers(rm: ResidualModel, heads: HeadGates, *, leaf: bool = False,
                      first_input: torch.Tensor | None = None, ungated: bool = False) -> Iterator[WriterOutputs]:
    """Record every upstream node's output (detached) in the forward passes inside the block; ``leaf``
    makes the first layer's input a leaf that requires grad, so a backward reaches every reader;
    ``first_input`` replaces what the first layer receives (an interpolated input). ``ungated``: the passes
    run with no gate set, so the heads' outputs are read off the output projection's input instead of
    through an observer, and the fused kernel, which declines observed calls, serves these passes as it serves
    the unobserved ones they are compared with."""
    num_layers = rm.graph.num_layers
    out = WriterOutputs(None, [None] * num_layers, [None] * num_layers)

    def first(module, args, kwargs):
        x = layer_input(args, kwargs) if first_input is None else first_input.to(layer_input(args, kwargs))
        out.emb = x.detach()
        if leaf:
            x = out.leaf = x.detach().requires_grad_(True)
        elif first_input is None:
            return None
        return with_layer_input(args, kwargs, x)

    def observe(layer: int, z: torch.Tensor) -> None:
        out.heads[layer] = z.detach()

    handles = [rm.layers[0].block.register_forward_pre_hook(first, with_kwargs=True)]
    for i, lm in enumerate(rm.layers):
        handles.append(lm.mlp_writer.register_forward_hook(
            lambda module, args, o, i=i: out.mlp.__setitem__(i, module_output(o).detach())))
        if lm.attn_out_norm is not None:
            out.attn_raw = out.attn_raw or [None] * num_layers
            handles.append(lm.o_proj.register_forward_hook(
                lambda module, args, o, i=i: out.attn_raw.__setitem__(i, module_output(o).detach())))
        if ungated:
            shape = tuple(lm.o_weight.shape[1:])  # (heads, head_dim): the projection's input [B, T, H * D]

            def heads_in(module, args, i=i, shape=shape):
                out.heads[i] = args[0].detach().unflatten(-1, shape)

            handles.append(lm.o_proj.register_forward_pre_hook(heads_in))
    try:
        with contextlib.nullcontext() if ungated else heads.observing(observe):
            yield out
    finally:
        for h in handles:
            h.remove()


def norm_vjp(norm: torch.nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    """The norm's Jacobian at ``x`` [B, T, d] transposed, applied to each of ``cotangent`` [B, T, n, d]'s
    n vectors: [B, T, n, d] (one forward of the norm, its backward mapped over the n vectors)."""
    with torch.enable_grad():
        # forward(), not the module call: the module's own hooks (ours among them) stay out of it
        _, pullback = torch.func.vjp(norm.forward, x.detach())
        (grad,) = torch.vmap(pullback, in_dims=2, out_dims=2)(cotangent)
    return grad


def reader_cotangents(proj: Projection, grad: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """A projection's output gradient [B, T, out] taken back to its input, reader by reader: (the readers'
    offsets, [B, T, readers, d])."""
    cols = proj.columns.to(grad.device)  # [R, D]
    return proj.offsets, torch.einsum("btrk,rkd->btrd", grad[..., cols], proj.weight[cols].to(grad.dtype))


READER_BLOCK = 4
"""How many layers' reader gradients wait to be contracted together: each head contribution recomputed then
serves that many layers (the dominant cost falls about that much), for that many layers' g held at once."""


class _EdgeBackward:
    """The backward hooks of :func:`edge_attributions`: each layer's reader gradients, taken back to the
    stream as soon as the layer's last one arrives and contracted with the writers before them, a block of
    :data:`READER_BLOCK` layers at a time."""

    def __init__(self, rm: ResidualModel, scores: torch.Tensor):
        self.rm, self.scores = rm, scores
        self.delta: WriterOutputs | None = None  # baseline - clean, set once the forward pass has run
        n = rm.graph.num_layers
        self.x_attn: list[torch.Tensor | None] = [None] * n
        self.x_mlp: list[torch.Tensor | None] = [None] * n
        self.x_final: torch.Tensor | None = None
        self.grads: list[dict[object, torch.Tensor]] = [{} for _ in range(n)]
        self.dz: list[torch.Tensor] = []  # see edge_attributions
        self.w: list[torch.Tensor] = []
        self.pending: list[tuple[torch.Tensor, int, slice]] = []  # (g as [B, T*d, n], last writer layer, cols)

    def hooks(self) -> list:
        handles = []
        for i, lm in enumerate(self.rm.layers):
            handles.append(lm.attn_norm.register_forward_pre_hook(
                lambda m, args, i=i: self.x_attn.__setitem__(i, args[0].detach())))
            handles.append(lm.mlp_norm.register_forward_pre_hook(
                lambda m, args, i=i: self.x_mlp.__setitem__(i, args[0].detach())))
            handles.append(lm.mlp.register_forward_pre_hook(self._own_copy(i)))
            for k, proj in enumerate(lm.projections):
                handles.append(proj.module.register_forward_hook(self._grad_hook(i, k)))
        handles.append(self.rm.final_norm.register_forward_pre_hook(
            lambda m, args: setattr(self, "x_final", args[0].detach())))
        handles.append(self.rm.final_norm.register_forward_hook(self._grad_hook(-1, "logits")))
        return handles

    def _own_copy(self, layer: int):
        """The MLP gets its own copy of its normed input, whose gradient is the MLP's share alone (a norm
        output may feed the attention too, as Phi's does)."""
        def pre_hook(module, args):
            if not args[0].requires_grad:
                return None
            mine = args[0].clone()
            mine.register_hook(lambda g: self._arrived(layer, "mlp", g))
            return (mine, *args[1:])
        return pre_hook

    def _grad_hook(self, layer: int, key):
        def forward_hook(module, args, out):
            out = module_output(out)
            if out.requires_grad:
                out.register_hook(lambda g: self._arrived(layer, key, g))
        return forward_hook

    def _arrived(self, layer: int, key, grad: torch.Tensor) -> None:
        with torch.no_grad():
            if key == "logits":
                g = norm_vjp(self.rm.final_norm, self.x_final, grad.unsqueeze(2))
                self._queue(g, self.rm.graph.num_layers - 1, slice(len(self.rm.graph.downstream) - 1, None))
                return
            got = self.grads[layer]
            got[key] = grad
            if len(got) == len(self.rm.layers[layer].projections) + 1:
                self.grads[layer] = {}
                self._layer(layer, got)

    def _layer(self, layer: int, got: dict[object, torch.Tensor]) -> None:
        rm, graph = self.rm, self.rm.graph
        lm = rm.layers[layer]
        mlp_grad = got["mlp"]
        b, t, d = mlp_grad.shape
        cot = mlp_grad.new_zeros(b, t, graph.readers_per_layer - 1, d)
        for k, proj in enumerate(lm.projections):
            offsets, part = reader_cotangents(proj, got[k])
            cot[:, :, offsets] = part
        g_attn = norm_vjp(lm.attn_norm, self.x_attn[layer], cot)
        g_mlp = norm_vjp(lm.mlp_norm, self.x_mlp[layer], mlp_grad.unsqueeze(2))
        start = graph.reader_start(layer)
        self._queue(torch.cat([g_attn, g_mlp], dim=2), layer, slice(start, start + graph.readers_per_layer))

    def _queue(self, g: torch.Tensor, last: int, cols: slice) -> None:
        """Keep readers ``cols``' g [B, T, n, d] (they read writers up to layer ``last``) until a block is full."""
        b, t, n, d = g.shape
        self.pending.append((g.permute(0, 1, 3, 2).reshape(b, t * d, n), last, cols))
        if len(self.pending) >= READER_BLOCK or last == 0:
            self.flush()

    def flush(self) -> None:
        """Scores of every writer into the waiting readers: per upstream layer its heads' contributions
        A [H, B*T, d] are recomputed once from dz [H, B*T, D] and the output projection (the transient), then
        A as [B, H, T*d] times each waiting g as [B, T*d, n] that reads that layer; the embeddings and each MLP
        as [B, 1, T*d] times g."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        graph, delta, s = self.rm.graph, self.delta, self.scores
        h = graph.num_heads
        b = s.shape[0]
        width = pending[0][0].shape[1]
        # the products run in float32 at least, as the heads' contributions do (a bfloat16 model's reader
        # gradients come in its own dtype: bmm refused the mix)
        dtype = torch.promote_types(pending[0][0].dtype, torch.float32)
        d = delta.emb.shape[-1]
        emb = delta.emb.to(dtype).reshape(b, 1, width)
        for flat, _, cols in pending:
            s[:, 0, cols] = torch.bmm(emb, flat.to(dtype))[:, 0].to(s.dtype)
        for lu in range(max(last for _, last, _ in pending) + 1):
            readers = [(flat, cols) for flat, last, cols in pending if last >= lu]
            per_row = torch.bmm(self.dz[lu], self.w[lu]).view(h, b, width).transpose(0, 1).to(dtype)  # [B, H, T*d]
            mlp = delta.mlp[lu].to(dtype).reshape(b, 1, width)
            h0 = graph.head_index(lu, 0)
            norm = self.rm.layers[lu].attn_out_norm
            for flat, cols in readers:
                s[:, graph.mlp_index(lu), cols] = torch.bmm(mlp, flat.to(dtype))[:, 0].to(s.dtype)
                if norm is not None:  # the heads reach the stream through the attention's output norm
                    n = flat.shape[-1]
                    g = flat.view(b, width // d, d, n).transpose(2, 3)
                    flat = norm_vjp(norm, delta.attn_raw[lu], g).transpose(2, 3).reshape(b, width, n)
                s[:, h0:h0 + h, cols] = torch.bmm(per_row, flat.to(dtype)).to(s.dtype)


def edge_attributions(model: torch.nn.Module, heads: HeadGates, rm: ResidualModel, batch: Batch,
                      baseline: WriterOutputs | str = "zero", *, metric: Metric = NLL,
                      clean: WriterOutputs | None = None, first_input: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example loss [B], edge scores [B, U, V] (0 where no edge exists; see :class:`EdgeGraph`) and the
    gate gradient [B, L, H] of one clean forward and backward.

    ``baseline``: ``"zero"`` (every writer's output 0) or each writer's baseline output (a
    :class:`WriterOutputs` of the batch's shapes, or broadcastable to them: per-node means). Scores are
    float64 for a float64 model, else float32.

    ``first_input`` (with ``clean``, the writers' clean outputs): the gradients are taken on a run whose first
    layer receives ``first_input`` instead (a point between the corrupted and the clean input: one step of
    EAP-IG-inputs), the changes stay baseline minus ``clean``.
    """
    graph = rm.graph
    dtype = gate_dtype(model)
    scores = torch.zeros(batch.size, len(graph.upstream), len(graph.downstream), dtype=dtype,
                         device=batch.input_ids.device)
    gates = heads.ones(batch.size, device=batch.input_ids.device, requires_grad=True, dtype=dtype)
    backward = _EdgeBackward(rm, scores)
    handles = backward.hooks()
    try:
        # the gates' baseline is the heads' own, so the gate gradient is the matching node score's (at gate 1 the
        # forward pass is the clean one whatever the baseline)
        head_base = None if isinstance(baseline, str) else torch.stack(baseline.heads)
        with recording_writers(rm, heads, leaf=True, first_input=first_input) as run, heads.using(gates, head_base):
            loss = example_losses(model, batch, metric)
        if not run.complete():
            raise ValueError("edges: not every layer's heads and MLP were seen in the forward pass")
        if first_input is not None and clean is None:
            raise ValueError("first_input needs the writers' clean outputs (clean=)")
        clean = run if clean is None else clean
        base = zero_writers(rm, clean.emb) if isinstance(baseline, str) and baseline == "zero" else baseline
        backward.delta = base.minus(clean)
        # each layer's head changes as [H, B*T, D] and output projection as [H, D, d], laid out for the products
        backward.dz = [z.to(dtype).permute(2, 0, 1, 3).reshape(z.shape[2], -1, z.shape[3]) for z in
                       backward.delta.heads]
        backward.delta.heads = []  # dz holds them now (one copy, not two)
        leaf = run.leaf
        del base, clean, run
        backward.w = [rm.o_weight(i).to(dtype).permute(1, 2, 0) for i in range(graph.num_layers)]
        # asking for the first layer's input too makes the backward reach every reader, not only the gates
        grad, _ = torch.autograd.grad(loss.sum(), [gates, leaf])
        backward.flush()
    finally:
        for h in handles:
            h.remove()
    return loss.detach(), scores * graph.allowed.to(scores.device), grad


@torch.no_grad()
def check_decomposition(model: torch.nn.Module, heads: HeadGates, rm: ResidualModel, batch: Batch) -> None:
    """Refuse (UnsupportedModelError) a model whose residual stream is not what the edge graph says: every
    layer's input and the final norm's input must be the embeddings plus every earlier head's slice of the
    output projection (and its bias) plus every earlier MLP output, to float round-off. A family that scales
    the stream (Granite's residual multiplier) or adds terms of its own fails here, on the first batch."""
    inputs: list[torch.Tensor | None] = [None] * (rm.graph.num_layers + 1)
    handles = [lm.block.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: inputs.__setitem__(i, layer_input(args, kwargs).detach()), with_kwargs=True)
        for i, lm in enumerate(rm.layers)]
    handles.append(rm.final_norm.register_forward_pre_hook(lambda m, args: inputs.__setitem__(-1, args[0].detach())))
    # each norm a reader reads the stream through runs once a pass (NanoChat runs its final norm on the embeddings
    # too: the logits reader's hook then changed both calls, and exact patching into the logits was wrong)
    norms = {id(m): (m, where) for i, lm in enumerate(rm.layers)
             for m, where in ((lm.attn_norm, f"layer {i}'s attention norm"), (lm.mlp_norm, f"layer {i}'s MLP norm"))}
    norms[id(rm.final_norm)] = (rm.final_norm, "the final norm")
    calls = dict.fromkeys(norms, 0)
    handles += [m.register_forward_hook(lambda mod, args, o, k=k: calls.__setitem__(k, calls[k] + 1))
                for k, (m, _) in norms.items()]
    attn_out: list[torch.Tensor | None] = [None] * rm.graph.num_layers
    handles += [lm.attn_out_norm.register_forward_hook(
        lambda m, args, o, i=i: attn_out.__setitem__(i, module_output(o).detach()))
        for i, lm in enumerate(rm.layers) if lm.attn_out_norm is not None]
    try:
        with recording_writers(rm, heads) as out, heads.using(None, None):
            run_forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not out.complete() or any(x is None for x in inputs):
        raise UnsupportedModelError(f"edges: {rm.family}'s forward pass did not go through every layer's heads, "
                                    "MLP and final norm where edges hook them")
    again = [(norms[k][1], n) for k, n in calls.items() if n > 1]
    if again:
        raise UnsupportedModelError(f"edges: {rm.family} runs {again[0][0]} {again[0][1]} times a pass, where edges "
                                    "read the stream through it once; edges cannot tell its calls apart")
    mask = batch.attention_mask.to(out.emb.device).bool()
    stream = out.emb.to(torch.float64)
    eps = torch.finfo(out.emb.dtype).eps
    for i in range(rm.graph.num_layers + 1):
        got = inputs[i].to(torch.float64)
        scale = float(got[mask].abs().max()) + 1e-30
        off = float((got - stream)[mask].abs().max()) / scale
        if off > 1e3 * eps * (i + 1):  # round-off of i layers' sums in the model's dtype
            where = f"layer {i}'s input" if i < rm.graph.num_layers else "the final norm's input"
            raise UnsupportedModelError(
                f"edges: {rm.family}'s residual stream is not the sum of its embeddings, heads and MLPs ({where} "
                f"is off by {off:.1e} of its size); edges cannot decompose it")
        if i == rm.graph.num_layers:
            break
        lm = rm.layers[i]
        o = torch.einsum("bthk,dhk->btd", out.heads[i].to(torch.float64), rm.o_weight(i).to(torch.float64))
        bias = lm.o_bias
        o = o + (0 if bias is None else bias.to(torch.float64))
        if lm.attn_out_norm is not None:  # the heads' sum is the output projection's, which the norm then takes
            raw = out.attn_raw[i].to(torch.float64)
            off = float((raw - o)[mask].abs().max()) / (float(raw[mask].abs().max()) + 1e-30)
            if off > 1e3 * eps:
                raise UnsupportedModelError(f"edges: {rm.family}'s layer {i} output projection is not the sum of its "
                                            f"heads' slices (off by {off:.1e} of its size); edges cannot decompose it")
            o = attn_out[i].to(torch.float64)
        added = o + out.mlp[i].to(torch.float64)
        if eps > 1e-4:  # half precision: i layers' round-off allows the whole stream (bfloat16: 7.8 x (i + 1) of its
            # size), so each layer's own addition is checked too, against the two roundings of its sums (a stream
            # the layer scales, Granite's residual multiplier of 0.22, passed in bfloat16)
            step = inputs[i + 1].to(torch.float64) - inputs[i].to(torch.float64)
            big = max(float(inputs[i + 1].to(torch.float64)[mask].abs().max()), float(got[mask].abs().max()))
            off = float((step - added)[mask].abs().max())
            if off > 8 * eps * big + 1e-30 and off > 0.05 * float(added[mask].abs().max()):
                raise UnsupportedModelError(
                    f"edges: {rm.family}'s layer {i} does not add the sum of its heads and MLP to the residual stream "
                    f"(off by {off / (float(added[mask].abs().max()) + 1e-30):.1e} of what it adds); edges cannot "
                    "decompose it")
        stream = stream + added


@torch.no_grad()
def mean_writer_outputs(model: torch.nn.Module, heads: HeadGates, rm: ResidualModel, batches: Iterable[Batch]
                        ) -> WriterOutputs:
    """Every upstream node's mean output over all real (non-padding) tokens of ``batches`` (the mean
    baseline of edges: ``emb`` and ``mlp[l]`` [d], ``heads[l]`` [H, D]); sums in float64, one forward-only
    pass per batch."""
    sums: WriterOutputs | None = None
    tokens = 0
    for batch in batches:
        out = writer_outputs(model, heads, rm, batch)
        mask = batch.attention_mask.to(out.emb.device, torch.float64)
        tokens += int(mask.sum())

        def total(x: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
            return torch.einsum("bt,bt...->...", mask, weighted_tokens_only(mask, x.to(torch.float64)))
        part = WriterOutputs(total(out.emb), [total(z) for z in out.heads], [total(m) for m in out.mlp])
        sums = part if sums is None else WriterOutputs(sums.emb + part.emb,
                                                       [a + b for a, b in zip(sums.heads, part.heads, strict=True)],
                                                       [a + b for a, b in zip(sums.mlp, part.mlp, strict=True)])
    if sums is None:
        raise ValueError("no batches to take the mean over")
    n = max(tokens, 1)
    dtype = next(model.parameters()).dtype
    refuse_non_finite_mean("node outputs", sums.emb, *sums.heads, *sums.mlp)
    return WriterOutputs((sums.emb / n).to(dtype), [(z / n).to(dtype) for z in sums.heads],
                         [(m / n).to(dtype) for m in sums.mlp])


def zero_writers(rm: ResidualModel, like: torch.Tensor) -> WriterOutputs:
    """Every writer's output zero, as per-node vectors that broadcast over examples and tokens (``emb`` and
    ``mlp[l]`` [d], ``heads[l]`` [H, D]), in ``like``'s dtype and device: the zero baseline, without a pass."""
    d = rm.o_weight(0).shape[0]
    layers, h = rm.graph.num_layers, rm.graph.num_heads
    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=like.dtype, device=like.device)
    return WriterOutputs(zeros(d), [zeros(h, rm.head_dim) for _ in range(layers)], [zeros(d) for _ in range(layers)])


def writer_baselines(model: torch.nn.Module, heads: HeadGates, rm: ResidualModel, baseline: str,
                     batches: Iterable[Batch]) -> Callable[[Batch], WriterOutputs]:
    """The writers' baseline outputs of each batch, by ``baseline``: ``corrupt``, the batch's corrupted run (one
    forward-only pass per batch); ``mean``, the means over ``batches`` (one pass over them, made here, and only
    then iterated); ``zero``, :func:`zero_writers`."""
    if baseline == "corrupt":
        return lambda batch: writer_outputs(model, heads, rm, batch.corrupted())
    fixed = mean_writer_outputs(model, heads, rm, batches) if baseline == "mean" else \
        zero_writers(rm, next(model.parameters()))
    return lambda batch: fixed


@torch.no_grad()
def writer_outputs(model: torch.nn.Module, heads: HeadGates, rm: ResidualModel, batch: Batch) -> WriterOutputs:
    """Every upstream node's output on ``batch`` (one forward-only pass; e.g. on its corrupted prompts)."""
    with recording_writers(rm, heads) as out, heads.using(None, None):
        run_forward(model, batch)
    if not out.complete():
        raise ValueError("edges: not every layer's heads and MLP were seen in the forward pass")
    return out

