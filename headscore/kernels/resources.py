"""Compile check of the fused-attention kernels for NVIDIA targets, on a machine without a GPU.

Every config a kernel may run with (``headscore.kernels.configs``) is compiled by Triton's own compiler
(``triton.compile`` with an sm_80 or sm_90 target; Triton ships ptxas) with **the specialisation a real
call gets**: the launchers are run on CPU tensors shaped like a transformers model's (q, k, v as
[B, H, T, D] views of [B, T, H, D]; GQA; key padding; a baseline whose gradient is wanted) while they
record their launches instead of running them, and each recorded call goes through Triton's own
argument binder (unit strides become constants, 16-divisible ints and pointers get alignment hints).
Compiling with a bare signature instead, as a first version of this check did, gives kernels without
vectorised loads that spill everywhere and say nothing about the GPU's.

Each compile's registers, stack frame and local memory are read from the cubin with the ``cuobjdump``
that ships with Triton; a config spills when its stack or local memory is non-zero. Shared memory is
Triton's own count, against the target's limit per block.

    python -m headscore.kernels.resources                      # check every kept config; exit 1 if one fails
    python -m headscore.kernels.resources --markdown docs/kernel-resources.md
    python -m headscore.kernels.resources --explore            # every candidate; prints the table to keep

Needs Triton and no ``TRITON_INTERPRET`` (it compiles GPU code; nothing runs).
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
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from . import configs
from ._compat import block_d

HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The calls each config is compiled for: Triton compiles a kernel anew for each specialisation, and these
# differ in the ones that change its registers most (a sequence length divisible by 16 or not, which decides
# the alignment hints on T and on every row offset of the mask and lse: up to 127 registers apart; GQA, or
# MHA, whose group of 1 becomes a constant that removes the dK/dV kernel's loop over the group; a batch of 1,
# another constant). (B, Hq, Hkv, T) each.
SHAPES = {"T512-gqa": (2, 8, 2, 512), "T250-gqa": (2, 8, 2, 250), "T250-mha": (1, 8, 8, 250)}

# Candidates for --explore, per kernel: the configs that the table is chosen from.
CANDIDATES: dict[str, list[configs.Config]] = {
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 3), (64, 64, 4, 2),
            (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 4), (64, 32, 4, 2), (64, 32, 8, 2),
            (32, 32, 4, 2), (32, 32, 4, 1), (32, 32, 8, 1), (32, 16, 8, 1), (16, 32, 8, 1), (32, 16, 4, 1),
            (16, 16, 8, 1), (16, 16, 4, 1)],
    "pre": [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1),
            (32, 32, 8, 1), (32, 16, 8, 1), (16, 32, 8, 1), (32, 16, 4, 1), (16, 16, 8, 1), (16, 16, 4, 1)],
    "dkdv": [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 4, 5), (32, 128, 4, 3), (64, 64, 8, 3),
             (64, 64, 8, 2), (64, 64, 4, 3), (32, 64, 8, 3), (32, 64, 8, 2), (32, 64, 4, 4), (32, 64, 4, 2),
             (32, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1), (32, 32, 8, 1), (32, 16, 8, 1), (16, 32, 8, 1),
             (16, 32, 4, 1), (16, 16, 8, 1), (16, 16, 4, 1)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 4, 5), (128, 32, 4, 3), (64, 64, 8, 2),
           (64, 64, 4, 3), (64, 32, 8, 2), (64, 32, 4, 4), (64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1),
           (32, 32, 8, 1), (32, 16, 8, 1), (16, 32, 8, 1), (32, 16, 4, 1), (16, 16, 8, 1), (16, 16, 4, 1)],
}


def _attention():
    # the module, not the function that headscore.kernels exports under the same name
    return importlib.import_module("headscore.kernels.gated_attention")


def recorded_calls(head_dim: int, dtype: torch.dtype, shape: str) -> dict[str, tuple[tuple, dict]]:
    """``{kernel: (args, meta)}`` exactly as the launchers pass them for one forward and backward of a call of
    ``SHAPES[shape]`` (key padding on, a baseline whose gradient is wanted)."""
    ga = _attention()
    batch, hq, hkv, t = SHAPES[shape]

    def heads(h: int) -> torch.Tensor:
        return torch.zeros(batch, t, h, head_dim, dtype=dtype).transpose(1, 2)

    q, k, v = heads(hq), heads(hkv), heads(hkv)
    gate = torch.ones(batch, hq)
    base = torch.zeros(hq, head_dim)
    mask = torch.ones(batch, t, dtype=torch.bool).view(torch.uint8)
    scale = head_dim ** -0.5
    with ga.recording_launches() as calls:
        out, lse = ga._forward(q, k, v, gate, base, mask, True, scale)
        ga._backward(heads(hq), q, k, v, out, lse, gate, base, mask, True, scale, need_qkv=True, base_grad=True)
    return {name: (args, meta) for name, _, args, meta in calls}


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_one(job: tuple) -> dict:
    """Compile one (kernel, config, target) from a recorded call; its resource usage as a row."""
    name, args, meta, (bm, bn, warps, stages), target, head_dim, dtype, shape = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _attention()._KERNELS[name]
    row = {"kernel": name, "BLOCK_M": bm, "BLOCK_N": bn, "warps": warps, "stages": stages, "D": head_dim,
           "dtype": dtype, "target": target, "shape": shape}
    cap = configs.TARGETS[target]
    gpu = GPUTarget("cuda", cap[0] * 10 + cap[1], 32)
    backend = make_backend(gpu)
    kwargs = {**meta, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu,
                                  options=options.__dict__)
    except Exception as exc:  # a config the compiler refuses outright
        row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
        return row
    row["compile_s"] = round(time.perf_counter() - start, 1)
    row["shared"] = int(compiled.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    for key in ("REG", "STACK", "LOCAL"):
        found = re.search(rf"\b{key}:(\d+)", usage)
        if found is None:
            raise RuntimeError(f"cuobjdump printed no {key} for {name}: {usage[:300]}")
        row[key.lower()] = int(found.group(1))
    row["spills"] = row["stack"] > 0 or row["local"] > 0
    row["shared_ok"] = row["shared"] <= configs.SHARED_LIMIT[target]
    return row


def clean(row: dict) -> bool:
    """Compiled, no spills, shared memory within the target's limit."""
    return "error" not in row and not row["spills"] and row["shared_ok"]


def estimated_shared(kernel: str, config: configs.Config, block_d: int, element_size: int) -> int:
    """Bytes of shared memory a config's pipelined tiles take: the resident tile plus two streamed tiles per
    stage, each [rows, BLOCK_D] (Triton's own count for the forward and preprocessing kernels). --explore
    skips candidates estimated at more than 1.5x the limit: they cannot fit, and their compiles take minutes."""
    bm, bn, _, stages = config
    resident, streamed = (2 * bn, bm) if kernel == "dkdv" else (bm, bn)
    return element_size * block_d * (resident + 2 * streamed * stages)


def jobs(kernels: Iterable[str], head_dims: Iterable[int], dtypes: Iterable[str], targets: Iterable[str],
         explore: bool = False) -> list[tuple]:
    """One job per (kernel, config, head dim, dtype, target): the kept configs, or every candidate that
    may fit."""
    out = []
    for d in head_dims:
        for dt in dtypes:
            elt = DTYPES[dt].itemsize
            for shape in SHAPES:
                calls = recorded_calls(d, DTYPES[dt], shape)
                for name in kernels:
                    args, meta = calls[name]
                    for target in targets:
                        if explore:
                            limit = 1.5 * configs.SHARED_LIMIT[target]
                            cfgs = [c for c in CANDIDATES[name]
                                    if estimated_shared(name, c, block_d(d), elt) <= limit]
                        else:
                            cfgs = configs.kept(name, block_d(d), elt, configs.TARGETS[target])
                        out += [(name, args, meta, c, target, d, dt, shape) for c in cfgs]
    return out


def run(job_list: list[tuple], workers: int) -> list[dict]:
    """Compile every job, ``workers`` processes at once."""
    if workers <= 1:
        return [compile_one(j) for j in job_list]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, job_list))


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| kernel | BLOCK_M x BLOCK_N | warps | stages | D | dtype | target | call | registers | stack B | "
             "local B | shared KiB | of limit | clean |",
             "|---|---|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"] != "fwd", r["kernel"] != "pre", r["kernel"], r["D"], r["dtype"],
                                         r["target"], -r["BLOCK_M"] * r["BLOCK_N"], r["shape"])):
        head = (f"| {r['kernel']} | {r['BLOCK_M']} x {r['BLOCK_N']} | {r['warps']} | {r['stages']} | {r['D']} | "
                f"{r['dtype']} | {r['target']} | {r['shape']} |")
        if "error" in r:
            lines.append(f"{head} compile failed: {r['error']} | | | | | | **no** |")
            continue
        limit = configs.SHARED_LIMIT[r["target"]]
        lines.append(f"{head} {r['reg']} | {r['stack']} | {r['local']} | {r['shared'] / 1024:.0f} | "
                     f"{r['shared'] / limit:.0%} | {'yes' if clean(r) else '**no**'} |")
    return "\n".join(lines)


def document(rows: list[dict], seconds: float) -> str:
    """docs/kernel-resources.md: how the table was made, and the table."""
    import triton

    bad = [r for r in rows if not clean(r)]
    limits = ", ".join(f"{t} {v // 1024} KiB" for t, v in configs.SHARED_LIMIT.items())
    return f"""# Kernel resources: registers, spills and shared memory of every config the kernels may run with

Generated by `python -m headscore.kernels.resources --markdown docs/kernel-resources.md` (Triton
{triton.__version__}, {len(rows)} compiles in {seconds:.0f} s on this project's 2-core CPU, no GPU; Triton
caches each compile, so with a warm cache a rerun takes seconds); CI runs the same check
(`tests/test_kernel_resources.py`) and fails on a config that spills or does not fit.

Each config of `headscore/kernels/configs.py` is compiled by Triton's own compiler for sm_80 (A100) and
sm_90 (H100/H200) with the specialisation of three real calls (q, k, v as transformers passes them, key
padding, a baseline whose gradient is wanted): `T512-gqa` (batch 2, 8 query heads on 2 kv heads, 512
tokens), `T250-gqa` (the same with 250 tokens: a length not divisible by 16 takes away the alignment hints
on every row offset) and `T250-mha` (batch 1, 8 heads each with its own kv head: a group of 1, which Triton
folds into a constant). Its resource usage is read from the cubin by the `cuobjdump` that ships with
Triton. "stack" and "local" are the per-thread stack frame and local memory: non-zero means registers
spilled. Shared memory is Triton's count against the limit per block ({limits}). Head dims that are not
powers of two use the table of the next power of two (their own compiles are not checked here).

How the configs were chosen: `python -m headscore.kernels.resources --explore` compiles every candidate of
`resources.CANDIDATES` (1,081 compiles at T = 512 on 2026-12-01: 765 clean); the table keeps the likely
fastest clean ones (see `configs.py`). Not checked: calls without key padding or without a baseline (fewer
loads and registers), per-position gate gradients (one more store), and other lengths' alignments.

**{len(rows) - len(bad)} of {len(rows)} compiles clean.** Kernels: `fwd` (forward), `pre` (the backward's
preprocessing step: Delta, the gate gradient, A recomputed where the gate is not 1), `dkdv`, `dq`.

{markdown(rows)}
"""


def explored_table(rows: list[dict]) -> str:
    """Per (kernel, target, BLOCK_D, element size), the candidates clean for every dtype of that size and every
    call shape, in candidate order, as Python (the raw material of ``configs._TABLE``)."""
    dirty = {(r["kernel"], r["target"], r["D"], DTYPES[r["dtype"]].itemsize, r["BLOCK_M"], r["BLOCK_N"], r["warps"],
              r["stages"]) for r in rows if not clean(r)}
    table: dict[tuple, list] = {}
    for r in rows:
        key = (r["kernel"], r["target"], block_d(r["D"]), DTYPES[r["dtype"]].itemsize)
        config = (r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"])
        table.setdefault(key, [])
        if (*key[:2], r["D"], key[3], *config) not in dirty and config not in table[key]:
            table[key].append(config)
    return "\n".join(f"    {k!r}: {v!r}," for k, v in sorted(table.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headscore.kernels.resources", description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default=",".join(configs.KERNELS))
    p.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--targets", default=",".join(configs.TARGETS))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--explore", action="store_true", help="compile every candidate and print the clean ones")
    p.add_argument("--markdown", type=Path, help="write the table of every compile to this file")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this compiles GPU code", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to keep it quiet
    job_list = jobs(args.kernels.split(","), [int(d) for d in args.head_dims.split(",")], args.dtypes.split(","),
                    args.targets.split(","), explore=args.explore)
    print(f"{len(job_list)} compiles on {args.workers} workers", flush=True)
    start = time.perf_counter()
    rows = run(job_list, args.workers)
    seconds = time.perf_counter() - start
    if args.markdown:
        args.markdown.write_text(document(rows, seconds))
    else:
        print(markdown(rows))
    bad = [r for r in rows if not clean(r)]
    for r in bad if not args.explore else []:
        print(f"NOT CLEAN: {r}")
    print(f"{len(rows) - len(bad)} of {len(rows)} compiles clean (no spills, shared memory within the limit) "
          f"in {seconds:.0f} s")
    if args.explore:
        print(explored_table(rows))
        return 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
