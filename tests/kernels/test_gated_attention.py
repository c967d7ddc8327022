"""gated_attention (fused Triton kernel) against an independent float64 PyTorch reference.

Tolerance rule (flash-attention's): for every output and gradient,
    max|kernel - ref_fp64| <= FACTOR * max|torch_same_dtype - ref_fp64| + ATOL[dtype]
where torch_same_dtype is the same plain-PyTorch reference run in the kernel's dtype (no upcast).
Each test draws a fresh seed (printed, and in every assertion message; HEADSCORE_TEST_SEED replays it).
"""

import math

import pytest
import torch

pytestmark = [pytest.mark.triton, pytest.mark.numerics]

kernels = pytest.importorskip("headscore.kernels")
if not kernels.triton_available():  # pragma: no cover
    pytest.skip("triton is not installed", allow_module_level=True)
gated_attention = kernels.gated_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FACTOR = 3.0
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ["out", "dq", "dk", "dv", "dgate", "dbaseline"]


# --------------------------------------------------------------------------------------------------
# reference (independent of the kernel): materialise the scores, repeat K/V for GQA
# --------------------------------------------------------------------------------------------------
def allowed_mask(B, T, S, causal, kpm, device):
    allow = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:  # bottom-right aligned: query i sees key j iff j <= i + S - T
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        allow = j <= i + (S - T)
    allow = allow[None, None].expand(B, 1, T, S)
    if kpm is not None:
        allow = allow & kpm[:, None, None, :]
    return allow


def reference(q, k, v, gate, baseline, causal, kpm, scale, dtype):
    q, k, v = (x.to(dtype) for x in (q, k, v))
    B, H, T, D = q.shape
    S = k.shape[2]
    rep = H // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    allow = allowed_mask(B, T, S, causal, kpm, q.device)
    s = s.masked_fill(~allow, float("-inf"))
    any_key = allow.any(-1, keepdim=True)
    s = torch.where(any_key, s, torch.zeros_like(s))  # rows without keys: avoid softmax(all -inf) = NaN
    p = torch.softmax(s, dim=-1)
    p = torch.where(allow, p, torch.zeros_like(p))
    a = torch.matmul(p, v)
    g = gate.to(dtype).reshape(-1, H)[:, :, None, None]
    if baseline is None:
        return g * a
    m = baseline.to(dtype)[None, :, None, :]
    return m + g * (a - m)


def run_reference(inputs, dout, causal, kpm, scale, dtype):
    leaves = [x.detach().to(dtype).requires_grad_(x.requires_grad) if x is not None else None for x in inputs]
    out = reference(*leaves, causal, kpm, scale, dtype)
    wrt = [x for x in leaves if x is not None and x.requires_grad]
    grads = torch.autograd.grad(out, wrt, dout.to(dtype))
    it = iter(grads)
    full = [next(it) if (x is not None and x.requires_grad) else None for x in leaves]
    return [out] + full  # out, dq, dk, dv, dgate, dbaseline


def run_kernel(inputs, dout, causal, kpm, scale):
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) if x is not None else None for x in inputs]
    q, k, v, gate, base = leaves
    out = gated_attention(q, k, v, gate, base, causal=causal, key_padding_mask=kpm, scale=scale)
    out.backward(dout)
    return [out] + [x.grad if x is not None else None for x in leaves]


def make_inputs(seed, B, Hq, Hkv, T, S, D, dtype, *, gate_kind="bh", with_base=True, pad=None,
                device=DEVICE):
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device)

    q = rn(B, Hq, T, D).to(dtype).requires_grad_()
    k = rn(B, Hkv, S, D).to(dtype).requires_grad_()
    v = rn(B, Hkv, S, D).to(dtype).requires_grad_()
    gshape = (B, Hq) if gate_kind == "bh" else (Hq,)
    gate = (torch.rand(*gshape, generator=gen) * 2.0 - 0.5).to(device)  # rows differ, some negative
    gate.view(-1)[0] = 0.0  # one ablated head
    gate.view(-1)[-1] = 1.0  # one head as in scoring: its backward reads out instead of recomputing A
    gate.requires_grad_()
    base = rn(Hq, D, s=0.5).requires_grad_() if with_base else None
    kpm = None
    if pad is not None:
        kpm = torch.ones(B, S, dtype=torch.bool)
        n = max(1, S // 4)
        for b in range(B):
            side = pad if pad in ("left", "right") else ("left" if b % 2 == 0 else "right")
            nb = n + b  # different amounts per row
            if side == "left":
                kpm[b, :nb] = False
            else:
                kpm[b, S - nb:] = False
        kpm = kpm.to(device)
    dout = rn(B, Hq, T, D).to(dtype)
    return [q, k, v, gate, base], kpm, dout


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


CASES = [
    # name, B, Hq, Hkv, T, S, D, causal, pad, with_base, gate_kind
    ("mha-causal-base", 2, 2, 2, 50, 50, 32, True, None, True, "bh"),
    ("gqa3-full-gate1d", 1, 3, 1, 37, 37, 16, False, None, False, "h"),
    ("gqa4-causal-TltS-leftpad", 2, 4, 1, 24, 70, 64, True, "left", True, "bh"),
    ("gqa2-causal-TgtS-rightpad", 2, 4, 2, 45, 30, 32, True, "right", False, "bh"),
    ("mha-causal-leftpad-emptyrows", 2, 2, 2, 40, 40, 32, True, "left", True, "bh"),
    ("gqa2-d128-full-mixedpad", 2, 2, 1, 33, 33, 128, False, "mixed", True, "bh"),
    ("decode-T1-gqa4-leftpad", 2, 4, 1, 1, 50, 64, True, "left", True, "bh"),
    ("d80-nonpow2-causal", 1, 2, 2, 21, 21, 80, True, None, True, "bh"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_fp64_reference(case, dtype, seed):
    name, B, Hq, Hkv, T, S, D, causal, pad, with_base, gate_kind = case
    inputs, kpm, dout = make_inputs(seed, B, Hq, Hkv, T, S, D, dtype, gate_kind=gate_kind,
                                    with_base=with_base, pad=pad)
    scale = 1.0 / math.sqrt(D)
    got = run_kernel(inputs, dout, causal, kpm, scale)
    ref = run_reference(inputs, dout, causal, kpm, scale, torch.float64)
    low = run_reference(inputs, dout, causal, kpm, scale, dtype)

    report = []
    for nm, g, r, lo in zip(NAMES, got, ref, low, strict=True):
        if r is None:
            assert g is None, f"{nm} should be None (seed={seed})"
            continue
        assert g.shape == r.shape, f"{nm} shape {tuple(g.shape)} != {tuple(r.shape)} (seed={seed})"
        assert torch.isfinite(g).all(), f"{nm} has NaN/inf (unwritten or masked-row bug), seed={seed}"
        ek, et = max_err(g, r), max_err(lo, r)
        report.append(f"{nm}: kernel {ek:.2e} torch-{str(dtype)[6:]} {et:.2e}")
        assert ek <= FACTOR * et + ATOL[dtype], f"{name} {dtype} {nm}: {ek:.3e} > {FACTOR}*{et:.3e}+{ATOL[dtype]}" \
                                                f" (seed={seed}); " + "; ".join(report)
    assert got[0].dtype == dtype and got[4].dtype == inputs[3].dtype
    print(f"{name} {dtype}: " + "; ".join(report))

    # rows that see no key at all: attention output 0 (out = (1 - g) m), zero dq, no NaN
    allow = allowed_mask(B, T, S, causal, kpm, got[0].device)
    empty = ~allow.any(-1).expand(B, Hq, T)  # [B, Hq, T]
    if empty.any():
        assert (got[1][empty] == 0).all(), f"dq of key-less rows must be exactly 0 (seed={seed})"
        g = inputs[3].detach().reshape(-1, Hq).expand(B, Hq)[:, :, None, None].to(torch.float32)
        m = inputs[4].detach().float()[None, :, None, :] if with_base else torch.zeros(1, 1, 1, D, device=g.device)
        expect = ((1 - g) * m).expand(B, Hq, T, D)[empty]
        assert torch.allclose(got[0][empty].float(), expect.to(dtype).float(), atol=1e-2, rtol=1e-2), seed


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_gate_zero_is_exact_ablation(dtype, seed):
    B, Hq, Hkv, T, S, D = 2, 4, 2, 29, 29, 32
    inputs, kpm, dout = make_inputs(seed, B, Hq, Hkv, T, S, D, dtype, pad="mixed")
    q, k, v, gate, base = inputs
    # a baseline given in the model dtype (as a model's own mean activations would be): then "exactly the
    # baseline" is well defined whatever rounding the kernel does internally
    base = base.detach().to(dtype).requires_grad_()
    # all-zero gate, with and without a baseline: output is exactly the baseline (resp. exactly 0)
    for b in (base, None):
        zero = torch.zeros(B, Hq, device=q.device, requires_grad=True)
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out = gated_attention(qq, kk, vv, zero, b, causal=True, key_padding_mask=kpm)
        expect = torch.zeros_like(out) if b is None else b.detach().to(dtype)[None, :, None, :].expand_as(out)
        assert torch.equal(out, expect), f"gate 0 must reproduce the baseline exactly (seed={seed})"
        out.backward(dout)
        for x in (qq, kk, vv):
            assert torch.equal(x.grad, torch.zeros_like(x)), f"gate 0 => zero q/k/v grads (seed={seed})"
        ref = run_reference([q, k, v, zero, b], dout, True, kpm, 1 / math.sqrt(D), torch.float64)[4]
        assert torch.allclose(zero.grad.double(), ref, rtol=2e-2, atol=ATOL[dtype] * T), seed
    # one head ablated among live ones: that head's output is exactly the baseline
    g = torch.rand(B, Hq, device=q.device) + 0.5
    g[:, 1] = 0.0
    out = gated_attention(q.detach(), k.detach(), v.detach(), g, base.detach(), causal=False)
    assert torch.equal(out[:, 1], base.detach()[1].expand(B, T, D)), seed


def test_gate_only_gradient_and_shared_gate(seed):
    """q/k/v without grad: the backward runs only the preprocess pass; [1, Hq] gates sum over the batch."""
    B, Hq, Hkv, T, S, D = 2, 3, 1, 21, 21, 16
    inputs, kpm, dout = make_inputs(seed, B, Hq, Hkv, T, S, D, torch.float32)
    q, k, v, _, base = (x.detach() if x is not None else None for x in inputs)
    gate = (torch.rand(1, Hq, generator=torch.Generator().manual_seed(seed)) + 0.2).to(q.device)
    gate.requires_grad_()
    base.requires_grad_()
    out = gated_attention(q, k, v, gate, base, causal=True)
    out.backward(dout)
    g2 = gate.detach().double().requires_grad_()
    b2 = base.detach().double().requires_grad_()
    ref = reference(q.double(), k.double(), v.double(), g2, b2, True, None, 1 / math.sqrt(D), torch.float64)
    ref.backward(dout.double())
    assert gate.grad.shape == (1, Hq)
    assert torch.allclose(gate.grad.double(), g2.grad, rtol=1e-4, atol=1e-4), f"seed={seed}"
    assert torch.allclose(base.grad.double(), b2.grad, rtol=1e-4, atol=1e-4), f"seed={seed}"


def test_noncontiguous_inputs_and_custom_scale(seed):
    """Strided q/k/v (a [B, T, H, D] tensor viewed as [B, H, T, D]) and a non-default scale."""
    B, Hq, Hkv, T, D = 1, 2, 2, 35, 32
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=gen).to(DEVICE).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, generator=gen).to(DEVICE).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, generator=gen).to(DEVICE).transpose(1, 2)
    gate = torch.tensor([0.7, -1.2], device=DEVICE)
    dout = torch.randn(B, Hq, T, D, generator=gen).to(DEVICE)
    inputs = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), gate.requires_grad_(), None]
    got = run_kernel(inputs, dout, True, None, 0.3)
    ref = run_reference(inputs, dout, True, None, 0.3, torch.float64)
    for nm, g, r in zip(NAMES, got, ref, strict=True):
        if r is not None:
            assert max_err(g, r) < 1e-4, f"{nm}: {max_err(g, r):.2e} (seed={seed})"


def _saved_beyond(fn, *own):
    """Run ``fn``; the bytes of every distinct storage autograd keeps for the backward, other than the
    storages of ``own`` (inputs) and of the output: what the operation adds to the memory held until backward."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    for t in (*own, out):
        saved.pop(t.untyped_storage().data_ptr(), None)
    return out, sum(saved.values())


@pytest.mark.parametrize("pad", [None, "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_keeps_no_memory_beyond_flash_attention(dtype, pad, seed):
    """Between forward and backward the kernel keeps q, k, v, out and lse (what flash attention keeps; here
    torch's own SDPA flash kernel is the measure) plus the [B, Hq] gate and [Hq, D] baseline in float32:
    no pre-gate output A, no copy of out. Its output is laid out [B, T, Hq, D], so the caller's
    transpose(1, 2).contiguous() (transformers' attention functions do it) copies nothing."""
    B, Hq, Hkv, T, D = 2, 4, 2, 48, 32
    inputs, kpm, _ = make_inputs(seed, B, Hq, Hkv, T, T, D, dtype, pad=pad)
    q, k, v, gate, base = inputs
    out, extra = _saved_beyond(lambda: gated_attention(q, k, v, gate, base, causal=True, key_padding_mask=kpm),
                               q, k, v, gate, base, *(() if kpm is None else (kpm,)))
    _, flash = _saved_beyond(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), q, k, v)
    lse = 4 * B * Hq * T
    assert flash >= lse, f"torch's flash attention keeps its lse ({flash} B saved beyond q, k, v, out)"
    bound = flash + 4 * B * Hq + 4 * Hq * D  # + gate and baseline in float32
    assert extra <= bound, f"the kernel keeps {extra} B beyond q, k, v, out; flash attention {flash} B (seed={seed})"
    flat = out.transpose(1, 2).contiguous()
    assert flat.data_ptr() == out.data_ptr(), "out must be stored [B, T, H, D]: the caller's contiguous() copies"


def test_poisoned_buffers_are_really_poisoned():
    """The debug mode the other tests rely on really fills kernel buffers with NaN."""
    from headscore.kernels._compat import alloc

    assert torch.isnan(alloc((3,), dtype=torch.float16, device="cpu")).all()


@pytest.mark.parametrize("bad", ["ratio", "headdim", "gate", "mask_dtype", "mask_shape", "dtype", "baseline"])
def test_clear_errors(bad):
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    v = torch.randn(1, 2, 8, 16)
    gate = torch.ones(1, 4)
    kw = {}
    base = None
    if bad == "ratio":
        k, v = torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)
    elif bad == "headdim":
        q, k, v = torch.randn(1, 4, 8, 300), torch.randn(1, 2, 8, 300), torch.randn(1, 2, 8, 300)
    elif bad == "gate":
        gate = torch.ones(2, 4)
    elif bad == "mask_dtype":
        kw["key_padding_mask"] = torch.ones(1, 8, dtype=torch.int64)
    elif bad == "mask_shape":
        kw["key_padding_mask"] = torch.ones(1, 9, dtype=torch.bool)
    elif bad == "dtype":
        q, k, v = q.double(), k.double(), v.double()
    elif bad == "baseline":
        base = torch.zeros(4, 15)
    with pytest.raises(ValueError):
        gated_attention(q, k, v, gate, base, **kw)


def test_import_without_triton(monkeypatch):
    """The package imports without triton; calling a kernel then raises a clear error."""
    import importlib.util
    import pathlib
    import sys

    pkg_dir = pathlib.Path(kernels.__file__).parent
    for mod in ("triton", "triton.language"):
        monkeypatch.setitem(sys.modules, mod, None)
    name = "_hs_kernels_without_triton"
    spec = importlib.util.spec_from_file_location(name, pkg_dir / "__init__.py",
                                                  submodule_search_locations=[str(pkg_dir)])
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)
    try:
        spec.loader.exec_module(mod)
        assert mod.triton_available() is False
        x = torch.zeros(1, 1, 4, 16)
        with pytest.raises(RuntimeError, match="[Tt]riton"):
            mod.gated_attention(x, x, x, torch.ones(1))
    finally:
        for key in [k for k in sys.modules if k.startswith(name + ".")]:
            del sys.modules[key]


# --------------------------------------------------------------------------------------------------
# GPU-only: long sequences, D = 128, bf16 (skipped without CUDA)
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1024, 4096, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_long_sequences(T, dtype, seed):
    B, Hq, Hkv, D = 1, 4, 1, 128
    inputs, kpm, dout = make_inputs(seed, B, Hq, Hkv, T, T, D, dtype, pad="left", device="cuda")
    scale = 1.0 / math.sqrt(D)
    got = run_kernel(inputs, dout, True, kpm, scale)
    ref = run_reference(inputs, dout, True, kpm, scale, torch.float64)
    low = run_reference(inputs, dout, True, kpm, scale, dtype)
    for nm, g, r, lo in zip(NAMES, got, ref, low, strict=True):
        if r is None:
            continue
        assert torch.isfinite(g).all(), f"{nm} NaN (seed={seed})"
        ek, et = max_err(g, r), max_err(lo, r)
        assert ek <= FACTOR * et + ATOL[dtype], f"T={T} {nm}: {ek:.3e} vs torch {et:.3e} (seed={seed})"
    del got, ref, low
    torch.cuda.empty_cache()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("D", [16, 32, 64, 80, 128, 256])
def test_gpu_head_dims(D, seed):
    B, Hq, Hkv, T = 2, 6, 2, 515
    inputs, kpm, dout = make_inputs(seed, B, Hq, Hkv, T, T, D, torch.bfloat16, pad="mixed", device="cuda")
    scale = 1.0 / math.sqrt(D)
    got = run_kernel(inputs, dout, True, kpm, scale)
    ref = run_reference(inputs, dout, True, kpm, scale, torch.float64)
    low = run_reference(inputs, dout, True, kpm, scale, torch.bfloat16)
    for nm, g, r, lo in zip(NAMES, got, ref, low, strict=True):
        if r is not None:
            ek, et = max_err(g, r), max_err(lo, r)
            assert ek <= FACTOR * et + ATOL[torch.bfloat16], f"D={D} {nm}: {ek:.3e} vs {et:.3e} (seed={seed})"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_peak_memory_equals_flash_attention(seed):
    """fwd + bwd of the kernel (gate gradient wanted) against torch's SDPA flash backend without a gate, same
    q, k, v: peak memory above the inputs within 2% + 1 MiB (the kernel's own [B, Hq, T] float32 buffers are
    a few MiB at these shapes; an extra [B, Hq, T, D] would be 64 MiB)."""
    B, H, T, D = 2, 32, 4096, 128
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
               .requires_grad_() for _ in range(3))
    gate = torch.ones(B, H, device="cuda", requires_grad=True)
    dout = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)

    def peak(fn):
        fn()  # compile / autotune first
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    def fused():
        out = gated_attention(q, k, v, gate, causal=True)
        out.backward(dout)
        for x in (q, k, v, gate):
            x.grad = None

    def flash():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(dout)
        for x in (q, k, v):
            x.grad = None

    ours, theirs = peak(fused), peak(flash)
    print(f"peak above inputs: kernel {ours / 2**20:.1f} MiB, SDPA flash {theirs / 2**20:.1f} MiB")
    assert ours <= 1.02 * theirs + 2**20, f"kernel {ours / 2**20:.1f} MiB vs flash {theirs / 2**20:.1f} MiB"


@pytest.mark.parametrize("with_base,pad", [(True, "mixed"), (False, None)], ids=["base-pad", "nobase"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_per_position_gate_gradient(with_base, pad, dtype, seed):
    """A per-position gate [B, Hq, T] (one value per head) gets <A_t - m, dOut_t> per position from the
    preprocessing step; its sum over t is the per-head gradient, and q/k/v gradients are unchanged."""
    B, Hq, Hkv, T, D = 2, 4, 2, 37, 32
    inputs, kpm, dout = make_inputs(seed, B, Hq, Hkv, T, T, D, dtype, with_base=with_base, pad=pad)
    q, k, v, gate, base = inputs
    per_pos = gate.detach()[:, :, None].expand(B, Hq, T).clone().requires_grad_()
    per_head = run_kernel([q, k, v, gate, base], dout, True, kpm, 1 / math.sqrt(D))
    got = run_kernel([q, k, v, per_pos, base], dout, True, kpm, 1 / math.sqrt(D))
    assert got[4].shape == (B, Hq, T)
    # float64 reference of the per-position terms: the reference attention with a per-position gate
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    g64 = per_pos.detach().double().requires_grad_()
    m64 = None if base is None else base.detach().double()
    a = reference(*leaves, torch.ones(B, Hq, dtype=torch.float64), None, True, kpm, 1 / math.sqrt(D), torch.float64)
    m = 0.0 if m64 is None else m64[None, :, None, :]
    out64 = m + g64[..., None] * (a - m)
    out64.backward(dout.double())
    terms = g64.grad
    scale = terms.abs().max().item()
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * scale  # the terms reduce dOut of the input dtype in fp32
    assert max_err(got[4], terms) <= tol, (max_err(got[4], terms), tol)
    assert torch.allclose(got[4].double().sum(-1), per_head[4].double(), rtol=1e-5, atol=1e-5 * scale)
    for i in (0, 1, 2, 3):  # out, dq, dk, dv: the same kernels ran
        assert torch.equal(got[i], per_head[i]), i


def test_per_position_gate_must_be_one_value_per_head():
    inputs, _, _ = make_inputs(0, 1, 2, 2, 8, 8, 16, torch.float32)
    q, k, v, gate, base = (x.detach() for x in inputs)
    varying = torch.rand(1, 2, 8)
    with pytest.raises(ValueError, match="one value per head"):
        gated_attention(q, k, v, varying, base)
