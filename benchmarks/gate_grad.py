"""Gate gradient for the unfused path: dL/dg[b, h] = sum_t < o[b, t, h, :] - m[h, :], dy[b, t, h, :] >.

``o`` and ``dy`` are [B, T, H, D]: the attention output in the layout it has just before the heads are
flattened for ``o_proj``. :func:`gate_grad` is a single-pass Triton reduction (each element of ``o`` and
``dy`` is read once, products accumulated in float32); :func:`gate_grad_torch` is the plain PyTorch
expression.

Not part of the package: the gate that runs (``headscore.gate``) computes its gradient with einsum, and
the fused attention kernel (``headscore.kernels.gated_attention``) gets it from its backward's
preprocessing pass. This kernel stays here for ``bench_gated_attention.py``, which measures it against
the PyTorch expression on a GPU (see benchmarks/RESULTS.md), and for its tests
(``tests/kernels/test_gate_grad.py``).
"""

import torch

from headscore.kernels._compat import alloc, block_d, check_device, is_interpreted, require_triton, tl, triton

__all__ = ["gate_grad", "gate_grad_torch"]

_INTERP_BLOCK_T = 32


@triton.jit
def _gate_grad_kernel(
    Att, DY, Base, Part,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_yb, stride_yt, stride_yh, stride_yd,
    H, T, ROWS_PER_PROG, NUM_SPLIT,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_BASE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_t0 = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    t_begin = pid_s * ROWS_PER_PROG
    t_end = tl.minimum(t_begin + ROWS_PER_PROG, T)
    o_base = Att + b * stride_ob + h * stride_oh
    y_base = DY + b * stride_yb + h * stride_yh
    if HAS_BASE:
        base = tl.load(Base + h * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for start in range(t_begin, t_end, BLOCK_T):
        offs_t = start + offs_t0
        msk = (offs_t < t_end)[:, None] & d_ok[None, :]
        o = tl.load(o_base + offs_t[:, None].to(tl.int64) * stride_ot + offs_d[None, :] * stride_od,
                    mask=msk, other=0.0).to(tl.float32)
        y = tl.load(y_base + offs_t[:, None].to(tl.int64) * stride_yt + offs_d[None, :] * stride_yd,
                    mask=msk, other=0.0).to(tl.float32)
        if HAS_BASE:
            o = o - base[None, :]  # masked rows: y == 0, so they add nothing
        acc += o * y
    tl.store(Part + pid_bh.to(tl.int64) * NUM_SPLIT + pid_s, tl.sum(tl.sum(acc, 1), 0))


def gate_grad_torch(o: torch.Tensor, dy: torch.Tensor, baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``einsum('bthd,bthd->bh', o - baseline, dy)`` in float32. Returns [B, H] float32."""
    centred = o.float() if baseline is None else o.float() - baseline.float()[None, None]
    return torch.einsum("bthd,bthd->bh", centred, dy.float())


def _check(o: torch.Tensor, dy: torch.Tensor, baseline: torch.Tensor | None) -> None:
    if o.dim() != 4:
        raise ValueError(f"o must be [B, T, H, D]; got shape {tuple(o.shape)}")
    if dy.shape != o.shape:
        raise ValueError(f"dy must have the shape of o {tuple(o.shape)}; got {tuple(dy.shape)}")
    if not (o.is_floating_point() and dy.is_floating_point()):
        raise ValueError("o and dy must be floating-point tensors")
    if baseline is not None and tuple(baseline.shape) != (o.shape[2], o.shape[3]):
        raise ValueError(f"baseline must be [H, D] = [{o.shape[2]}, {o.shape[3]}]; got {tuple(baseline.shape)}")


def gate_grad(o: torch.Tensor, dy: torch.Tensor, baseline: torch.Tensor | None = None, *,
              num_splits: int | None = None) -> torch.Tensor:
    """Single-pass Triton reduction: ``sum_t <o[b, t, h] - baseline[h], dy[b, t, h]>`` -> [B, H] float32.

    Args:
        o, dy: [B, T, H, D], any strides, float16 / bfloat16 / float32.
        baseline: optional [H, D].
        num_splits: how many programs share the T axis of one (b, h) (default: enough to fill the GPU;
            the partial sums are added in a fixed order, so the result is deterministic).
    """
    require_triton()
    _check(o, dy, baseline)
    check_device(_gate_grad_kernel, o, dy, *(() if baseline is None else (baseline,)))
    B, T, H, D = o.shape
    if D > 1024:
        raise ValueError(f"head dim {D} too large for gate_grad (max 1024)")
    if B * H == 0:
        return torch.zeros(B, H, dtype=torch.float32, device=o.device)
    interp = is_interpreted(_gate_grad_kernel)
    width = block_d(D)
    block_t = _INTERP_BLOCK_T if interp else max(8, min(64, 8192 // width))
    n_blocks = max(1, triton.cdiv(T, block_t))
    if num_splits is None:
        if interp:
            num_splits = 1
        else:
            sms = torch.cuda.get_device_properties(o.device).multi_processor_count
            num_splits = triton.cdiv(4 * sms, B * H)
    num_splits = max(1, min(int(num_splits), n_blocks))
    rows = triton.cdiv(n_blocks, num_splits) * block_t
    num_splits = max(1, triton.cdiv(T, rows))
    part = alloc((B, H, num_splits), dtype=torch.float32, device=o.device)
    base = None if baseline is None else baseline.detach().to(torch.float32).contiguous()
    _gate_grad_kernel[(B * H, num_splits)](
        o, dy, base if base is not None else part, part,
        *o.stride(), *dy.stride(),
        H, T, rows, num_splits,
        HEAD_DIM=D, BLOCK_D=width, BLOCK_T=block_t, HAS_BASE=base is not None,
        **({} if interp else {"num_warps": 4}),
    )
    return part.sum(-1)
