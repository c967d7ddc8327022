"""Exact per-position patching: each (layer, head, token) cell runs only what it can change.

Changing head h of layer l at token p of a causal LM leaves every token before p unchanged in every
layer, and every layer below l unchanged at every token. So a cell's forward pass needs

- the clean run's keys and values of tokens < p, in every layer (a KV cache of the batch's run with
  every gate at 1, cropped to p and tiled over the rows of the pass),
- the clean run's output of layer l - 1 at tokens >= p (the layer-prefix replay of
  :mod:`headscore.methods.prefix`, its recorded outputs cut to those tokens), and
- only layers >= l, at tokens p .. E - 1, where E - 1 is the last token whose logits the metric reads.

A cell after the last token the metric reads (the answer position of ``logit-diff`` and ``prob``; the
token before a row's last for ``nll``; padding) changes nothing the metric sees: its change is 0 by
construction and no pass runs for it. Nor does a cell whose head output at that token already equals the
baseline, bit for bit, in every row the pass would hold (a corrupted prompt that starts like the clean one:
every head's output is the same at the shared tokens): the gate then changes nothing in the model.
A user's metric reads every position's logits, so no cell is after what it reads. The logits the metric
reads at tokens < p are the clean run's.

Each pass covers one token p and a run of (layer, head) cells in layer order (the pass starts at its
lowest layer), of the rows that read token p or later, tiled once per cell. :func:`position_deltas`
runs it (or, with ``fast=False``, the plain path: one row per cell through
:func:`headscore.methods.ablation.gated_losses`); :func:`position_patching_works` checks a few cells
against the plain path on a batch before a run trusts it.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..data.batching import Batch
from ..gate import gate_dtype
from ..loss import (
    NLL,
    Metric,
    _at_positions,
    _builtin_loss,
    _custom_loss,
    _in_model_dtype,
    finite_losses,
    trusted_vocabulary,
    vocabulary_only,
)
from ..loss import target_positions as _target_positions
from ..patch import HeadGates
from .ablation import cheapest_passes, check_mode, gated_losses, position_gates
from .prefix import PrefixReplay, decoder_layers, replay_tolerance

Cell = tuple[int, int, int]
"""One (position, layer, head) cell."""


def last_read_positions(batch: Batch, metric: Metric = NLL) -> torch.Tensor:
    """[B] the last token of each row whose logits ``metric`` reads: the answer position (the last prompt
    token) for ``logit-diff`` and ``prob``, the token before the row's last for ``nll``, and the batch's
    last (padding included) for a user's metric, which sees every position's logits."""
    if metric.fn is not None:
        return torch.full((batch.size,), batch.input_ids.shape[1] - 1, dtype=torch.long)
    positions, _, mask = _target_positions(batch)
    if metric.name == "nll":
        return positions.masked_fill(~mask, -1).max(1).values.cpu()
    return positions[:, 0].cpu()


def plain_position_deltas(model: torch.nn.Module, heads: HeadGates, batch: Batch, clean: torch.Tensor,
                          baseline: torch.Tensor | None = None, *, metric: Metric = NLL, mode: str = "prefix",
                          max_rows: int = 64, value: float = 0.0, on_cells: Callable[[int], None] | None = None,
                          layers: Iterable[int] | None = None) -> torch.Tensor:
    """Each cell's change of every example's loss [B, L, T, H] the plain way: one gate row per (layer, head,
    token) through :func:`gated_losses` (every token of the batch, the whole sequence each pass); only the
    cells of ``layers`` when given (0 elsewhere)."""
    layout = heads.layout
    width = batch.input_ids.shape[1]
    out = torch.zeros(batch.size, layout.num_layers, width, layout.num_heads, dtype=torch.float64)

    def done(n: int) -> None:
        if on_cells is not None:
            on_cells(n * batch.size)

    dtype = gate_dtype(model)  # the gates' dtype in the passes
    for layer in range(layout.num_layers) if layers is None else layers:
        real = layout.heads_of(layer)  # a layer's own heads: the rest of the slots are absent (NaN), no pass
        if real == 0:
            continue
        rows = position_gates(layer, layout.num_layers, layout.num_heads, width, value, dtype=dtype)[:real * width]
        delta = gated_losses(model, heads, batch, rows, baseline, mode=mode, max_rows=max_rows, metric=metric,
                             on_pass=done) - clean.cpu().double()[None]
        out[:, layer, :, :real] = delta.T.reshape(batch.size, real, width).transpose(1, 2)
    return out


def cache_keyword(model: torch.nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a KV cache (``cache`` from transformers 5.x on, before
    that ``past_key_values``), or None."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def returned_cache(out):
    """The KV cache a forward pass with ``use_cache=True`` returned (``out.cache``, before transformers 5.x
    ``out.past_key_values``), or None."""
    returned = getattr(out, "cache", None)
    return returned if returned is not None else getattr(out, "past_key_values", None)


def _every_token_cache(data: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A KV cache that keeps every token in every layer (no config: a sliding-window layer's cache would keep
    only its window, and the passes need the clean keys and values of every token before theirs; the window
    itself comes from the model's attention mask)."""
    from transformers import DynamicCache

    return DynamicCache() if data is None else DynamicCache(data)


def _length_dependent_rope(config) -> str | None:
    """The RoPE type of ``config`` if its frequencies depend on each pass's sequence length (``longrope``
    switches factors past a length, ``dynamic`` rescales), else None: a pass of tokens p .. E-1 over cached
    keys of the whole batch would rotate them otherwise than the full pass."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = []
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, name, None)
        if isinstance(value, dict):
            found += [value, *(v for v in value.values() if isinstance(v, dict))]
    for params in found:
        kind = params.get("rope_type", params.get("type"))
        if kind in ("longrope", "dynamic"):
            return kind
    return None


def _window(output, rows: torch.Tensor, start: int, end: int, size: int, width: int):
    """A recorded layer output cut to ``rows`` and tokens [start, end) (tensors [B, T, ...]; [B, ...] only
    to ``rows``; anything else as it is)."""
    if isinstance(output, torch.Tensor):
        if output.dim() >= 1 and output.shape[0] == size:
            output = output[rows.to(output.device)]
            if output.dim() >= 2 and output.shape[1] == width:
                output = output[:, start:end]
        return output
    if isinstance(output, (tuple, list)):
        items = [_window(o, rows, start, end, size, width) for o in output]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    return output


@dataclass
class CleanRun:
    """What one batch's run with every gate at 1 leaves for its cells' passes.

    Attributes:
        keys, values: each decoder layer's cached keys and values [B, Hkv, T, D].
        layer_outputs: each decoder layer's output (for the prefix replay), or None (every pass starts at layer 0).
        logits: the logits the metric reads: at each row's target-predicting positions [B, P, V] for a built-in
            metric (V: the tokens of ``PositionPatcher.vocabulary`` where that is set), at every position
            [B, T, V] for a user's one.
        last_read: [B] the last token each row's metric reads (:func:`last_read_positions`).
        losses: [B] float64, each row's loss in this run: what the cells' passes, which run the same attention
            code, are compared with.
        unchanged: [B, L, T, H] bool, True where the head's output equals the baseline bit for bit (patching
            the cell changes nothing in that row).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    layer_outputs: list | None
    logits: torch.Tensor
    last_read: torch.Tensor
    unchanged: torch.Tensor
    losses: torch.Tensor


@dataclass
class _Slice:
    """One token's share of a batch: the rows that read it or later, cut to what its passes need."""

    batch: Batch
    end: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    outputs: list | None
    reads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    logits: torch.Tensor
    baseline: torch.Tensor | None


class PositionPatcher:
    """Runs a batch's (position, layer, head) cells the fast way (see the module docstring).

    Args:
        model, heads, batch: the patched model, its gates and the batch.
        baseline: None (zero), [L, H, D], or per example and token [L, B, T, H, D].
        metric: the loss (built-in or a user's).
        replay: whether the layers below a pass's lowest layer replay the clean run (False: every pass runs
            from layer 0, for a model whose layers cannot be replayed).
        value: the gate of a changed cell (0 = the baseline).
    """

    def __init__(self, model: torch.nn.Module, heads: HeadGates, batch: Batch, baseline: torch.Tensor | None = None,
                 *, metric: Metric = NLL, replay: bool = True, value: float = 0.0):
        self.model, self.heads, self.batch, self.baseline = model, heads, batch, baseline
        self.metric, self.value = metric, value
        self.layout = heads.layout
        self.keyword = cache_keyword(model)
        if self.keyword is None:
            raise RuntimeError(f"{type(model).__name__}.forward takes no KV cache")
        rope = _length_dependent_rope(model.config)
        if rope is not None:
            raise RuntimeError(f"its RoPE ({rope}) takes its frequencies from each pass's length")
        self.layers = decoder_layers(model, self.layout.num_layers) if replay else None
        self.dtype = gate_dtype(model)
        self.vocabulary = trusted_vocabulary(model, metric, batch)  # the logits the metric reads, if not all
        self._last: tuple[tuple, _Slice] | None = None
        self.clean = self._record()

    def _head(self) -> torch.nn.Module | None:
        if self.metric.fn is not None or not hasattr(self.model, "get_output_embeddings"):
            return None
        return self.model.get_output_embeddings()

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, read: torch.Tensor | None):
        """One forward pass; the logits at ``read`` [N, P] (window positions; of :attr:`vocabulary`'s tokens only
        when it is set), or at every position when ``read`` is None, and the model's cache."""
        head = self._head() if read is not None else None
        width = input_ids.shape[1]
        gathered = []

        def gather(module, args):
            if not args or args[0].dim() != 3 or tuple(args[0].shape[:2]) != (input_ids.shape[0], width):
                return None
            gathered.append(True)
            return (_at_positions(args[0], read), *args[1:])

        handle = head.register_forward_pre_hook(gather) if head is not None else None
        kwargs = {} if cache is None else {self.keyword: cache}
        try:
            with vocabulary_only(self.model, self.vocabulary if read is not None else None):
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        logits = _in_model_dtype(out.logits, self.model)
        if read is not None and self.vocabulary is not None and logits.shape[-1] != len(self.vocabulary):
            raise RuntimeError(f"the model returned {logits.shape[-1]} logits per token for "
                               f"{len(self.vocabulary)} tokens")
        if read is not None and not gathered:
            if logits.shape[1] != width:
                raise RuntimeError(f"the model returned logits for {logits.shape[1]} of {width} positions")
            logits = _at_positions(logits, read)
        return logits, returned_cache(out)

    @torch.no_grad()
    def _record(self) -> CleanRun:
        batch, layout = self.batch, self.layout
        width = batch.input_ids.shape[1]
        ones = self.heads.ones(1, device=batch.input_ids.device, dtype=self.dtype, positions=width)
        replay = PrefixReplay(self.layers) if self.layers is not None else None
        read = None if self.metric.fn is not None else _target_positions(batch)[0]
        unchanged = torch.zeros(batch.size, layout.num_layers, width, layout.num_heads, dtype=torch.bool)

        def compare(layer: int, out: torch.Tensor) -> None:
            base = self.baseline
            if base is None:
                same = out == 0
            else:
                m = base[layer][..., :out.shape[-2], :out.shape[-1]]
                same = out == m.to(out.device, out.dtype)  # [B, T, H, D] or [H, D], broadcast
            unchanged[:, layer, :, :out.shape[-2]] = same.all(-1).cpu()

        with self.heads.using(ones, self.baseline), self.heads.observing(compare), self.heads.without_kernel(), \
                (replay.recording() if replay else contextlib.nullcontext()):
            logits, cache = self._forward(batch.input_ids, batch.attention_mask, _every_token_cache(), read)
        if read is not None:
            _, labels, keep = (t.to(logits.device) for t in _target_positions(batch))
            losses = _builtin_loss(self.metric, logits, labels, keep, batch, self.vocabulary)
        else:
            losses = _custom_loss(self.metric, logits, batch)
        losses = finite_losses(losses, batch.example_index, logits.dtype, batch.attention_mask).cpu().double()
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != layout.num_layers:
            raise RuntimeError(f"the model's cache ({type(cache).__name__}) has no per-layer keys and values")
        keys, values = [layer.keys for layer in layers], [layer.values for layer in layers]
        if any(k is None or k.shape[-2] != width or v.shape[-2] != width for k, v in zip(keys, values, strict=True)):
            raise RuntimeError("the model's cache does not keep every token's keys and values")
        return CleanRun(keys, values, replay.outputs if replay is not None else None, logits,
                        last_read_positions(batch, self.metric), unchanged, losses)

    def _slice(self, position: int, rows: torch.Tensor) -> _Slice:
        """What every pass at ``position`` over ``rows`` shares (kept for the next pass)."""
        key = (position, tuple(rows.tolist()))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        batch, clean = self.batch, self.clean
        width = batch.input_ids.shape[1]
        end = int(clean.last_read[rows].max()) + 1
        sub = batch.select(rows)
        device = clean.keys[0].device
        keys = [k[rows.to(device), :, :position] for k in clean.keys]
        values = [v[rows.to(device), :, :position] for v in clean.values]
        outputs = None if clean.layer_outputs is None else [
            _window(o, rows, position, end, batch.size, width) for o in clean.layer_outputs]
        reads = None
        if self.metric.fn is None:
            reads = tuple(t[rows.to(t.device)] for t in _target_positions(batch))
        before = clean.logits[rows.to(clean.logits.device)]
        base = self.baseline
        if base is not None and base.dim() == 5:
            base = base[:, rows.to(base.device), position:end]
        out = _Slice(sub, end, keys, values, outputs, reads, before, base)
        self._last = (key, out)
        return out

    def _cache(self, part: _Slice, position: int, copies: int, depth: int):
        """A fresh cache of the clean keys and values at tokens < ``position``, tiled ``copies`` times for the
        layers a pass runs (a layer below ``depth`` does not run: its rows stay untiled, only its length is read)."""
        if position == 0:
            return None
        data = [(k, v) if i < depth else (k.repeat(copies, 1, 1, 1), v.repeat(copies, 1, 1, 1))
                for i, (k, v) in enumerate(zip(part.keys, part.values, strict=True))]
        return _every_token_cache(data)

    def changing_cells(self, position: int, rows: torch.Tensor) -> list[tuple[int, int]]:
        """The (layer, head) cells at token ``position`` whose patch changes the model in one of ``rows`` at
        least (the others' change is exactly 0), in layer order."""
        layout = self.layout
        same = self.clean.unchanged[rows, :, position].all(0)
        return [(layer, head) for layer in range(layout.num_layers) for head in range(layout.heads_of(layer))
                if not bool(same[layer, head])]

    def rows_reading(self, position: int) -> torch.Tensor:
        """Indices of the rows whose metric reads token ``position`` or a later one."""
        return (self.clean.last_read >= position).nonzero().flatten()

    @torch.no_grad()
    def run(self, position: int, cells: list[tuple[int, int]], rows: torch.Tensor) -> torch.Tensor:
        """The loss of ``rows`` [R] with each (layer, head) of ``cells`` changed at token ``position``: [n, R]."""
        layout = self.layout
        part = self._slice(position, rows)
        n, r = len(cells), len(rows)
        span = part.end - position
        device = part.batch.input_ids.device
        gates = torch.ones(n, layout.num_layers, span, layout.num_heads, device=device, dtype=self.dtype)
        for c, (layer, head) in enumerate(cells):
            gates[c, layer, 0, head] = self.value
        depth = min(layer for layer, _ in cells) if part.outputs is not None else 0
        skip = contextlib.nullcontext()
        if depth > 0:
            replay = PrefixReplay(self.layers)
            replay.outputs = part.outputs
            skip = replay.skipping(depth, n)
        ids = part.batch.input_ids[:, position:part.end].repeat(n, 1)
        mask = part.batch.attention_mask[:, :part.end].repeat(n, 1)
        read = None if part.reads is None else (part.reads[0] - position).clamp(0, span - 1).repeat(n, 1)
        with skip, self.heads.using(gates.repeat_interleave(r, 0), part.baseline), self.heads.without_kernel():
            logits, _ = self._forward(ids, mask, self._cache(part, position, n, depth), read)
        tiled = part.batch.tile(n)
        before = part.logits.to(logits.device, logits.dtype)
        if part.reads is not None:
            positions, labels, keep = (t.to(logits.device) for t in part.reads)
            fresh = positions >= position  # the metric's positions this pass computes; the clean run's before them
            if not bool(fresh.all()):
                logits = torch.where(fresh[None, :, :, None], logits.view(n, r, *logits.shape[1:]), before[None])
                logits = logits.flatten(0, 1)
            loss = _builtin_loss(self.metric, logits, labels.repeat(n, 1), keep.repeat(n, 1), tiled,
                                 self.vocabulary)
        else:
            loss = _custom_loss(self.metric, torch.cat([before[:, :position].repeat(n, 1, 1), logits], 1), tiled)
        return finite_losses(loss, tiled.example_index, logits.dtype, tiled.attention_mask).view(n, r).cpu().double()


def fast_position_deltas(patcher: PositionPatcher, *, max_rows: int = 64,
                         on_cells: Callable[[int], None] | None = None,
                         positions: Iterable[int] | None = None) -> torch.Tensor:
    """Every cell's change of every example's loss [B, L, T, H] with ``patcher`` (0 where the metric reads no
    token at or after the cell's), against the patcher's own clean run (the same attention code as the cells'
    passes: the model's own, wrapped, never the fused kernel, which cannot take cached tokens); only the cells at
    ``positions`` when given (0 elsewhere).

    A pass holds at most about ``max_rows`` x T tokens per layer (its cache included), like a plain pass of
    ``max_rows`` rows: a pass of R rows reading up to token E - 1 takes up to max_rows x T // (R x E) cells,
    cut from a token's cells in layer order at the least estimated cost (:func:`cheapest_passes`, each cell
    counted as the R x (E - p) tokens it runs)."""
    batch, layout = patcher.batch, patcher.layout
    width = batch.input_ids.shape[1]
    out = torch.zeros(batch.size, layout.num_layers, width, layout.num_heads, dtype=torch.float64)
    every = layout.real_heads  # the cells of a token (a head a layer lacks is no cell)
    clean = patcher.clean.losses
    for position in range(width) if positions is None else positions:
        rows = patcher.rows_reading(position)
        changing = patcher.changing_cells(position, rows) if len(rows) else []
        if changing:
            end = int(patcher.clean.last_read[rows].max()) + 1
            per_pass = max(1, max_rows * width // (len(rows) * end))
            replayed = patcher.clean.layer_outputs is not None  # else every pass starts at layer 0
            layers = torch.tensor([layer if replayed else 0 for layer, _ in changing])
            for idx, _ in cheapest_passes(layers, layout.num_layers, per_pass, len(rows) * (end - position)):
                cells = [changing[i] for i in idx.tolist()]
                delta = patcher.run(position, cells, rows) - clean[rows][None]
                layer_idx = torch.tensor([layer for layer, _ in cells])
                head_idx = torch.tensor([head for _, head in cells])
                # a row whose head output already equals its baseline there is not changed by the patch: exactly
                # 0 (its pass ran for the other rows, in other matmul shapes than the clean run: float32 rounding)
                same = patcher.clean.unchanged[rows[None, :], layer_idx[:, None], position, head_idx[:, None]]
                out[rows[None, :], layer_idx[:, None], position, head_idx[:, None]] = delta.masked_fill(same, 0.0)
                if on_cells is not None:
                    on_cells(len(cells) * len(rows))
        if on_cells is not None:
            on_cells(every * batch.size - len(changing) * len(rows))
    return out


def position_deltas(model: torch.nn.Module, heads: HeadGates, batch: Batch, clean: torch.Tensor,
                    baseline: torch.Tensor | None = None, *, metric: Metric = NLL, mode: str = "prefix",
                    max_rows: int = 64, fast: bool = True, value: float = 0.0,
                    on_cells: Callable[[int], None] | None = None) -> torch.Tensor:
    """Each (layer, head, token) cell's change of every example's loss: [B, L, T, H], ``clean`` [B] the
    loss with every head on (the plain path's reference; the fast path compares with its own clean run, which
    runs the attention code its passes run).

    ``fast`` (for modes ``prefix`` and ``batched``; ``batched`` replays no layers) runs only the tokens and
    layers a cell can change (module docstring); else, and for mode ``naive``, one row per cell through
    :func:`gated_losses`. Both give the same numbers (check a model with :func:`position_patching_works`).
    ``on_cells(n)`` is called with the number of (example, layer, head, token) cells done.
    """
    mode = check_mode(mode)
    patcher = None
    if fast and mode != "naive":
        try:
            patcher = PositionPatcher(model, heads, batch, baseline, metric=metric, replay=mode == "prefix",
                                      value=value)
        except RuntimeError as exc:  # what the first batch's check could not see (e.g. a longer batch)
            warnings.warn(f"{type(model).__name__}: fast per-position patching failed on a batch of "
                          f"{batch.input_ids.shape[1]} tokens ({exc}); that batch takes the plain path", stacklevel=2)
    if patcher is None:
        return plain_position_deltas(model, heads, batch, clean, baseline, metric=metric, mode=mode,
                                     max_rows=max_rows, value=value, on_cells=on_cells)
    return fast_position_deltas(patcher, max_rows=max_rows, on_cells=on_cells)


def _check_cells(batch: Batch, last_read: torch.Tensor, layout) -> list[Cell]:
    """A few cells the check compares: the first and last layer, at the middle of the tokens every row reads
    and at the last of them."""
    last = int(last_read.min())
    cells = []
    for position in sorted({last // 2, last}):
        cells += [(position, layout.num_layers - 1, 0), (position, 0, layout.num_heads - 1)]
    return cells


@torch.no_grad()
def position_patching_works(model: torch.nn.Module, heads: HeadGates, batch: Batch,
                            baseline: torch.Tensor | None = None, *, metric: Metric = NLL,
                            mode: str = "prefix") -> bool:
    """Whether the fast per-position path reproduces the plain one on this model: a few cells of ``batch``
    (the first and last layer, two tokens) against one full forward pass each.

    False, with a warning saying why, for a model whose forward takes no KV cache, whose cache does not hold
    every token's keys and values, or whose cached pass differs beyond rounding (per-position patching
    then takes the plain path).
    """
    name = type(model).__name__
    try:
        patcher = PositionPatcher(model, heads, batch, baseline, metric=metric, replay=check_mode(mode) == "prefix")
        cells = _check_cells(batch, patcher.clean.last_read, heads.layout)
        rows = patcher.rows_reading(max(p for p, _, _ in cells))
        fast = torch.cat([patcher.run(p, [(layer, head)], rows) for p, layer, head in cells])
    except Exception as exc:  # noqa: BLE001 - any failure of the fast path means: do not use it
        # the checks' own reasons are RuntimeErrors; anything else came from the model's cache (a hybrid model's
        # recurrent state, say: IndexError), which the bare message did not say
        why = str(exc) if isinstance(exc, RuntimeError) else \
            f"its cache does not take a pass over cached tokens: {type(exc).__name__}: {exc}"
        warnings.warn(f"{name}: fast per-position patching failed ({why}); per-position patching takes the plain "
                      "path (one full pass per cell)", stacklevel=2)
        return False
    layout = heads.layout
    width = batch.input_ids.shape[1]
    gate_rows = torch.ones(len(cells), layout.num_layers, width, layout.num_heads, dtype=torch.float64)
    for i, (p, layer, head) in enumerate(cells):
        gate_rows[i, layer, p, head] = 0.0
    plain = gated_losses(model, heads, batch, gate_rows, baseline, mode="naive", metric=metric)[:, rows]
    dtype = next(model.parameters()).dtype
    tol = replay_tolerance(dtype)
    if torch.allclose(fast, plain, rtol=tol, atol=tol):
        return True
    worst = int((fast - plain).abs().flatten().argmax())
    gap, loss = float((fast - plain).abs().flatten()[worst]), float(plain.flatten()[worst])
    warnings.warn(f"{name}: the cached per-position pass does not reproduce the full pass (a loss of {loss:.6g} "
                  f"differs by {gap:.3g}, allowed {tol:g} + {tol:g} x |loss|); per-position patching takes the "
                  "plain path (one full pass per cell)", stacklevel=2)
    return False
