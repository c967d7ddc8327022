"""Which attention calls the fused kernel serves, and the call itself (used by :func:`headscore.patch`).

The kernel computes causal attention with at most a key-padding mask, in float32/16 or bfloat16,
without dropout, soft-capping, sliding windows, attention sinks, position biases, sparse key selections or
packed sequences, on an Ampere or newer GPU (or the CPU's Triton interpreter), for a module that has a
``layer_idx``, with queries, keys and values of one width (at most 256) and a whole number of query heads per
key head. Any other call (and any call while observers watch the pre-gate outputs, which the kernel never
materialises) returns None, and the caller runs the model's own attention with the gate around it: results
agree either way.
"""

from __future__ import annotations

import functools

import torch

from ._compat import is_interpreted, triton_available
from .gated_attention import _gattn_fwd_kernel, gated_attention

__all__ = ["fused_gated_attention", "kernel_available", "kernel_unavailable", "key_padding_mask"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
"""The widest head the kernel serves (its blocks hold a whole head)."""
_DECLINED_KWARGS = ("softcap", "sliding_window", "s_aux", "sinks", "cu_seq_lens_q", "cu_seq_lens_k",
                    "position_bias", "indices", "block_indices")
"""Attention-function arguments that change the attention when set (soft-capping, windows, sinks, the
document boundaries of packed sequences under flash attention, an additive position bias, a sparse model's
top-k key or block selection): a call with any of them is not served."""
MIN_CAPABILITY = (8, 0)
"""The oldest GPUs the kernel's block configs are checked for (Ampere, sm_80: ``configs.py``); an older one
(a T4, sm_75, with 64 KiB of shared memory per block) has no config that fits, so it runs the model's own
attention."""


def kernel_available(device: torch.device) -> bool:
    """True where the fused Triton kernel can run: a CUDA device of compute capability :data:`MIN_CAPABILITY` or
    newer, and an importable triton."""
    return device.type == "cuda" and triton_available() and _capability(device) >= MIN_CAPABILITY


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    # asked on every attention call the patch routes here (kernel=None): once per device
    return tuple(torch.cuda.get_device_capability(device))


def kernel_unavailable(device: torch.device | str) -> str | None:
    """Why the fused kernel cannot run on ``device`` (for ``kernel=True``, checked before a model loads), or
    None where it can: a CUDA device with Triton, or the CPU under Triton's interpreter (``TRITON_INTERPRET=1``
    set before triton was first imported: slow, for tests)."""
    device = torch.device(device)
    if not triton_available():
        return "the fused kernel needs Triton, which is not installed (pip install triton)"
    if device.type == "cuda":  # without a CUDA device to ask (checked before the model loads), where it runs decides
        capability = _capability(device) if torch.cuda.is_available() else MIN_CAPABILITY
        if capability < MIN_CAPABILITY:
            return (f"the fused kernel runs on GPUs of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                    f"(Ampere) or newer; this one has {capability[0]}.{capability[1]}")
        return None
    if device.type == "cpu" and is_interpreted(_gattn_fwd_kernel):
        return None
    return (f"the fused Triton kernel needs a CUDA device, not {device.type} (on a CPU it runs only through "
            "Triton's interpreter, TRITON_INTERPRET=1 in the environment from the start: slow, for tests)")


def key_padding_mask(mask: torch.Tensor | None, q_len: int, kv_len: int) -> tuple[bool, torch.Tensor | None]:
    """Whether a transformers mask is causal + key padding, and that padding mask [B, S] (True = keep).

    The fused kernel handles exactly that case; anything else (sliding windows, packed
    sequences, custom masks) goes through the model's own attention.
    """
    if mask is None:  # transformers' causal masks are aligned top-left: without a mask only when the lengths agree
        return q_len == kv_len, None
    if not isinstance(mask, torch.Tensor):  # FlexAttention's BlockMask, say
        return False, None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or q_len != kv_len:
        return False, None
    keep = mask[:, 0, -1, :]  # the last query row sees every key that is not padding
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril()
    expected = causal[None] & keep[:, None, :]
    if not torch.equal(mask[:, 0], expected):
        return False, None
    return True, (None if bool(keep.all()) else keep)


def _is_set(value: object) -> bool:
    """Whether an attention argument is in use: a tensor (sinks, sequence boundaries), or a true number."""
    return isinstance(value, torch.Tensor) or (value is not None and bool(value))


def _served_shapes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the kernel takes these [B, H, T, D] / [B, Hkv, S, D] tensors: one dtype it has, one head width
    of at most :data:`MAX_HEAD_DIM` (no latent attention's narrower values), keys shaped like values, and a whole
    number of query heads per key head."""
    return (query.dtype in _DTYPES and query.dtype == key.dtype == value.dtype and key.shape == value.shape
            and query.dim() == 4 and key.dim() == 4 and query.shape[0] == key.shape[0]
            and query.shape[-1] == key.shape[-1] and 1 <= query.shape[-1] <= MAX_HEAD_DIM
            and key.shape[1] >= 1 and query.shape[1] % key.shape[1] == 0)


def _packed(mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> bool:
    """Whether an unmasked call carries several sequences per row (flash attention's packing: position ids that
    do not count up by one along a row)."""
    if mask is not None or not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] < 2:
        return False
    return bool((position_ids.diff(dim=-1) != 1).any())


def fused_gated_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, *, gates: torch.Tensor | None,
                          baseline: torch.Tensor | None, wanted: bool | None, observed: bool, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs) -> torch.Tensor | None:
    """The gated attention output [B, T, H, D] from the fused kernel, or None where it cannot serve the call.

    Args:
        module, query, key, value, attention_mask, dropout, scaling, kwargs: the arguments transformers
            passes an attention function (query [B, H, T, D], key/value [B, Hkv, S, D]).
        gates: the patch's gates [B or 1, L, H] (None: all ones); baseline: [L, H, D] or None.
            Per-position gates [B, L, T, H] are served when they have one value per head (as for
            scoring: all ones; the kernel then gives the gradient per position); per-token baselines
            [L, B, T, H, D] (the corrupted run) are not.
        wanted: the caller's ``kernel`` choice (None: wherever :func:`kernel_available`).
        observed: observers want the pre-gate output, which the kernel does not produce.
    """
    if wanted is None:
        wanted = kernel_available(query.device)
    if not wanted or observed or dropout or any(_is_set(kwargs.get(name)) for name in _DECLINED_KWARGS):
        return None
    if not _served_shapes(query, key, value) or _packed(attention_mask, kwargs.get("position_ids")):
        return None
    if baseline is not None and baseline.dim() != 3:
        return None
    layer = getattr(module, "layer_idx", None)
    causal = kwargs.get("is_causal")  # transformers' SDPA lets the call's own flag override the module's
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if layer is None or not (causal and query.shape[2] > 1):
        return None
    ok, padding = key_padding_mask(attention_mask, query.shape[2], key.shape[2])
    if not ok:
        return None
    b, h = query.shape[0], query.shape[1]
    gate = torch.ones(b, h, device=query.device) if gates is None else gates[:, layer]
    if gate.shape[0] not in (1, b):
        raise ValueError(f"gates have {gate.shape[0]} rows but the batch has {b}")
    if gate.dim() == 3:  # per position [B, T, H]: served when every position has its head's value
        if gate.shape[1] != query.shape[2] or not torch.equal(gate, gate[:, :1].expand_as(gate)):
            return None
        gate = gate.transpose(1, 2).expand(b, -1, -1)  # [B, H, T]: the kernel's gradient is per position
    else:
        gate = gate.expand(b, h)
    base = None if baseline is None else baseline[layer].to(query.device)
    out = gated_attention(query, key, value, gate.to(query.device), base, causal=True, key_padding_mask=padding,
                          scale=scaling)
    return out.transpose(1, 2).contiguous()
