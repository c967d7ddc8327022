"""GPU benchmark: fused gated attention vs PyTorch SDPA (+ an unfused gate), and the gate-gradient reductions.

Attention part: causal, bf16, head dims 64 and 128, sequence lengths 512 .. 16k at a fixed number of total
tokens (batch = tokens // T), heads = model_dim // D. For each configuration it times, forward and
forward+backward:

  * gated-attn (triton)   headscore.kernels.gated_attention (gate gradient from the backward's preprocess)
  * sdpa-flash            torch SDPA, FLASH_ATTENTION backend, no gate
  * sdpa-cudnn            torch SDPA, CUDNN_ATTENTION backend, no gate
  * sdpa+gate (unfused)   SDPA (default backend choice) then y = out * gate, gate grad by autograd

TFLOP/s use the usual flash-attention count: forward 4*B*H*T*S*D, halved for causal; backward 2.5x forward.

Gate-gradient part: sum_t <o - m, dy> over o, dy [B, T, H, D] bf16, Triton kernel (benchmarks/gate_grad.py)
vs the plain torch expression; reported as time and effective GB/s.

    python benchmarks/bench_gated_attention.py --out benchmarks/results/gated_attention.csv

Needs a CUDA GPU; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="512,1024,2048,4096,8192,16384", help="comma-separated T values")
    p.add_argument("--head-dims", default="64,128", help="comma-separated head dims")
    p.add_argument("--total-tokens", type=int, default=16384, help="batch * T, kept fixed")
    p.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim // head_dim")
    p.add_argument("--kv-heads", type=int, default=0, help="KV heads (GQA); 0 = same as query heads")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--warmup", type=int, default=25, help="ms of warm-up per measurement (do_bench)")
    p.add_argument("--rep", type=int, default=100, help="ms of repetitions per measurement (do_bench)")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--skip-gate-grad", action="store_true")
    p.add_argument("--out", default="benchmarks/results/gated_attention.csv", help="CSV path (and a .png/.pdf plot)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, also on a CPU (kernels through TRITON_INTERPRET=1): checks the script runs")
    p.add_argument("--plot-only", default=None, metavar="CSV", help="only draw the plot of an earlier run's CSV")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.head_dims, args.total_tokens, args.model_dim = "32", "16", 64, 32
    return args


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def bench(fn, warmup, rep):
    """Median milliseconds of fn() (triton.testing.do_bench: CUDA events, L2 flushed between runs; on a CPU,
    for --smoke, the median of 3 wall-clock runs)."""
    if not CUDA:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def attn_flops(B, H, T, S, D, causal):
    f = 4.0 * B * H * T * S * D
    return f / 2 if causal else f


def try_bench(fn, args):
    try:
        fn()  # compile / first call outside the timing
        sync()
        return bench(fn, args.warmup, args.rep), ""
    except Exception as exc:  # backend not available for this shape/GPU, OOM, ...
        sync()
        return float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def attention_config_rows(args, dev_name, B, H, HKV, T, D):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from headscore.kernels import gated_attention

    dtype = getattr(torch, args.dtype)
    causal = not args.no_causal
    torch.manual_seed(0)
    q = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(B, HKV, T, D, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(B, HKV, T, D, device=DEVICE, dtype=dtype, requires_grad=True)
    gate = torch.rand(B, H, device=DEVICE, dtype=torch.float32, requires_grad=True)
    dout = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype)
    leaves = [q, k, v, gate]
    gqa = HKV != H

    def fused():
        return gated_attention(q, k, v, gate, causal=causal)

    def sdpa_with(backend):
        def run():
            with sdpa_kernel([backend]):
                return sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)
        return run

    def unfused():
        out = sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)
        return out * gate[:, :, None, None].to(out.dtype)

    impls = [("gated-attn (triton)", fused), ("sdpa-flash", sdpa_with(SDPBackend.FLASH_ATTENTION)),
             ("sdpa-cudnn", sdpa_with(SDPBackend.CUDNN_ATTENTION)), ("sdpa+gate (unfused)", unfused)]
    fl = attn_flops(B, H, T, T, D, causal)
    rows = []
    for name, f in impls:
        def fwd(f=f):
            with torch.no_grad():
                f()

        def fwd_bwd(f=f):
            for t in leaves:
                t.grad = None
            f().backward(dout)

        ms_f, err_f = try_bench(fwd, args)
        ms_fb, err_fb = try_bench(fwd_bwd, args)
        rows.append({
            "device": dev_name, "kind": "attention", "impl": name, "dtype": args.dtype, "causal": causal,
            "B": B, "H": H, "HKV": HKV, "T": T, "D": D,
            "fwd_ms": ms_f, "fwd_tflops": fl / (ms_f * 1e-3) / 1e12 if ms_f == ms_f else float("nan"),
            "fwd_bwd_ms": ms_fb,
            "fwd_bwd_tflops": 3.5 * fl / (ms_fb * 1e-3) / 1e12 if ms_fb == ms_fb else float("nan"),
            "note": err_f or err_fb,
        })
        print_row(rows[-1])
    return rows


def attention_rows(args, dev_name):
    rows = []
    for D in [int(x) for x in args.head_dims.split(",")]:
        H = max(1, args.model_dim // D)
        HKV = args.kv_heads or H
        for T in [int(x) for x in args.seq_lens.split(",")]:
            B = max(1, args.total_tokens // T)
            rows += attention_config_rows(args, dev_name, B, H, HKV, T, D)
            if CUDA:
                torch.cuda.empty_cache()
    return rows


def gate_grad_rows(args, dev_name):
    from gate_grad import gate_grad, gate_grad_torch  # benchmarks/gate_grad.py, next to this script

    dtype = getattr(torch, args.dtype)
    rows = []
    D = 128
    H = max(1, args.model_dim // D)
    for T in [int(x) for x in args.seq_lens.split(",")]:
        B = max(1, args.total_tokens // T)
        o = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype)
        dy = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype)
        base = torch.randn(H, D, device=DEVICE)
        nbytes = 2 * o.numel() * o.element_size()
        impls = [("gate_grad (triton)", gate_grad), ("gate_grad_torch", gate_grad_torch)]
        for name, fn in impls:
            ms, err = try_bench(lambda fn=fn, o=o, dy=dy, base=base: fn(o, dy, base), args)
            rows.append({"device": dev_name, "kind": "gate_grad", "impl": name, "dtype": args.dtype, "B": B, "H": H,
                         "T": T, "D": D, "fwd_ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9 if ms == ms else float("nan"),
                         "note": err})
            print_row(rows[-1])
    return rows


def print_row(r):
    if r["kind"] == "attention":
        print(f"  {r['impl']:<22} D={r['D']:<4} T={r['T']:<6} B={r['B']:<3} H={r['H']:<3} "
              f"fwd {r['fwd_ms']:8.3f} ms {r['fwd_tflops']:7.1f} TFLOP/s | "
              f"fwd+bwd {r['fwd_bwd_ms']:8.3f} ms {r['fwd_bwd_tflops']:7.1f} TFLOP/s  {r['note']}")
    else:
        print(f"  {r['impl']:<22} T={r['T']:<6} B={r['B']:<3} H={r['H']:<3} D={r['D']:<4} "
              f"{r['fwd_ms']:8.4f} ms {r['gbps']:8.1f} GB/s  {r['note']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        print(f"wrote {', '.join(map(str, plot(args.plot_only)))}")
        return 0
    if not CUDA and not args.smoke:
        print("bench_gated_attention.py needs a CUDA GPU (torch.cuda.is_available() is False; "
              f"torch {torch.__version__}, CUDA build: {torch.version.cuda}). Nothing was measured.", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_gated_attention.py needs triton (pip install triton).", file=sys.stderr)
        return 2
    dev_name = torch.cuda.get_device_name() if CUDA else "cpu (smoke)"
    print(f"device: {dev_name} | torch {torch.__version__} | triton {sys.modules['triton'].__version__} | "
          f"dtype {args.dtype} | causal {not args.no_causal} | total tokens {args.total_tokens}")
    rows = []
    if not args.skip_attention:
        print("attention (TFLOP/s: fwd = 4*B*H*T*S*D/2 causal; fwd+bwd = 3.5x that)")
        rows += attention_rows(args, dev_name)
    if not args.skip_gate_grad:
        print("gate gradient reduction over o, dy [B, T, H, D]")
        rows += gate_grad_rows(args, dev_name)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("device", "kind", "impl"), k))
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else v) for k, v in r.items()})
    print(f"wrote {len(rows)} rows to {out}")
    if not args.skip_attention:
        print(f"wrote {', '.join(map(str, plot(out)))}")
    return 0


def plot(csv_path) -> list[Path]:
    """TFLOP/s against sequence length per implementation (forward; forward + backward), next to the CSV."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from headscore.figures import save_figure

    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "attention"]
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in zip(axes, ("fwd_tflops", "fwd_bwd_tflops"), ("forward", "forward + backward"), strict=True):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            for d in sorted({int(r["D"]) for r in rows}):
                pts = sorted((int(r["T"]), float(r[key] or "nan")) for r in rows
                             if r["impl"] == impl and int(r["D"]) == d)
                ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=f"{impl}, D={d}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T (batch x T fixed)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[1].legend(fontsize=8)
    device = rows[0]["device"] if rows else "?"
    fig.suptitle(f"Gated attention vs SDPA, {rows[0]['dtype'] if rows else ''}, causal - {device}")
    return save_figure(fig, Path(csv_path).with_suffix(""))


if __name__ == "__main__":
    sys.exit(main())
