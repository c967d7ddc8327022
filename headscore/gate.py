"""The head gate as an autograd function: Y = m + g * (O - m), with dL/dg reduced in float32.

O is the attention output of one layer in the layout it has just before ``o_proj``
([B, T, H, D]); g is [B, H] (or [1, H], broadcast over rows), or per position [B, T, H];
m is an optional baseline, per head [H, D] or per example and position [B, T, H, D] (e.g. the
head's output on a corrupted prompt). The gate gradient is

    dL/dg[b, h] = sum_t < O[b, t, h, :] - m[..., h, :], dY[b, t, h, :] >

(for per-position gates the term of each t on its own), accumulated in float32 whatever the
dtype of O, so a bfloat16 model still gets accurate scores.

Memory: only the gate's own gradient needs O, so O is kept only when the gate requires a gradient. It is
not copied: with SDPA it is a view of the output that SDPA's backward keeps anyway (torch's SDPA kernels lay
their output out like the query, a [B, H, T, D] view of [B, T, H, D] in transformers' attention modules, so
the ``transpose(1, 2).contiguous()`` before o_proj is a view; tests/test_memory.py checks it on a model).
"""

from __future__ import annotations

import torch


def gate_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the gates (and baselines) a run feeds ``model``: float32 at least (a bfloat16 model's gates
    and baselines stay float32), float64 for a float64 model."""
    return torch.promote_types(torch.float32, next(model.parameters()).dtype)


def _gate_view(gate: torch.Tensor) -> torch.Tensor:
    """[B, H] -> [B, 1, H, 1]; per position [B, T, H] -> [B, T, H, 1]."""
    return gate[:, None, :, None] if gate.dim() == 2 else gate[..., None]


def _baseline_view(baseline: torch.Tensor) -> torch.Tensor:
    """[H, D] -> [1, 1, H, D]; [B, T, H, D] as it is."""
    return baseline[None, None] if baseline.dim() == 2 else baseline


class _GateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, gate: torch.Tensor, baseline: torch.Tensor | None):  # type: ignore[override]
        g = _gate_view(gate).to(out.dtype)
        if baseline is None:
            y = out * g
        else:
            m = _baseline_view(baseline).to(out.dtype)
            y = m + g * (out - m)
        # O is only needed for the gate's own gradient
        ctx.save_for_backward(out if ctx.needs_input_grad[1] else None, gate, baseline)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        out, gate, baseline = ctx.saved_tensors
        d_out = d_gate = d_base = None
        g = _gate_view(gate)
        if ctx.needs_input_grad[0]:
            d_out = dy * g.to(dy.dtype)
        acc = torch.promote_types(dy.dtype, torch.float32)  # reduce in float32 at least (dy has O's dtype)
        if ctx.needs_input_grad[1]:
            centred = out.to(acc) if baseline is None else out.to(acc) - _baseline_view(baseline).to(acc)
            d_gate = torch.einsum("bthd,bthd->bh" if gate.dim() == 2 else "bthd,bthd->bth", centred, dy.to(acc))
            if gate.shape[0] == 1 and dy.shape[0] != 1:
                d_gate = d_gate.sum(0, keepdim=True)
            d_gate = d_gate.to(gate.dtype)
        if baseline is not None and ctx.needs_input_grad[2]:
            d_base = ((1.0 - g.to(acc)) * dy.to(acc)).sum_to_size(_baseline_view(baseline).shape)
            d_base = d_base.view(baseline.shape).to(baseline.dtype)
        return d_out, d_gate, d_base


def apply_gate(out: torch.Tensor, gate: torch.Tensor, baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Gate each head of an attention output.

    Args:
        out: attention output [B, T, H, D] (the o_proj input before flattening heads).
        gate: [B, H] or [1, H], or per position [B, T, H] or [1, T, H]; any float dtype (float32
            recommended for gradients).
        baseline: optional value a head takes when its gate is 0: [H, D], or per example and
            position [B, T, H, D] (None = zeros).

    Returns:
        ``baseline + gate * (out - baseline)`` with the shape and dtype of ``out``.
    """
    b, t, h, d = out.shape
    if not ((gate.dim() == 2 and gate.shape[1] == h) or (gate.dim() == 3 and tuple(gate.shape[1:]) == (t, h))) \
            or gate.shape[0] not in (1, b):
        raise ValueError(f"gate must be [B, H], [1, H], [B, T, H] or [1, T, H] for an output of shape "
                         f"{tuple(out.shape)}; got {tuple(gate.shape)}")
    if baseline is not None and tuple(baseline.shape) not in ((h, d), (b, t, h, d)):
        raise ValueError(f"baseline must be [H, D] or [B, T, H, D] for an output of shape {tuple(out.shape)}; "
                         f"got {tuple(baseline.shape)}")
    return _GateFunction.apply(out, gate, baseline)
