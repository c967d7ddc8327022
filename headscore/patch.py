"""Gate every attention head of a Hugging Face causal LM through transformers' attention registry.

``patch(model)`` registers a gated attention function under a fresh name in
``AttentionInterface`` (and the mask function of the wrapped implementation under
the same name in ``AttentionMaskInterface``, without which transformers drops the
causal mask), switches the model to it, and restores everything on exit. The
gated function calls the model's own implementation (SDPA, eager, ...) and then
applies ``Y = m + g * (O - m)`` per example row and head (see ``headscore.gate``).

No per-architecture code: any model whose attention goes through the registry and
whose attention modules carry ``layer_idx`` works, grouped-query attention
included (gates are per query head).

A layer whose model multiplies the attention's output by an output gate of its own before the output
projection (Qwen3-Next, Qwen3.5, Laguna, ...) is gated at the projection's input instead, once
:func:`gate_at_projections` has named its projection (``prepare`` does, from
:func:`~headscore.separability.separability_report`): there a baseline replaces what the projection sees,
so mean ablation and activation patching are the head's.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch

from . import compat
from .errors import HeadscoreError, UnsupportedModelError
from .gate import apply_gate

_counter = itertools.count()

Observer = Callable[[int, torch.Tensor], None]
"""Called as ``observer(layer_idx, out)`` with each layer's pre-gate head outputs [B, T, H, D]: the attention's
output, or for a layer gated at its output projection (:func:`gate_at_projections`) that projection's input."""
GradientObserver = Callable[[int, torch.Tensor, torch.Tensor | None, torch.Tensor], None]
"""Called in the backward pass with (layer, pre-gate output O, the layer's baseline m or None, dL/dY)."""


@dataclass(frozen=True)
class HeadLayout:
    """How many layers, heads per layer and head dimensions a model has.

    ``num_heads`` and ``head_dim`` are the most heads of any layer and the widest head; ``heads_per_layer``
    and ``head_dims`` have each layer's own counts where layers differ (per-layer configs: Gemma 4's wider
    global heads, Dots3's or Laguna's head counts; 0 for a hybrid model's layers without attention), else
    None. Gates are [.., L, num_heads] and baselines
    [L, num_heads, head_dim]: a layer with fewer or narrower heads takes the first entries, and its absent
    heads are NaN in the maps (see :func:`mark_absent_heads`).
    """

    num_layers: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    head_dims: tuple[int, ...] | None = None
    heads_per_layer: tuple[int, ...] | None = None

    def dim_of(self, layer: int) -> int:
        """The width of layer ``layer``'s heads."""
        return self.head_dim if self.head_dims is None else self.head_dims[layer]

    def heads_of(self, layer: int) -> int:
        """How many heads layer ``layer`` has."""
        return self.num_heads if self.heads_per_layer is None else self.heads_per_layer[layer]

    @property
    def uniform(self) -> bool:
        """Whether every layer with heads has the same heads (count and width): layers without attention (a
        hybrid model's linear-attention or state-space layers, 0 heads) do not count."""
        if self.head_dims is not None:
            return False
        return self.heads_per_layer is None or set(self.heads_per_layer) <= {0, self.num_heads}

    @property
    def real_heads(self) -> int:
        """How many heads the model really has: every layer's own count (absent heads not counted)."""
        return sum(self.heads_of(layer) for layer in range(self.num_layers))

    def absent_heads(self) -> torch.Tensor:
        """[L, H] True where a layer has no such head (beyond its own count)."""
        mask = torch.zeros(self.num_layers, self.num_heads, dtype=torch.bool)
        for layer in range(self.num_layers):
            mask[layer, self.heads_of(layer):] = True
        return mask


def _value_head_dim(config, heads: int) -> int:
    # a head's output is as wide as its values: multi-head latent attention (DeepSeek-V3) has v_head_dim
    # apart from the query/key head_dim
    return int(getattr(config, "v_head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads)


def head_layout(model: torch.nn.Module) -> HeadLayout:
    """Read the attention layout of a transformers model from its (text) config (``head_dim`` is the width
    of a head's output, the value head dim where it differs from the query/key one). A heterogeneous config
    (per-layer attributes) or a per-layer head-count list is read layer by layer (see :class:`HeadLayout`);
    layers that :func:`mark_attention_layers` found without attention have 0 heads."""
    layout = _config_layout(model)
    attention = model.__dict__.get(_ATTENTION_ATTR)
    if attention is None:
        return layout
    counts = tuple(layout.heads_of(i) if i in attention else 0 for i in range(layout.num_layers))
    return replace(layout, heads_per_layer=counts)


def mark_attention_layers(model: torch.nn.Module, layers: Collection[int]) -> None:
    """Record that only ``layers`` run attention (a hybrid model: linear-attention or state-space layers between
    them): from then on :func:`head_layout` gives the other layers 0 heads, so their cells are absent (NaN) in
    every map and no ablation runs for them. Every layer (or an empty collection) forgets the record."""
    count = _config_layout(model).num_layers
    layers = {int(i) for i in layers}
    if not layers or layers >= set(range(count)):
        model.__dict__.pop(_ATTENTION_ATTR, None)
    else:
        model.__dict__[_ATTENTION_ATTR] = frozenset(layers)


_ATTENTION_ATTR = "_headscore_attention_layers"


def _config_layout(model: torch.nn.Module) -> HeadLayout:
    """The layout the config says (every layer counted as attention)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no transformers config; pass a PreTrainedModel")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "is_heterogeneous", False):
        return _per_layer_layout(model, text)
    try:
        # the decoder's counts where an encoder-decoder family's config has both (BART-style causal LMs)
        layers = int(getattr(text, "decoder_layers", None) or text.num_hidden_layers)
        heads = int(getattr(text, "decoder_attention_heads", None) or text.num_attention_heads)
    except AttributeError as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__}: config lacks num_hidden_layers/num_attention_heads") from exc
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    per_layer = getattr(text, "num_attention_heads_per_layer", None)  # Laguna's per-layer head counts
    if per_layer and len(set(per_layer)) > 1:
        counts = tuple(int(h) for h in per_layer)
        return HeadLayout(layers, max(counts), _value_head_dim(text, heads), kv_heads, heads_per_layer=counts)
    if per_layer:
        heads = int(per_layer[0])
    return HeadLayout(layers, heads, _value_head_dim(text, heads), kv_heads)


def _per_layer_layout(model: torch.nn.Module, text) -> HeadLayout:
    layers = [text.per_layer_config[i] for i in range(int(text.num_hidden_layers))]
    heads = tuple(int(c.num_attention_heads) for c in layers)
    dims = tuple(_value_head_dim(c, h) for c, h in zip(layers, heads, strict=True))
    kv = max(int(getattr(c, "num_key_value_heads", None) or h) for c, h in zip(layers, heads, strict=True))
    return HeadLayout(len(layers), max(heads), max(dims), kv, dims if len(set(dims)) > 1 else None,
                      heads if len(set(heads)) > 1 else None)


@contextlib.contextmanager
def _added(items: list, item) -> Iterator[None]:
    """``item`` in ``items`` for the duration of the block."""
    items.append(item)
    try:
        yield
    finally:
        items.remove(item)


@dataclass
class HeadGates:
    """The live gate state of a patched model.

    Attributes:
        layout: layers, heads and head dim of the model.
        gates: None (every head passes unchanged) or a float tensor [B, L, H] or [1, L, H];
            row b gates example row b of the next forward pass; or per position [B, L, T, H]
            (T = the batch's sequence length). Set it with ``requires_grad`` to get dL/dg from
            ``torch.autograd.grad``.
        baseline: None (ablation to zero), [L, H, D] (the value a head takes at gate 0), or per
            example and position [L, B0, T, H, D] (e.g. the heads' outputs on corrupted prompts);
            a batch of k * B0 rows (a tiled batch) uses it for each copy.
        observers: callables that see each layer's pre-gate output (forward pass only).
        gradient_observers: callables that see, in the backward pass, each layer's pre-gate output, its
            baseline as the gate used it and the gradient of the loss with respect to the gated output.
    """

    layout: HeadLayout
    gates: torch.Tensor | None = None
    baseline: torch.Tensor | None = None
    observers: list[Observer] = field(default_factory=list)
    gradient_observers: list[GradientObserver] = field(default_factory=list)
    kernel_calls: int = 0
    kernel_off: bool = False
    """While True (:meth:`without_kernel`), every call runs the model's own attention, wrapped."""
    layers_run: set[int] = field(default_factory=set)
    """The layers whose attention ran in some pass inside the block (see :meth:`run_layout`)."""

    def run_layout(self) -> HeadLayout:
        """:attr:`layout`, with 0 heads for each layer whose attention ran in no pass so far where passes have
        run: a hybrid model's layers without attention, found without :func:`headscore.prepare` (which marks
        them from one pass of its own, :func:`mark_attention_layers`). Unchanged before any pass, and where a
        layer index outside the layout ran."""
        layout, run = self.layout, self.layers_run
        if not run or not run <= set(range(layout.num_layers)):
            return layout
        counts = tuple(layout.heads_of(i) if i in run else 0 for i in range(layout.num_layers))
        return layout if min(counts) > 0 else replace(layout, heads_per_layer=counts)

    def ones(self, rows: int, *, device: torch.device | str | None = None, requires_grad: bool = False,
             dtype: torch.dtype = torch.float32, positions: int | None = None) -> torch.Tensor:
        """A gate tensor [rows, L, H] of ones (the unmodified model), or per position [rows, L, positions, H];
        float32 unless ``dtype`` says."""
        middle = () if positions is None else (positions,)
        g = torch.ones(rows, self.layout.num_layers, *middle, self.layout.num_heads, device=device, dtype=dtype)
        return g.requires_grad_(requires_grad)

    @contextlib.contextmanager
    def using(self, gates: torch.Tensor | None, baseline: torch.Tensor | None = None) -> Iterator[None]:
        """Temporarily set ``gates`` and ``baseline``; the previous values come back on exit."""
        previous = (self.gates, self.baseline)
        self.gates, self.baseline = gates, baseline
        try:
            yield
        finally:
            self.gates, self.baseline = previous

    @contextlib.contextmanager
    def without_kernel(self) -> Iterator[None]:
        """Run the model's own attention (wrapped) even where the fused kernel could serve the call: for passes
        whose losses are compared with passes the kernel does not serve (cached tokens, observed runs), so
        that both round alike."""
        previous, self.kernel_off = self.kernel_off, True
        try:
            yield
        finally:
            self.kernel_off = previous

    def observing(self, observer: Observer) -> contextlib.AbstractContextManager[None]:
        """Temporarily add an observer of the pre-gate head outputs."""
        return _added(self.observers, observer)

    def observing_gradients(self, observer: GradientObserver) -> contextlib.AbstractContextManager[None]:
        """Temporarily add an observer of each layer's gated-output gradient (see ``gradient_observers``)."""
        return _added(self.gradient_observers, observer)

    def _apply(self, layer_idx: int | None, out: torch.Tensor) -> torch.Tensor:
        if layer_idx is None:
            raise UnsupportedModelError("an attention module has no layer_idx; headscore cannot tell layers apart")
        for observer in self.observers:
            observer(layer_idx, out)
        if self.gates is None:
            return out
        g = self.gates[:, layer_idx]
        layout = self.layout
        if out.shape[-2] != layout.heads_of(layer_idx):
            raise UnsupportedModelError(
                f"layer {layer_idx}'s attention outputs {out.shape[-2]} heads x {out.shape[-1]}, the config says "
                f"{layout.heads_of(layer_idx)} x {layout.dim_of(layer_idx)}; headscore reads the head layout from "
                "the config")
        if layout.heads_per_layer is not None:
            g = g[..., :out.shape[-2]]  # a layer with fewer heads: the first gates of the row
        if g.shape[0] not in (1, out.shape[0]):
            raise ValueError(f"gates have {g.shape[0]} rows but the batch has {out.shape[0]}")
        m = None if self.baseline is None else self.baseline[layer_idx]
        if m is not None and not layout.uniform:
            m = m[..., :out.shape[-2], :out.shape[-1]]  # per-layer heads: the baseline is padded to the largest
        if m is not None and m.dim() == 4 and m.shape[0] != out.shape[0]:
            if out.shape[0] % m.shape[0]:
                raise ValueError(f"a per-example baseline of {m.shape[0]} rows for a batch of {out.shape[0]}")
            m = m.repeat(out.shape[0] // m.shape[0], 1, 1, 1)
        m = None if m is None else m.to(out.device)
        y = apply_gate(out, g.to(out.device), m)
        if self.gradient_observers and y.requires_grad:
            kept = out.detach()
            for observer in self.gradient_observers:
                y.register_hook(lambda dy, observer=observer: observer(layer_idx, kept, m, dy))
        return y


def gate_at_projections(model: torch.nn.Module, projections: Mapping[int, str]) -> None:
    """From the next :func:`patch` on, gate layer ``l``'s heads at the input of the module named
    ``projections[l]`` (its output projection, fed ``heads x head_dim`` features) instead of at its attention's
    output: for layers whose model scales each head's attention output by an output gate of its own before that
    projection. Zero ablation and the gradients are the same either way; a baseline (mean, corrupted run) must
    replace what the projection sees. An empty mapping gates every layer at its attention's output."""
    if projections:
        model.__dict__[_PROJECTION_ATTR] = dict(projections)
    else:
        model.__dict__.pop(_PROJECTION_ATTR, None)


def gated_at_projections(model: torch.nn.Module) -> dict[int, str]:
    """The layers :func:`gate_at_projections` moved to their output projection's input, with its name."""
    return dict(model.__dict__.get(_PROJECTION_ATTR, {}))


_PROJECTION_ATTR = "_headscore_gated_at_projection"


@contextlib.contextmanager
def _gating_projection_inputs(model: torch.nn.Module, state: HeadGates, projections: dict[int, str]
                              ) -> Iterator[None]:
    """Forward pre-hooks that gate each named projection's input [.., H * D] as layer ``l``'s heads."""
    modules = dict(model.named_modules())
    missing = sorted(name for name in projections.values() if name not in modules)
    if missing:
        raise UnsupportedModelError(f"{type(model).__name__} has no module {missing[0]} to gate the heads at")
    handles = [modules[name].register_forward_pre_hook(functools.partial(_gate_projection_input, state, name, layer))
               for layer, name in projections.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _gate_projection_input(state: HeadGates, name: str, layer: int, module: torch.nn.Module, args: tuple) -> tuple:
    """The forward pre-hook on layer ``layer``'s output projection ``name``: its input [.., H * D] gated as the
    layer's heads (see :func:`is_gate_hook`)."""
    heads, width = state.layout.heads_of(layer), state.layout.dim_of(layer)
    if not args or args[0].shape[-1] != heads * width:
        raise UnsupportedModelError(f"layer {layer}'s output projection {name} did not get {heads} x {width} head "
                                    "features as its first argument")
    x = args[0]
    return (state._apply(layer, x.unflatten(-1, (heads, width))).flatten(-2), *args[1:])


def is_gate_hook(hook: object) -> bool:
    """Whether a module hook is the head gate :func:`patch` put on an output projection (not the model's own,
    nor a user's: prefix reuse checks the layers those sit in)."""
    return isinstance(hook, functools.partial) and hook.func is _gate_projection_input


def mark_absent_heads(values: torch.Tensor, layout: HeadLayout) -> torch.Tensor:
    """``values`` [..., L, H] with NaN where a layer has no such head (a per-layer head count); unchanged
    for a model whose layers all have every head."""
    if layout.heads_per_layer is None:
        return values
    return values.masked_fill(layout.absent_heads().to(values.device), float("nan"))


def _check_patchable(model: torch.nn.Module) -> str:
    compat.check_transformers()
    name = type(model).__name__
    if not compat.can_route_attention(model):
        inner = getattr(model, "module", None)  # DistributedDataParallel, DataParallel, FSDP's wrapper
        hint = (f"; it wraps a {type(inner).__name__}: pass that (model.module)"
                if isinstance(inner, torch.nn.Module) and compat.can_route_attention(inner) else "")
        raise UnsupportedModelError(
            f"{name} does not route attention through transformers' AttentionInterface, so headscore "
            f"cannot gate its heads{hint}")
    current = compat.attention_implementation(model)
    if current is None:
        raise UnsupportedModelError(f"{name} has no attention implementation set in its config")
    return current


@contextlib.contextmanager
def patch(model: torch.nn.Module, *, freeze: bool = True, kernel: bool | None = None,
          training: bool = False) -> Iterator[HeadGates]:
    """Gate every attention head of ``model`` for the duration of the ``with`` block.

    Args:
        model: a transformers causal LM (any family whose attention uses the registry).
        freeze: set ``requires_grad=False`` on every parameter inside the block, so a
            backward pass computes no weight gradients (restored on exit).
        kernel: use the fused Triton gated-attention kernel (``headscore.kernels``), which
            computes the gate gradient inside flash attention's backward pass. ``None``
            (default) uses it on CUDA devices when triton is installed; ``True`` forces it
            (on a CPU only through the Triton interpreter, ``TRITON_INTERPRET=1``: slow, for
            tests); ``False`` always wraps the model's own attention. Calls the kernel
            cannot serve (dropout, soft-capping, sliding windows, custom masks, observers)
            fall back to the wrapper; results agree either way.
        training: leave the model's modules in the mode they are in (:func:`headscore.track`, whose passes are
            the user's training steps). By default the model runs in evaluation mode inside the block (no
            dropout, no activation checkpointing: a model straight from a training loop scores as it
            predicts), and each module's mode is restored on exit.

    Yields:
        A :class:`HeadGates` whose ``gates`` [B, L, H] and ``baseline`` [L, H, D] control
        the heads. With ``gates=None`` the model computes what it did before: exactly, where the fused kernel
        does not serve the call (``kernel=False``, a CPU, :meth:`HeadGates.without_kernel`), else up to the
        kernel's rounding (its attention, not the model's; in float32 about 1e-6). One exception: GPT-2 with
        ``reorder_and_upcast_attn`` upcasts its attention only under the name ``eager``, so patched it rounds
        as without that option (float32 about 4e-6; bfloat16 about 1e-2 of the logits).

    On exit (also after an exception) the model's attention implementation (each tower's, in a multimodal
    model), the registries, the parameters' ``requires_grad`` flags (with ``freeze``) and the modules'
    training modes (without ``training``) are as they were. Blocks may nest and end in any order, also on
    models that share one config (a causal LM and its inner ``.model``); a block that ends first gives back at
    once the flags and modes a still-open block did not ask for (a ``track`` block keeps training). A
    multimodal model and its own language model cannot be patched at once (each would switch the other's
    tower): the second block is refused. Only the attention modules the model had when the block began are
    gated: another model that shares the config, or a copy made inside the block, runs ungated, with a
    warning. A copy keeps the block's implementation name, which after the block runs the model's own
    implementation, ungated (the name is reused by later blocks, so the registry does not grow).

    ``patch`` does not check that the model's heads can be gated apart (``headscore.prepare`` and every entry
    point do, once per model, with :func:`headscore.separability.separability_report`): on a model whose heads
    are mixed before the output projection, or whose attention runs twice per layer, the gates do not act on
    single heads. Run the backward pass of a gated forward pass inside :meth:`HeadGates.using`.

    A model with an output gate of its own after attention (Qwen3-Next, Qwen3.5, Laguna, ...) is gated at its
    output projections' input once :func:`headscore.prepare` has seen it (:func:`gate_at_projections`); before
    that, at the attention's output, where gradients and zero ablation are the same but a ``baseline`` would be
    scaled by the model's gate. Likewise a hybrid model's layers without attention have heads in the layout
    (never gated, so 0 in any map) until ``prepare`` has marked them (:func:`mark_attention_layers`).
    """
    from .kernels import dispatch  # imports triton (about 0.4 s): only once a model is patched

    original = _check_patchable(model)
    if kernel:
        param = next(model.parameters(), None)
        why = dispatch.kernel_unavailable(param.device if param is not None else "cpu")
        if why:
            raise HeadscoreError(f"kernel=True: {why}")
    towers = compat.sub_config_implementations(model)
    tree = {id(model.config), *(id(config) for config, _ in towers)}
    if any(other != id(model.config) and tree & _tree_of(other, blocks) for other, blocks in _STACKS.items()):
        raise HeadscoreError("a patch() block is open on a model whose config shares a tower with this one's (a "
                             "multimodal model and its language model): patch one of them at a time")
    state = HeadGates(head_layout(model))
    wrapped = _text_implementation(model, original)
    inner = compat.attention_function(wrapped)
    at_projection = gated_at_projections(model)
    own = {id(module) for module in model.modules()}
    strangers: list[str] = []

    def gated_attention(module, query, key, value, attention_mask, *args, **kwargs):
        attention_mask, kwargs = _sparse_indices_as_mask(wrapped, query, key, attention_mask, kwargs)
        if id(module) not in own:  # another model that shares this config, or a copy: not ours to gate
            if not strangers and getattr(module, "layer_idx", None) is not None:
                strangers.append(type(module).__name__)
                warnings.warn(f"headscore.patch: an attention module ({strangers[0]}) that was not in the patched "
                              "model when the block began runs ungated (a copy made, or a module added, inside the "
                              "block; or another model that shares the config)", RuntimeWarning, stacklevel=2)
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        state.layers_run.add(getattr(module, "layer_idx", None))
        if getattr(module, "layer_idx", None) in at_projection:  # gated at its output projection's input
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        if not args and state.layout.uniform and not state.kernel_off:  # one head count and width for every layer
            out = dispatch.fused_gated_attention(module, query, key, value, attention_mask, gates=state.gates,
                                                 baseline=state.baseline, wanted=kernel,
                                                 observed=bool(state.observers or state.gradient_observers), **kwargs)
            if out is not None:
                state.kernel_calls += 1
                return out, None
        out, weights = inner(module, query, key, value, attention_mask, *args, **kwargs)
        return state._apply(getattr(module, "layer_idx", None), out), weights

    root = _ROOTS.get(wrapped, wrapped)
    key = _FREE_KEYS[root].pop() if _FREE_KEYS.get(root) else f"headscore_gated_{next(_counter)}"
    _ROOTS[key] = root
    compat.register_attention(key, gated_attention, masks_like=wrapped)
    entry = _ActivePatch(key, original, towers,
                         [(p, p.requires_grad) for p in model.parameters()] if freeze else None,
                         None if training else [(m, m.training) for m in model.modules()])
    stack = _STACKS.setdefault(id(model.config), [])
    stack.append(entry)
    try:
        model.set_attn_implementation(key)
        for p, _ in entry.flags or ():
            p.requires_grad_(False)
        if not training:
            model.eval()
        with _gating_projection_inputs(model, state, at_projection):
            yield state
    finally:
        _exit_patch(model, stack, entry)
        _retire(key, root)


_STACKS: dict[int, list[_ActivePatch]] = {}
"""The open ``patch()`` blocks per config (by identity: configs are not hashable), oldest first. Keyed by the
config, not the module: the implementation name they switch lives in the config, which a causal LM shares with
its inner ``.model`` (and two models built from one config object share)."""


_ROOTS: dict[str, str] = {}
"""Each patch key's root: the model's own implementation (``sdpa``, ``eager``, ...) its gated function wraps, at
the end of a chain of nested blocks' keys."""
_FREE_KEYS: dict[str, list[str]] = {}
"""Keys of ended blocks, per root, for the next block on that root to take (the registry stays as large as the
most blocks ever open at once)."""


def _retire(key: str, root: str) -> None:
    """After a block: ``key`` runs its root implementation, ungated, for a model that still names it (a copy made
    inside the block: ``copy.deepcopy`` copies the config's implementation name; it failed on every forward pass
    once the key was gone), and goes to :data:`_FREE_KEYS`. A later block that takes the key gates only its own
    model's modules and runs any other (such a copy) through its root implementation, ungated."""
    inner = compat.attention_function(root)

    def ungated(module, query, key_states, value, attention_mask, *args, **kwargs):
        attention_mask, kwargs = _sparse_indices_as_mask(root, query, key_states, attention_mask, kwargs)
        return inner(module, query, key_states, value, attention_mask, *args, **kwargs)

    compat.register_attention(key, ungated, masks_like=root)
    _FREE_KEYS.setdefault(root, []).append(key)


def _tree_of(config_id: int, blocks: list[_ActivePatch]) -> set[int]:
    """The identities of a config with open ``blocks`` and of its sub-configs (towers, as its blocks recorded
    them): a block on a model whose tree overlaps another's (a multimodal model and its language model) is
    refused, since each would switch and restore the other's tower."""
    return {config_id, *(id(config) for block in blocks for config, _ in block.towers)}


def _text_implementation(model: torch.nn.Module, original: str) -> str:
    """The implementation the gated function wraps: the language tower's own where a multimodal model's towers
    hold different ones (its top config's name is another tower's), else ``original``."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = getattr(text, "_attn_implementation_internal", None) if text is not config else None
    return name if isinstance(name, str) and name else original


@dataclass
class _ActivePatch:
    """One ``patch()`` block: its registry key, and what its exit restores (None: what it did not change)."""

    key: str
    original: str
    towers: list[tuple[object, str | None]]
    flags: list[tuple[torch.nn.Parameter, bool]] | None
    modes: list[tuple[torch.nn.Module, bool]] | None


def _exit_patch(model: torch.nn.Module, stack: list[_ActivePatch], entry: _ActivePatch) -> None:
    """Undo one patch. Blocks on one config may end in any order: one that ends while a later one is
    still open leaves the model to it, handing over what it would have restored (the later block
    keeps working, since it calls this block's attention function directly, and its exit then
    restores the model as it was before both)."""
    i = stack.index(entry)
    del stack[i]
    if i < len(stack):
        later = stack[i]
        later.original, later.towers = entry.original, _merged(entry.towers, later.towers)
        # what the later block asked for too, it restores at its exit; what it did not ask for (a track block after
        # a frozen, evaluating one) goes back now, as the later block expects to find it
        if entry.flags is not None and later.flags is None:
            _restore(entry.flags, None)
        else:
            later.flags = _merged(entry.flags, later.flags)
        if entry.modes is not None and later.modes is None:
            _restore(None, entry.modes)
        else:
            later.modes = _merged(entry.modes, later.modes)
        return
    if not stack:
        _STACKS.pop(id(model.config), None)
    _restore(entry.flags, entry.modes)
    with contextlib.suppress(Exception):
        model.set_attn_implementation(entry.original)
    if compat.attention_implementation(model) != entry.original:  # a change we could not undo via the API
        compat.force_attention_implementation(model, entry.original)
    compat.restore_sub_config_implementations(entry.towers)


def _merged(first: list | None, later: list | None) -> list | None:
    """Records of (object, value) from an earlier block (the state before both, for its objects) and a later one
    (for the objects only it recorded: a causal LM's head when the earlier block patched its inner model)."""
    if first is None or later is None:
        return first if later is None else later
    seen = {id(item) for item, _ in first}
    return first + [(item, value) for item, value in later if id(item) not in seen]


def _restore(flags: list[tuple[torch.nn.Parameter, bool]] | None,
             modes: list[tuple[torch.nn.Module, bool]] | None) -> None:
    for p, flag in flags or ():
        p.requires_grad_(flag)
    for module, mode in modes or ():
        module.training = mode


_NAMED_SPARSE = ("eager", "sdpa")
"""The implementations under whose names a sparse-attention model (DeepSeek-V3.2's indexer, GLM-MoE-DSA, ...)
folds its top-k key selection into the attention mask itself; under any other name (a patch's key) it passes
the selection as ``indices=`` for the attention function to apply, which eager and SDPA ignore."""


def _sparse_indices_as_mask(original: str, query: torch.Tensor, key: torch.Tensor,
                            attention_mask: torch.Tensor | None, kwargs: dict) -> tuple[torch.Tensor | None, dict]:
    """The mask and arguments the model would have passed under its own implementation's name: top-k key
    ``indices`` [B, S, k] folded into the mask as those models do it (keys not selected masked out). Block-sparse
    ``block_indices`` (MiniMax-M3-VL) have no generic form and are refused."""
    if original not in _NAMED_SPARSE:
        return attention_mask, kwargs
    if isinstance(kwargs.get("block_indices"), torch.Tensor):
        raise UnsupportedModelError("this model selects key blocks (block_indices) only under the names eager and "
                                    "sdpa, which a patched model does not have; headscore cannot gate it")
    indices = kwargs.get("indices")
    if not isinstance(indices, torch.Tensor):
        return attention_mask, kwargs
    if attention_mask is None:
        raise UnsupportedModelError("top-k sparse attention (indices=) without an attention mask to fold it into")
    unselected = (torch.ones(*indices.shape[:2], key.shape[-2], dtype=torch.bool, device=indices.device)
                  .scatter(-1, indices.long(), False).unsqueeze(1))
    if attention_mask.dtype == torch.bool:
        attention_mask = attention_mask & ~unselected
    else:
        attention_mask = attention_mask.masked_fill(unselected, torch.finfo(query.dtype).min)
    return attention_mask, {**kwargs, "indices": None}
