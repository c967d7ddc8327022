"""The head gate as an autograd function: Y = m + g * (O - m), with dL/dg reduced in float32.

O is the attention output of one layer in the layout it has just before ``o_proj``
([B, T, H, D]); g is [B, H] (or [1, H], broadcast over rows); m is an optional
per-head baseline [H, D]. The gate gradient is

    dL/dg[b, h] = sum_t < O[b, t, h, :] - m[h, :], dY[b, t, h, :] >

accumulated in float32 whatever the dtype of O, so a bfloat16 model still gets
accurate scores.
"""

from __future__ import annotations

import torch


class _GateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, gate: torch.Tensor, baseline: torch.Tensor | None):  # type: ignore[override]
        g = gate[:, None, :, None].to(out.dtype)
        if baseline is None:
            y = out * g
        else:
            m = baseline[None, None].to(out.dtype)
            y = m + g * (out - m)
        ctx.save_for_backward(out, gate, baseline)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        out, gate, baseline = ctx.saved_tensors
        d_out = d_gate = d_base = None
        g = gate[:, None, :, None]
        if ctx.needs_input_grad[0]:
            d_out = dy * g.to(dy.dtype)
        acc = torch.promote_types(out.dtype, torch.float32)  # reduce in float32 at least
        if ctx.needs_input_grad[1]:
            centred = out.to(acc) if baseline is None else out.to(acc) - baseline[None, None].to(acc)
            d_gate = torch.einsum("bthd,bthd->bh", centred, dy.to(acc))
            if gate.shape[0] == 1 and out.shape[0] != 1:
                d_gate = d_gate.sum(0, keepdim=True)
            d_gate = d_gate.to(gate.dtype)
        if baseline is not None and ctx.needs_input_grad[2]:
            d_base = ((1.0 - g.to(acc)) * dy.to(acc)).sum((0, 1)).to(baseline.dtype)
        return d_out, d_gate, d_base


def apply_gate(out: torch.Tensor, gate: torch.Tensor, baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Gate each head of an attention output.

    Args:
        out: attention output [B, T, H, D] (the o_proj input before flattening heads).
        gate: [B, H] or [1, H]; any float dtype (float32 recommended for gradients).
        baseline: optional [H, D] value a head takes when its gate is 0 (None = zeros).

    Returns:
        ``baseline + gate * (out - baseline)`` with the shape and dtype of ``out``.
    """
    if gate.dim() != 2 or gate.shape[1] != out.shape[2] or gate.shape[0] not in (1, out.shape[0]):
        raise ValueError(f"gate must be [B, H] or [1, H] for an output of shape {tuple(out.shape)}; "
                         f"got {tuple(gate.shape)}")
    return _GateFunction.apply(out, gate, baseline)
