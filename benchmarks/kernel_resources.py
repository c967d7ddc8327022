"""Registers, spills and shared memory of every autotune config of the fused attention kernels, without a GPU.

Each config the pruner keeps (``headscore.kernels.gated_attention._CONFIGS`` through ``_prune_configs``)
is compiled by Triton's own compiler for an NVIDIA target (sm_80 = A100, sm_90 = H100) on the CPU; the
cubin's resource usage is read with the ``cuobjdump`` that ships with Triton. A config spills when its
stack or local memory is non-zero; shared memory is Triton's own count, against the target's per-block
limit (227 KiB on sm_90, 163 KiB on sm_80).

    python benchmarks/kernel_resources.py --head-dims 128 --dtypes bf16 --targets 90

Runs without TRITON_INTERPRET (it compiles real GPU code). A first step of issue 14's compile checks:
it reports; it does not yet fail a build.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"bf16": ("*bf16", 2), "fp16": ("*fp16", 2), "fp32": ("*fp32", 4)}
MODEL_DTYPE_ARGS = {"Q", "K", "V", "Out", "A", "DO", "DQ", "DK", "DV"}
FP32_ARGS = {"Gate", "Base", "Lse", "Delta", "DGatePart", "DBasePart"}


def _block_d(head_dim: int) -> int:
    """BLOCK_D as the launchers compute it (head dim rounded up to a power of 2, at least 16)."""
    from headscore.kernels._compat import next_pow2

    return max(16, next_pow2(head_dim))


def _module():
    return importlib.import_module("headscore.kernels.gated_attention")


def _signature(fn, dtype: str, const: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in MODEL_DTYPE_ARGS:
            sig[name] = DTYPES[dtype][0]
        elif name in FP32_ARGS:
            sig[name] = "*fp32"
        elif name == "Mask":
            sig[name] = "*u8"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def kept_configs(kernel: str, head_dim: int, dtype: str) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the configs the pruner keeps for this head dim and dtype."""
    import triton

    ga = _module()
    _, table = ga._CONFIGS[kernel]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]

    class _Q:  # the pruner reads only Q.element_size()
        def element_size(self):
            return DTYPES[dtype][1]

    kept = ga._prune_configs(configs, {"Q": _Q()}, BLOCK_D=_block_d(head_dim))
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


def compile_one(job: tuple) -> dict:
    """Compile one (kernel, config, head dim, dtype, target) and read its resource usage."""
    kernel, (bm, bn, warps, stages), head_dim, dtype, target = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ga = _module()
    fn = ga._CONFIGS[kernel][0]
    const = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), CAUSAL=True, HAS_MASK=True,
                 DOT_PREC="ieee" if dtype == "fp32" else "tf32", EMU_BF16=False, BLOCK_M=bm, BLOCK_N=bn)
    if kernel == "fwd":
        const["HAS_BASE"] = True
    const = {k: v for k, v in const.items() if k in fn.arg_names}
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, const),
                    constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    row = {"kernel": kernel, "BLOCK_M": bm, "BLOCK_N": bn, "warps": warps, "stages": stages, "D": head_dim,
           "dtype": dtype, "sm": target}
    start = time.perf_counter()
    try:
        cc = triton.compile(src, target=GPUTarget("cuda", target, 32),
                            options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:  # a config the compiler refuses (e.g. out of shared memory)
        row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
        return row
    row["compile_s"] = round(time.perf_counter() - start, 1)
    row["shared"] = int(cc.metadata.shared)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cc.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
    for key in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", usage)
        row[key.lower()] = int(m.group(1)) if m else -1
    row["spills"] = row["stack"] > 0 or row["local"] > 0
    row["smem_ok"] = row["shared"] <= SMEM_LIMIT[target]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default="fwd,dkdv,dq")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--targets", default="80,90")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: this compiles real GPU code", file=sys.stderr)
        return 2
    jobs = [(k, cfg, d, dt, int(t)) for k in args.kernels.split(",") for d in map(int, args.head_dims.split(","))
            for dt in args.dtypes.split(",") for cfg in kept_configs(k, d, dt) for t in args.targets.split(",")]
    print(f"{len(jobs)} compiles on {args.workers} workers")
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(compile_one, jobs))
    print("| kernel | BLOCK_M x BLOCK_N | warps | stages | D | dtype | sm | registers | stack B | local B | "
          "shared KiB | spills | shared fits |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['kernel']} | {r['BLOCK_M']} x {r['BLOCK_N']} | {r['warps']} | {r['stages']} | {r['D']} | "
                  f"{r['dtype']} | {r['sm']} | compile failed: {r['error']} | | | | | |")
            continue
        print(f"| {r['kernel']} | {r['BLOCK_M']} x {r['BLOCK_N']} | {r['warps']} | {r['stages']} | {r['D']} | "
              f"{r['dtype']} | {r['sm']} | {r['reg']} | {r['stack']} | {r['local']} | {r['shared'] / 1024:.0f} | "
              f"{'**yes**' if r['spills'] else 'no'} | {'yes' if r['smem_ok'] else '**no**'} |")
    bad = [r for r in rows if "error" in r or r["spills"] or not r["smem_ok"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} configs compile without spills within the shared-memory limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
