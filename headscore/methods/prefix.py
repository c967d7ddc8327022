"""Prefix reuse for exact ablation: layers before a row's first changed gate are not run again.

A gate row that changes heads of layer l (and none earlier) leaves layers 0 .. l-1 exactly as
in a run with every gate at 1. :class:`PrefixReplay` records, once per batch, each decoder
layer's output under all-ones gates; a later forward pass of the batch tiled ``copies`` times
then skips layers < ``depth``: each returns its recorded output, tiled (or, for a pass whose rows
are chosen examples of the batch, those rows of it). Only layers >= ``depth`` and the model's head
(final norm, logits) run.

Finding the decoder layers needs no per-family code: they are the ``ModuleList`` whose i-th
entry holds the attention module with ``layer_idx == i`` for every layer. Families that pass
state between layers other than the returned hidden states would break the replay; the
ablation checks one replayed row against a full pass before trusting it
(:func:`headscore.methods.ablation.prefix_reuse_works`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..patch import is_gate_hook


def replay_tolerance(dtype: torch.dtype) -> float:
    """How far (relative and absolute) a shortcut's losses may be from the full passes' for a model of ``dtype``:
    1e-9 in float64, 1e-4 in float32, 2e-2 in 16 bits (the shortcut runs rows in other batch shapes)."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


def decoder_layers(model: torch.nn.Module, num_layers: int) -> list[torch.nn.Module] | None:
    """The model's decoder layers in order, or None when no ``ModuleList`` holds them one attention each."""
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) != num_layers:
            continue
        if all(_holds_layer(layer, i) for i, layer in enumerate(module)):
            return list(module)
    return None


def _holds_layer(layer: torch.nn.Module, index: int) -> bool:
    ids = {getattr(m, "layer_idx", None) for m in layer.modules()} - {None}
    return ids == {index}


def boundaries_to_check(layers: list[torch.nn.Module], usable: list[bool] | None = None) -> list[int]:
    """The depths d (layers < d replayed, layer d runs first) at which a check of the replay is needed to
    cover every kind of boundary in ``layers``: a pass that skips to depth d hands layer d only the recorded
    output of layer d - 1, so what could go wrong there depends on those two layers alone. Boundaries between
    two layers of the same classes without hooks behave alike: one of each kind is checked (the deepest),
    and every boundary next to a layer with a hook anywhere in it (forward or pre-forward, on the layer or a
    module inside it; a steering vector, a side channel between layers; not headscore's own gate on an output
    projection) is checked on its own. With global
    module hooks, every boundary. Only depths where ``usable`` is True are named (a pass can start only at a
    layer with a head to change)."""
    usable = [True] * len(layers) if usable is None else usable
    depths = [d for d in range(len(layers) - 1, 0, -1) if usable[d]]
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return sorted(depths)
    hooked = [any(m._forward_hooks or not all(map(is_gate_hook, m._forward_pre_hooks.values()))
                  for m in layer.modules()) for layer in layers]
    chosen, kinds = set(), set()
    for d in depths:
        if hooked[d - 1] or hooked[d]:
            chosen.add(d)
        elif (kind := (type(layers[d - 1]), type(layers[d]))) not in kinds:
            kinds.add(kind)
            chosen.add(d)
    return sorted(chosen)


def _tile(output, copies: int | torch.Tensor):
    """A copy of a layer's output with every batch-first tensor repeated ``copies`` times (row c * B + b =
    row b), or for an index tensor ``copies`` [N], its rows ``copies`` (row i = row copies[i]). Always new
    tensors, so that nothing done to them (a forward hook that changes a layer's output in place) reaches
    the recording."""
    if isinstance(output, torch.Tensor):
        if isinstance(copies, torch.Tensor):
            return output.index_select(0, copies.to(output.device))
        return output.clone() if copies == 1 else output.repeat(copies, *([1] * (output.dim() - 1)))
    if isinstance(output, (tuple, list)):
        items = [_tile(o, copies) for o in output]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    return output


class PrefixReplay:
    """Record each decoder layer's output once; replay it to skip the layers below a depth.

    Use :meth:`recording` around the forward pass that runs with every gate at 1, then
    :meth:`skipping` around each pass whose rows change no gate below ``depth``.
    """

    def __init__(self, layers: list[torch.nn.Module]):
        self.layers = layers
        self.outputs: list | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Keep every decoder layer's output of the forward pass run inside the block, as its ``forward``
        returned it: a copy taken before any other forward hook of the layer runs. A replayed layer's
        ``forward`` returns that copy and its hooks run on it as in a full pass (a hook that adds a steering
        vector to a layer's output adds it once, whether the layer runs or is replayed)."""
        outputs: list = [None] * len(self.layers)

        def keep(i):
            def hook(module, args, output):
                outputs[i] = _tile(output, 1)
            return hook

        handles = [layer.register_forward_hook(keep(i), prepend=True) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if any(o is None for o in outputs):
            raise RuntimeError("a decoder layer did not run in the recorded pass")
        self.outputs = outputs

    @contextlib.contextmanager
    def skipping(self, depth: int, copies: int | torch.Tensor) -> Iterator[None]:
        """Inside the block, layers < ``depth`` do no work: each returns its recorded output tiled ``copies``
        times, or its rows ``copies`` (an index tensor [N] into the recorded batch, for a pass of rows chosen
        with ``Batch.select``): a copy, not a computation, so whatever the model does between layers (forward
        hooks on a layer included) sees what it would."""
        if self.outputs is None:
            raise RuntimeError("PrefixReplay.skipping before a recorded pass")
        depth = min(depth, len(self.layers))
        if depth <= 0:
            yield
            return
        saved = [(layer, layer.__dict__.get("forward")) for layer in self.layers[:depth]]

        def replay(output):
            return lambda *args, **kwargs: _tile(output, copies)

        for (layer, _), output in zip(saved, self.outputs, strict=False):
            layer.forward = replay(output)
        try:
            yield
        finally:
            for layer, previous in saved:
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous
