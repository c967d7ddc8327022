"""gate_grad (the single-pass Triton reduction in benchmarks/gate_grad.py) and gate_grad_torch."""

import sys
from pathlib import Path

import pytest
import torch

from headscore.kernels import triton_available

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gate_grad as kernels  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.numerics]

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def reference64(o, dy, baseline):
    c = o.double() if baseline is None else o.double() - baseline.double()[None, None]
    return (c * dy.double()).sum((1, 3))


def bound(o, dy, baseline, chain=None):
    """Worst-case error of the float32 reduction per (b, h), from the arithmetic: every kernel and expression
    here turns o, dy (exact in float32 whatever their dtype) and m into float32, rounds o - m (relative error u),
    multiplies (u) and adds the T x D products; a product that passes through at most ``chain`` roundings of
    additions is off by gamma_chain, so |got - exact| <= (chain + 2) u sum_{t,d} |o - m| |dy|, u = 2^-24.
    ``chain`` defaults to T x D - 1, true for any summation order."""
    c = o.double() if baseline is None else o.double() - baseline.double()[None, None]
    chain = o.shape[1] * o.shape[3] - 1 if chain is None else chain
    return (chain + 2) * 2.0 ** -24 * (c.abs() * dy.double().abs()).sum((1, 3))


def make(seed, B, T, H, D, dtype, *, layout="bthd", with_base=True, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    if layout == "bthd":
        o = torch.randn(B, T, H, D, generator=gen)
        dy = torch.randn(B, T, H, D, generator=gen)
    else:  # a [B, H, T, D] tensor viewed as [B, T, H, D]: strided, as after an attention kernel's transpose
        o = torch.randn(B, H, T, D, generator=gen).transpose(1, 2)
        dy = torch.randn(B, H, T, D, generator=gen).transpose(1, 2)
    base = torch.randn(H, D, generator=gen) * 0.5 if with_base else None
    o, dy = o.to(device=device, dtype=dtype), dy.to(device=device, dtype=dtype)
    return o, dy, (base.to(device) if base is not None else None)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape,layout,with_base,splits", [
    ((2, 70, 3, 32), "bthd", True, None),
    ((1, 45, 4, 48), "bhtd", False, 3),  # non-power-of-2 D, strided input, several programs per (b, h)
    ((2, 5, 2, 64), "bthd", True, 4),  # fewer rows than a block
])
def test_gate_grad_triton(dtype, shape, layout, with_base, splits, seed):
    o, dy, base = make(seed, *shape, dtype, layout=layout, with_base=with_base)
    got = kernels.gate_grad(o, dy, base, num_splits=splits)
    ref = reference64(o, dy, base)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.isfinite(got).all(), f"seed={seed}"
    err = (got.double() - ref).abs()
    assert (err <= bound(o, dy, base)).all(), f"max err {err.max():.3e} (seed={seed})"
    torch_expr = kernels.gate_grad_torch(o, dy, base)
    assert ((torch_expr.double() - ref).abs() <= bound(o, dy, base)).all(), f"seed={seed}"


@needs_triton
def test_gate_grad_matches_gate_autograd(seed):
    """Same number as autograd through headscore's unfused gate (Y = m + g (O - m))."""
    from headscore.gate import apply_gate

    o, dy, base = make(seed, 2, 33, 3, 16, torch.float32)
    gate = torch.rand(2, 3, device=o.device, requires_grad=True)
    apply_gate(o, gate, base).backward(dy)
    got = kernels.gate_grad(o, dy, base)
    ref, lim = reference64(o, dy, base), bound(o, dy, base)
    assert ((gate.grad.double() - ref).abs() <= lim).all(), f"autograd, seed={seed}"
    assert ((got.double() - ref).abs() <= lim).all(), f"kernel, seed={seed}"
    # both within the bound of the exact value: they differ from each other by at most twice it
    assert ((got.double() - gate.grad.double()).abs() <= 2 * lim).all(), f"seed={seed}"


def test_gate_grad_errors():
    o = torch.zeros(1, 4, 2, 16)
    with pytest.raises(ValueError):
        kernels.gate_grad(o, torch.zeros(1, 4, 2, 8))
    with pytest.raises(ValueError):
        kernels.gate_grad(o, o, torch.zeros(3, 16))
    with pytest.raises(ValueError):
        kernels.gate_grad(o[0], o[0])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_gpu_gate_grad(dtype, layout, seed):
    o, dy, base = make(seed, 2, 4099, 8, 128, dtype, layout=layout, device="cuda")
    ref = reference64(o, dy, base)
    # the kernel's own order: at most T / 8 blocks added in sequence per program (BLOCK_T >= 8); one block's
    # <= 8192 elements reduced by 128 threads (num_warps = 4): <= 64 in sequence per thread, then shuffle trees
    # (7 levels per tl.sum, two of them); then at most T / 8 programs' partial sums in sequence
    lim = bound(o, dy, base, chain=2 * -(-o.shape[1] // 8) + 64 + 14)
    assert ((kernels.gate_grad(o, dy, base).double() - ref).abs() <= lim).all(), f"triton, seed={seed}"
