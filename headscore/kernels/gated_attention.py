"""Fused gated attention: flash-attention forward/backward with a per-head output gate.

    A   = softmax(q k^T * scale) v                          (per query head; online softmax)
    out = m + g * (A - m)                                   (g: [B, Hq] gate, m: [Hq, D] baseline or 0)

Memory: the forward keeps what flash attention keeps, q, k, v, out and the log-sum-exp lse, plus the
[B, Hq] gate (and the [Hq, D] baseline); out is written [B, T, Hq, D], the layout o_proj reads, so the
caller's ``out.transpose(1, 2).contiguous()`` is a view of the same tensor. A is never stored.

Backward (flash-attention-2 style), with dA = g * dOut:

    preprocess (one read of dOut, and of out or a recomputation of A, per query block):
        A          = out where g == 1 (scoring); elsewhere sum_n P_n V_n, P recomputed from q, k and lse
        Delta[t]   = rowsum(dA * A)[t] = g * <A_t, dOut_t>
        dgate[b,h] = sum_t <A_t - m, dOut_t>                  (float32, per-block partials, summed)
        dgate[b,h,t] = <A_t - m, dOut_t>                      (per position: the terms, written out)
        dbase[h]   = sum_{b,t} (1 - g[b,h]) * dOut_t          (only when the baseline needs a gradient)
    dK, dV by key block (looping over the query heads of a GQA group, so no atomics),
    dQ by query block, recomputing P = exp2(q k^T * scale * log2(e) - lse).

Masking conventions
-------------------
* ``causal=True`` with T queries and S keys is *bottom-right aligned* (as transformers / SDPA with a
  KV cache): query i attends to key j iff ``j <= i + (S - T)``. With T == S this is the usual causal mask.
  With T > S the first ``T - S`` query rows attend to nothing.
* ``key_padding_mask`` [B, S] bool, True = keep. Works for left and right padding.
* A query row with no allowed key at all gives A = 0 (so out = m + g * (0 - m)), never NaN, and
  contributes zero to dq/dk/dv.

The layout follows the Triton fused-attention tutorial and Liger-Kernel ops files: @triton.jit kernels,
small launchers picking block sizes and grids, one autograd.Function and a functional wrapper.
Under ``TRITON_INTERPRET=1`` (CPU) a single small block configuration is used; on a GPU the forward,
dK/dV and dQ kernels are autotuned over the configs of ``headscore.kernels.configs``, each of which was
compiled for the target without spills (``python -m headscore.kernels.resources``).
"""

import contextlib
import math
from collections.abc import Iterator

import torch

from ._compat import alloc, block_d, check_device, is_interpreted, next_pow2, require_triton, tl, triton
from .configs import all_configs, kept

__all__ = ["gated_attention"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Block sizes used under the interpreter (fewer, bigger numpy ops are faster there; 32 keeps several
# blocks in the short sequences the tests use).
_INTERP_BLOCK_M = 32
_INTERP_BLOCK_N = 32



# ----------------------------------------------------------------------------------------------------
# Helpers. EMU_BF16 is only ever True under the CPU interpreter with bfloat16 inputs: the interpreter
# keeps bf16 as raw uint16 (so tl.dot on it is wrong) and truncates float32 -> bf16 casts instead of
# rounding to nearest even. There, dots are done on exactly-upcast float32 operands and casts round in
# integer arithmetic, which is what the GPU does natively.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    if EMU_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _cast(x, DTYPE: tl.constexpr, EMU_BF16: tl.constexpr):
    if EMU_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even at bit 16
        return bits.to(tl.float32, bitcast=True).to(DTYPE)  # exact now
    else:
        return x.to(DTYPE)


@triton.jit
def _allowed(offs_m, m_ok, cols, n_ok, shift, MaskRow, stride_ms, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """[M, N] True where query row offs_m may attend key cols (in range, causal, not padding)."""
    allow = n_ok[None, :] & m_ok[:, None]
    if CAUSAL:
        allow = allow & (cols[None, :] <= offs_m[:, None] + shift)
    if HAS_MASK:
        keep = tl.load(MaskRow + cols * stride_ms, mask=n_ok, other=0)
        allow = allow & (keep[None, :] != 0)
    return allow


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _gattn_fwd_kernel(
    Q, K, V, Gate, Base, Mask, Out, Lse,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_ms,
    H, T, S, GROUP, qk_scale,
    T_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BASE: tl.constexpr,
    DOT_PREC: tl.constexpr, EMU_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < T

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    shift = S - T  # bottom-right causal alignment
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + shift)
    else:
        hi = S
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < S
        kt = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = _dot(q, kt, DOT_PREC, EMU_BF16) * qk_scale
        allow = _allowed(offs_m, m_ok, cols, n_ok, shift, Mask + b * stride_mb, stride_ms, CAUSAL, HAS_MASK)
        qk = tl.where(allow, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # rows that have seen no allowed key yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, EMU_BF16), v, DOT_PREC, EMU_BF16)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    a = acc / l_safe[:, None]  # rows without keys: acc == 0 -> a == 0
    # lse in log2 units; +inf for rows without keys makes the backward's recomputed P exactly 0
    lse = tl.where(has_key, m_i + tl.math.log2(l_safe), float("inf"))

    g = tl.load(Gate + b * H + h)
    if HAS_BASE:
        base = tl.load(Base + h * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        out = base[None, :] + g * (a - base[None, :])
    else:
        out = g * a

    o_off = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    o_mask = m_ok[:, None] & d_ok[None, :]
    tl.store(Out + o_off, _cast(out, Out.dtype.element_ty, EMU_BF16), mask=o_mask)
    tl.store(Lse + pid_bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------------------------------
# Backward: preprocess (Delta, dgate, dbaseline partials). A is not kept: where the gate is 1 (scoring),
# out = A; elsewhere A is recomputed from q, k, v and the saved lse (P is already normalised).
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _gattn_bwd_preprocess_kernel(
    Q, K, V, Mask, Out, DO, Lse, Gate, Base, Delta, DGatePart, DBasePart, DGateRows,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_mb, stride_ms,
    H, T, S, GROUP, qk_scale, NUM_M,
    T_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BASE: tl.constexpr, BASE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, DOT_PREC: tl.constexpr, EMU_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < T
    msk = m_ok[:, None] & d_ok[None, :]

    g = tl.load(Gate + bh)
    if g == 1.0:  # out = m + 1 * (A - m) = A
        a = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                    mask=msk, other=0.0).to(tl.float32)
    else:  # A = sum_n P_n V_n with P = exp2(q k^T * scale * log2(e) - lse), as the dQ kernel recomputes it
        hk = h // GROUP
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=msk, other=0.0)
        lse = tl.load(Lse + bh * T + offs_m, mask=m_ok, other=float("inf"))
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        offs_n = tl.arange(0, BLOCK_N)
        a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        shift = S - T
        if CAUSAL:
            hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + shift)
        else:
            hi = S
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            n_ok = cols < S
            kt = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            qk = _dot(q, kt, DOT_PREC, EMU_BF16) * qk_scale
            allow = _allowed(offs_m, m_ok, cols, n_ok, shift, Mask + b * stride_mb, stride_ms, CAUSAL, HAS_MASK)
            p = tl.where(allow, tl.math.exp2(qk - lse[:, None]), 0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            a += _dot(_cast(p, v.dtype, EMU_BF16), v, DOT_PREC, EMU_BF16)

    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                 mask=msk, other=0.0).to(tl.float32)
    r = tl.sum(a * do, 1)  # <A_t, dOut_t>
    tl.store(Delta + bh * T + offs_m, g * r, mask=m_ok)  # rowsum(dA * A), dA = g * dOut

    part = bh * NUM_M + pid_m
    if HAS_BASE:
        base = tl.load(Base + h * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        centred = tl.where(msk, a - base[None, :], 0.0)
        rows = tl.sum(centred * do, 1)  # <A_t - m, dOut_t>
        dg = tl.sum(rows, 0)
        if ROWS:
            tl.store(DGateRows + bh * T + offs_m, rows, mask=m_ok)
        if BASE_GRAD:
            col = tl.sum(do, 0)  # rows outside T were loaded as 0
            tl.store(DBasePart + part * HEAD_DIM + offs_d, (1.0 - g) * col, mask=d_ok)
    else:
        dg = tl.sum(r, 0)
        if ROWS:
            tl.store(DGateRows + bh * T + offs_m, r, mask=m_ok)
    tl.store(DGatePart + part, dg)


# ----------------------------------------------------------------------------------------------------
# Backward: dK, dV by key block (all query heads of the GQA group handled by the same program)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _gattn_bwd_dkdv_kernel(
    Q, K, V, Gate, Mask, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_mb, stride_ms,
    H, HKV, T, S, GROUP, qk_scale, sm_scale,
    T_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, EMU_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // HKV).to(tl.int64)
    hk = (pid_bk % HKV).to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < S
    nd_mask = n_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=nd_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0)
    key_ok = n_ok
    if HAS_MASK:
        keep = tl.load(Mask + b * stride_mb + offs_n * stride_ms, mask=n_ok, other=0)
        key_ok = key_ok & (keep != 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    shift = S - T
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0)  # first query row that can see key start_n
        lo = (lo // BLOCK_M) * BLOCK_M
    else:
        lo = 0

    for gi in range(0, GROUP):
        h = hk * GROUP + gi
        bh = b * H + h
        g = tl.load(Gate + bh)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_gb + h * stride_gh
        for start_m in range(lo, T, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < T
            md_mask_t = d_ok[:, None] & m_ok[None, :]
            qt = tl.load(q_base + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qt,
                         mask=md_mask_t, other=0.0)  # [D, M]
            lse = tl.load(Lse + bh * T + offs_m, mask=m_ok, other=float("inf"))
            qkt = _dot(k, qt, DOT_PREC, EMU_BF16) * qk_scale  # [N, M]
            allow = key_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                allow = allow & (offs_n[:, None] <= offs_m[None, :] + shift)
            pt = tl.where(allow, tl.math.exp2(qkt - lse[None, :]), 0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D]
            # dV += P^T dA with dA = g * dOut
            dv += g * _dot(_cast(pt, do.dtype, EMU_BF16), do, DOT_PREC, EMU_BF16)
            dpt = g * _dot(v, tl.trans(do), DOT_PREC, EMU_BF16)  # (dA V^T)^T  [N, M]
            delta = tl.load(Delta + bh * T + offs_m, mask=m_ok, other=0.0)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(_cast(dst, qt.dtype, EMU_BF16), tl.trans(qt), DOT_PREC, EMU_BF16)

    dk = dk * sm_scale
    dk_off = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    tl.store(DK + dk_off, _cast(dk, DK.dtype.element_ty, EMU_BF16), mask=nd_mask)
    tl.store(DV + dk_off, _cast(dv, DV.dtype.element_ty, EMU_BF16), mask=nd_mask)


# ----------------------------------------------------------------------------------------------------
# Backward: dQ by query block
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _gattn_bwd_dq_kernel(
    Q, K, V, Gate, Mask, DO, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_mb, stride_ms,
    H, T, S, GROUP, qk_scale, sm_scale,
    T_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, EMU_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    bh = pid_bh.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < T
    md_mask = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=md_mask, other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                 mask=md_mask, other=0.0)
    lse = tl.load(Lse + bh * T + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + bh * T + offs_m, mask=m_ok, other=0.0)
    g = tl.load(Gate + bh)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = S - T
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + shift)
    else:
        hi = S
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n0
        n_ok = cols < S
        dn_mask = d_ok[:, None] & n_ok[None, :]
        kt = tl.load(k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_ks, mask=dn_mask, other=0.0)
        vt = tl.load(v_base + offs_d[:, None] * stride_vd + cols[None, :] * stride_vs, mask=dn_mask, other=0.0)
        qk = _dot(q, kt, DOT_PREC, EMU_BF16) * qk_scale
        allow = _allowed(offs_m, m_ok, cols, n_ok, shift, Mask + b * stride_mb, stride_ms, CAUSAL, HAS_MASK)
        p = tl.where(allow, tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = g * _dot(do, vt, DOT_PREC, EMU_BF16)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, kt.dtype, EMU_BF16), tl.trans(kt), DOT_PREC, EMU_BF16)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             _cast(dq, DQ.dtype.element_ty, EMU_BF16), mask=md_mask)


# ----------------------------------------------------------------------------------------------------
# Launching: the interpreter runs one small block configuration; a GPU runs the configs of
# headscore.kernels.configs (autotuned where there are several), chosen per target, head width and dtype.
# ----------------------------------------------------------------------------------------------------
_KERNELS = {"fwd": _gattn_fwd_kernel, "pre": _gattn_bwd_preprocess_kernel, "dkdv": _gattn_bwd_dkdv_kernel,
            "dq": _gattn_bwd_dq_kernel}
_TUNED: dict = {}
_RECORDING: list | None = None


@contextlib.contextmanager
def recording_launches() -> Iterator[list[tuple[str, object, tuple, dict]]]:
    """Within the block, launchers record ``(name, kernel, args, meta)`` instead of running a kernel.

    For the compile check (``headscore.kernels.resources``): it gets the exact arguments, and so the
    exact specialisation, that a real call would launch each kernel with, from CPU tensors."""
    global _RECORDING
    previous, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = previous


def _capability(t: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device) if t.device.type == "cuda" else (0, 0)


def _tuned(name: str):
    """Autotuned wrapper of a kernel over every config it may use, pruned per call to those that fit."""
    if name not in _TUNED:
        table = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                 for m, n, w, st in all_configs(name)]
        _TUNED[name] = triton.autotune(configs=table, key=["HEAD_DIM", "CAUSAL", "HAS_MASK", "T_BUCKET"],
                                       prune_configs_by={"early_config_prune": _prune_configs(name)})(_KERNELS[name])
    return _TUNED[name]


def _prune_configs(name: str):
    def prune(candidates, named_args, **kwargs):
        q = named_args["Q"]
        keep = set(kept(name, kwargs["BLOCK_D"], q.element_size(), _capability(q)))
        return [c for c in candidates if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
    return prune


def _block(name: str, q: torch.Tensor, width: int) -> dict[str, int]:
    """The config of a kernel that is not autotuned (the preprocessing step): the first checked one on a GPU
    (blocks, warps, stages), the interpreter's blocks on a CPU (and while recording: the compile check sets
    its own)."""
    if is_interpreted(_KERNELS[name]) or _RECORDING is not None:
        return {"BLOCK_M": _INTERP_BLOCK_M, "BLOCK_N": _INTERP_BLOCK_N}
    m, n, warps, stages = kept(name, width, q.element_size(), _capability(q))[0]
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": warps, "num_stages": stages}


def _launch(name: str, grid_fn, args: tuple, meta: dict):
    """Run a kernel: fixed small blocks under the interpreter, the configs of ``configs`` on a GPU."""
    kernel = _KERNELS[name]
    if _RECORDING is not None:
        _RECORDING.append((name, kernel, args, dict(meta)))
    elif is_interpreted(kernel):
        cfg = {"BLOCK_M": _INTERP_BLOCK_M, "BLOCK_N": _INTERP_BLOCK_N, **meta}
        kernel[grid_fn(cfg)](*args, **cfg)
    elif "BLOCK_M" in meta:  # a fixed config (the preprocessing step, from _block)
        kernel[grid_fn(meta)](*args, **meta)
    else:
        _tuned(name)[grid_fn](*args, **meta)


def _dot_prec(dtype: torch.dtype) -> str:
    # float32 inputs: exact fp32 products (no TF32), matching PyTorch's default matmul precision.
    return "ieee" if dtype == torch.float32 else "tf32"


def _emu_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and is_interpreted(_gattn_fwd_kernel)


def _t_bucket(n: int) -> int:
    return min(next_pow2(max(n, 1)), 1 << 16)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _forward(q, k, v, gate2d, base, mask_u8, causal, scale):
    B, H, T, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    # out is stored [B, T, H, D] (what o_proj reads) and handed out as a [B, H, T, D] view, so the caller's
    # transpose(1, 2).contiguous() copies nothing and the one tensor is also what the backward keeps
    out = alloc((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = alloc((B, H, T), dtype=torch.float32, device=q.device)
    mask_arg = mask_u8 if mask_u8 is not None else q
    m_strides = (mask_u8.stride(0), mask_u8.stride(1)) if mask_u8 is not None else (0, 0)
    args = (
        q, k, v, gate2d, base if base is not None else gate2d, mask_arg, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *m_strides,
        H, T, S, H // HKV, scale * _LOG2E, _t_bucket(max(T, S)),
    )
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal), HAS_MASK=mask_u8 is not None,
                HAS_BASE=base is not None, DOT_PREC=_dot_prec(q.dtype), EMU_BF16=_emu_bf16(q.dtype))
    _launch("fwd", lambda META: (triton.cdiv(T, META["BLOCK_M"]), B * H), args, meta)
    return out, lse


def _backward(dout, q, k, v, out, lse, gate2d, base, mask_u8, causal, scale, need_qkv, base_grad, rows=False):
    B, H, T, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    dev = q.device
    width = block_d(D)
    mask_arg = mask_u8 if mask_u8 is not None else q
    m_strides = (mask_u8.stride(0), mask_u8.stride(1)) if mask_u8 is not None else (0, 0)
    meta = dict(HEAD_DIM=D, BLOCK_D=width, CAUSAL=bool(causal), HAS_MASK=mask_u8 is not None,
                DOT_PREC=_dot_prec(q.dtype), EMU_BF16=_emu_bf16(q.dtype))
    qk_scale = scale * _LOG2E
    tb = _t_bucket(max(T, S))

    pre = _block("pre", q, width)
    num_m = triton.cdiv(T, pre["BLOCK_M"])
    delta = alloc((B, H, T), dtype=torch.float32, device=dev)
    dgate_part = alloc((B, H, num_m), dtype=torch.float32, device=dev)
    dbase_part = alloc((B, H, num_m, D), dtype=torch.float32, device=dev) if base_grad else delta
    dgate_rows = alloc((B, H, T), dtype=torch.float32, device=dev) if rows else delta
    _launch(
        "pre", lambda META: (num_m, B * H),
        (q, k, v, mask_arg, out, dout, lse, gate2d, base if base is not None else gate2d, delta, dgate_part,
         dbase_part, dgate_rows,
         *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *m_strides,
         H, T, S, H // HKV, qk_scale, num_m, tb),
        {**meta, **pre, "HAS_BASE": base is not None, "BASE_GRAD": bool(base_grad), "ROWS": bool(rows)},
    )
    dgate = dgate_rows if rows else dgate_part.sum(-1)  # per position: the terms; else their sum
    dbase = dbase_part.sum((0, 2)) if base_grad else None
    if not need_qkv:
        return None, None, None, dgate, dbase

    dq = alloc(q.shape, dtype=q.dtype, device=dev)
    dk = alloc(k.shape, dtype=k.dtype, device=dev)
    dv = alloc(v.shape, dtype=v.dtype, device=dev)
    assert dk.stride() == dv.stride()
    _launch(
        "dkdv", lambda META: (triton.cdiv(S, META["BLOCK_N"]), B * HKV),
        (q, k, v, gate2d, mask_arg, dout, lse, delta, dk, dv,
         *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *m_strides,
         H, HKV, T, S, H // HKV, qk_scale, scale, tb),
        meta,
    )
    _launch(
        "dq", lambda META: (triton.cdiv(T, META["BLOCK_M"]), B * H),
        (q, k, v, gate2d, mask_arg, dout, lse, delta, dq,
         *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *m_strides,
         H, T, S, H // HKV, qk_scale, scale, tb),
        meta,
    )
    return dq, dk, dv, dgate, dbase


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------
class _GatedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, baseline, key_padding_mask, causal, scale):  # type: ignore[override]
        B, H = q.shape[0], q.shape[1]
        per_head = gate[..., 0] if gate.dim() == 3 else gate  # a per-position gate is the same at every t
        gate2d = per_head.detach().to(torch.float32).reshape(-1 if per_head.dim() == 2 else 1, H).expand(B, H)
        gate2d = gate2d.contiguous()
        base = None if baseline is None else baseline.detach().to(torch.float32).contiguous()
        mask_u8 = None if key_padding_mask is None else key_padding_mask.view(torch.uint8)
        out, lse = _forward(q, k, v, gate2d, base, mask_u8, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, gate2d, base, mask_u8)  # flash attention's own + O(B * H)
        ctx.causal, ctx.scale = causal, scale
        ctx.gate_shape, ctx.gate_dtype = gate.shape, gate.dtype
        ctx.base_dtype = None if baseline is None else baseline.dtype
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse, gate2d, base, mask_u8 = ctx.saved_tensors
        need_qkv = any(ctx.needs_input_grad[:3])
        base_grad = base is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dgate, dbase = _backward(
            dout, q, k, v, out, lse, gate2d, base, mask_u8, ctx.causal, ctx.scale, need_qkv, base_grad,
            rows=len(ctx.gate_shape) == 3 and ctx.needs_input_grad[3])
        if ctx.needs_input_grad[3]:
            if len(ctx.gate_shape) == 1:
                dgate = dgate.sum(0)
            elif ctx.gate_shape[0] == 1 and dgate.shape[0] != 1:
                dgate = dgate.sum(0, keepdim=True)
            dgate = dgate.to(ctx.gate_dtype)
        else:
            dgate = None
        if dbase is not None:
            dbase = dbase.to(ctx.base_dtype)
        return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
                dv if ctx.needs_input_grad[2] else None, dgate, dbase, None, None, None)


def _validate(q, k, v, gate, baseline, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head dim")
    HKV = k.shape[1]
    if HKV == 0 or H % HKV != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number of kv heads ({HKV})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; use float16, bfloat16 or float32")
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} not supported (1..{_MAX_HEAD_DIM})")
    if T == 0 or k.shape[2] == 0 or B == 0 or H == 0:
        raise ValueError("empty q/k/v are not supported")
    if not gate.is_floating_point():
        raise ValueError(f"gate must be a floating tensor; got {gate.dtype}")
    if not ((gate.dim() == 1 and gate.shape[0] == H) or (gate.dim() == 2 and gate.shape[1] == H
                                                          and gate.shape[0] in (1, B))
            or (gate.dim() == 3 and tuple(gate.shape[1:]) == (H, T) and gate.shape[0] in (1, B))):
        raise ValueError(f"gate must be [B, Hq] = [{B}, {H}], [1, {H}], [{H}] or per position [B, Hq, T]; "
                         f"got {tuple(gate.shape)}")
    if gate.dim() == 3 and not torch.equal(gate, gate[..., :1].expand_as(gate)):
        raise ValueError("a per-position gate [B, Hq, T] must have one value per head (the kernel gates heads; "
                         "it gives the gradient per position)")
    if baseline is not None and tuple(baseline.shape) != (H, D):
        raise ValueError(f"baseline must be [Hq, D] = [{H}, {D}]; got {tuple(baseline.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = keep); got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask must be [B, S] = [{B}, {k.shape[2]}]; "
                             f"got {tuple(key_padding_mask.shape)}")


def gated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor,
                    baseline: torch.Tensor | None = None, *, causal: bool = True,
                    key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention with a scalar gate on each head's output, fused in one Triton kernel (forward and backward).

    Args:
        q: [B, Hq, T, D] queries (float16, bfloat16 or float32).
        k, v: [B, Hkv, S, D]; Hq must be a multiple of Hkv (GQA: query head h uses kv head h // (Hq // Hkv);
            K/V are never repeated in memory).
        gate: [B, Hq], [1, Hq] or [Hq] (float32 recommended). Its gradient, sum_t <A - m, dOut>, is
            accumulated in float32 and returned with the gate's shape and dtype (summed over the batch
            when the gate was shared). A per-position gate [B, Hq, T] (or [1, Hq, T]) with the same
            value at every position gets the gradient per position, <A_t - m, dOut_t> (the terms of
            that sum, written out by the backward's preprocessing step).
        baseline: optional [Hq, D] value a head outputs when its gate is 0 (None = zeros).
        causal: bottom-right aligned causal mask: query i attends key j iff j <= i + (S - T)
            (same as transformers / SDPA with a KV cache; the usual causal mask when T == S).
        key_padding_mask: optional [B, S] bool, True = keep (left or right padding).
        scale: softmax scale, default 1 / sqrt(D).

    Returns:
        out = baseline + gate * (softmax(q k^T * scale) v - baseline), [B, Hq, T, D] in q's dtype.
        Query rows with no allowed key get attention output 0 (out = baseline * (1 - gate)), no NaN.
        With gate == 0 the output is exactly ``baseline.to(q.dtype)`` (or exactly 0).
    """
    require_triton()
    _validate(q, k, v, gate, baseline, key_padding_mask)
    check_device(_gattn_fwd_kernel, q, k, v, gate, *(t for t in (baseline, key_padding_mask) if t is not None))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _GatedAttentionFunction.apply(q, k, v, gate, baseline, key_padding_mask, bool(causal), float(scale))
