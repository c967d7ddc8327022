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
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import compat
from .errors import UnsupportedModelError
from .gate import apply_gate

_counter = itertools.count()

Observer = Callable[[int, torch.Tensor], None]
"""Called as ``observer(layer_idx, out)`` with each layer's pre-gate attention output [B, T, H, D]."""


@dataclass(frozen=True)
class HeadLayout:
    """How many layers, heads per layer and head dimensions a model has.

    ``head_dim`` is the widest head; ``head_dims`` has each layer's own width where they differ (per-layer
    configs, e.g. Gemma 4's wider global layers), else None. A baseline is [L, H, head_dim], each layer's
    narrower heads taking the first entries.
    """

    num_layers: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    head_dims: tuple[int, ...] | None = None

    def dim_of(self, layer: int) -> int:
        """The width of layer ``layer``'s heads."""
        return self.head_dim if self.head_dims is None else self.head_dims[layer]


def _value_head_dim(config, heads: int) -> int:
    # a head's output is as wide as its values: multi-head latent attention (DeepSeek-V3) has v_head_dim
    # apart from the query/key head_dim
    return int(getattr(config, "v_head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads)


def head_layout(model: torch.nn.Module) -> HeadLayout:
    """Read the attention layout of a transformers model from its (text) config (``head_dim`` is the width
    of a head's output, the value head dim where it differs from the query/key one). A heterogeneous config
    (per-layer attributes) is read layer by layer; per-layer head counts raise UnsupportedModelError."""
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
    per_layer = getattr(text, "num_attention_heads_per_layer", None)  # Laguna's per-layer head counts
    if per_layer:
        if len(set(per_layer)) > 1:
            raise UnsupportedModelError(
                f"{type(model).__name__} has a different number of attention heads per layer "
                f"({sorted(set(per_layer))}); headscore's gates and maps are layers x heads")
        heads = int(per_layer[0])
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return HeadLayout(layers, heads, _value_head_dim(text, heads), int(kv_heads))


def _per_layer_layout(model: torch.nn.Module, text) -> HeadLayout:
    layers = [text.per_layer_config[i] for i in range(int(text.num_hidden_layers))]
    heads = [int(c.num_attention_heads) for c in layers]
    if len(set(heads)) > 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} has a different number of attention heads per layer ({sorted(set(heads))}); "
            "headscore's gates and maps are layers x heads")
    dims = tuple(_value_head_dim(c, heads[0]) for c in layers)
    kv = max(int(getattr(c, "num_key_value_heads", None) or heads[0]) for c in layers)
    return HeadLayout(len(layers), heads[0], max(dims), kv, dims if len(set(dims)) > 1 else None)


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
    """

    layout: HeadLayout
    gates: torch.Tensor | None = None
    baseline: torch.Tensor | None = None
    observers: list[Observer] = field(default_factory=list)
    kernel_calls: int = 0

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
    def observing(self, observer: Observer) -> Iterator[None]:
        """Temporarily add an observer of the pre-gate head outputs."""
        self.observers.append(observer)
        try:
            yield
        finally:
            self.observers.remove(observer)

    def _apply(self, layer_idx: int | None, out: torch.Tensor) -> torch.Tensor:
        if layer_idx is None:
            raise UnsupportedModelError("an attention module has no layer_idx; headscore cannot tell layers apart")
        for observer in self.observers:
            observer(layer_idx, out)
        if self.gates is None:
            return out
        g = self.gates[:, layer_idx]
        if out.shape[-2] != self.layout.num_heads:
            raise UnsupportedModelError(
                f"layer {layer_idx}'s attention outputs {out.shape[-2]} heads x {out.shape[-1]}, the config says "
                f"{self.layout.num_heads} x {self.layout.dim_of(layer_idx)}; headscore reads the head layout from "
                "the config")
        if g.shape[0] not in (1, out.shape[0]):
            raise ValueError(f"gates have {g.shape[0]} rows but the batch has {out.shape[0]}")
        m = None if self.baseline is None else self.baseline[layer_idx]
        if m is not None and self.layout.head_dims is not None:
            m = m[..., :out.shape[-1]]  # per-layer head widths: the baseline is padded to the widest
        if m is not None and m.dim() == 4 and m.shape[0] != out.shape[0]:
            if out.shape[0] % m.shape[0]:
                raise ValueError(f"a per-example baseline of {m.shape[0]} rows for a batch of {out.shape[0]}")
            m = m.repeat(out.shape[0] // m.shape[0], 1, 1, 1)
        return apply_gate(out, g.to(out.device), None if m is None else m.to(out.device))


def _check_patchable(model: torch.nn.Module) -> str:
    compat.check_transformers()
    name = type(model).__name__
    if not compat.can_route_attention(model):
        raise UnsupportedModelError(
            f"{name} does not route attention through transformers' AttentionInterface, so headscore "
            "cannot gate its heads")
    current = compat.attention_implementation(model)
    if current is None:
        raise UnsupportedModelError(f"{name} has no attention implementation set in its config")
    return current


@contextlib.contextmanager
def patch(model: torch.nn.Module, *, freeze: bool = True, kernel: bool | None = None) -> Iterator[HeadGates]:
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

    Yields:
        A :class:`HeadGates` whose ``gates`` [B, L, H] and ``baseline`` [L, H, D] control
        the heads. With ``gates=None`` the model computes exactly what it did before.

    On exit (also after an exception) the model's attention implementation, the
    registries and the parameters' ``requires_grad`` flags are as they were.
    """
    from .kernels import dispatch  # imports triton (about 0.4 s): only once a model is patched

    original = _check_patchable(model)
    state = HeadGates(head_layout(model))
    inner = compat.attention_function(original)

    def gated_attention(module, query, key, value, attention_mask, *args, **kwargs):
        if not args:
            out = dispatch.fused_gated_attention(module, query, key, value, attention_mask, gates=state.gates,
                                                 baseline=state.baseline, wanted=kernel,
                                                 observed=bool(state.observers), **kwargs)
            if out is not None:
                state.kernel_calls += 1
                return out, None
        out, weights = inner(module, query, key, value, attention_mask, *args, **kwargs)
        return state._apply(getattr(module, "layer_idx", None), out), weights

    key = f"headscore_gated_{next(_counter)}"
    compat.register_attention(key, gated_attention, masks_like=original)
    entry = _ActivePatch(key, original, [(p, p.requires_grad) for p in model.parameters()])
    stack: list[_ActivePatch] = model.__dict__.setdefault(_STACK_ATTR, [])
    stack.append(entry)
    try:
        model.set_attn_implementation(key)
        if freeze:
            for p, _ in entry.flags:
                p.requires_grad_(False)
        yield state
    finally:
        _exit_patch(model, stack, entry)
        compat.unregister_attention(key)


_STACK_ATTR = "_headscore_active_patches"


@dataclass
class _ActivePatch:
    """One ``patch()`` block on a model: its registry key, and what its exit restores."""

    key: str
    original: str
    flags: list[tuple[torch.nn.Parameter, bool]]


def _exit_patch(model: torch.nn.Module, stack: list[_ActivePatch], entry: _ActivePatch) -> None:
    """Undo one patch. Blocks on one model may end in any order: one that ends while a later one is
    still open leaves the model to it, handing over what it would have restored (the later block
    keeps working, since it calls this block's attention function directly, and its exit then
    restores the model as it was before both)."""
    i = stack.index(entry)
    del stack[i]
    if i < len(stack):
        stack[i].original, stack[i].flags = entry.original, entry.flags
        return
    if not stack:
        model.__dict__.pop(_STACK_ATTR, None)
    for p, flag in entry.flags:
        p.requires_grad_(flag)
    with contextlib.suppress(Exception):
        model.set_attn_implementation(entry.original)
    if compat.attention_implementation(model) != entry.original:  # a change we could not undo via the API
        compat.force_attention_implementation(model, entry.original)
