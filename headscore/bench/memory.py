"""Peak memory of one method: the peak above the loaded model.

On the CPU, the RSS high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) of a fresh
subprocess per method (``python -m headscore.bench --memory-worker NAME --worker-args JSON``, see
:func:`worker_main`), measured on its second run: the first one pages in the memory-mapped weights, a
cost common to all. The worker runs with glibc's malloc told to map every block of 64 KiB or more on its
own and to keep one arena (:data:`MALLOC_ENV`), so a freed tensor leaves the RSS at once and the high-water
mark is the peak of live memory: with malloc's defaults, freed blocks linger in per-thread arenas and the
same run of SmolLM2's floor read 686 and 733 MiB (taylor 725 and 737); with these settings 566 and 566
(taylor 561 and 561). On CUDA, ``torch.cuda.max_memory_allocated`` in process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from ..data.tasks import load_tasks
from ..models import load_model
from .methods import Context, Method, Output, sampled_ablation
from .registry import resolve

MARKER = "HEADSCORE_MEMORY "  # the worker's result line on stdout
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
"""glibc malloc settings of the memory worker (a variable the caller set wins): see the module docstring."""


def _proc_status(key: str) -> float | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def measure_memory_here(fn: Method, ctx: Context) -> tuple[float | None, str]:
    """Peak memory (MiB) of one run of ``fn`` above what the process holds before it, and how it was read."""
    device = ctx.lm.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(ctx)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda max_memory_allocated"
    _trim()
    if _reset_hwm():
        base = _proc_status("VmRSS")
        fn(ctx)
        peak = _proc_status("VmHWM")
        return (None if base is None or peak is None else peak - base), "VmHWM - VmRSS"
    import resource  # Unix only: imported where it is needed, so that the bench imports everywhere

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fn(ctx)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return after - before, "ru_maxrss growth (lower bound)"


def sampled_batched(ctx: Context) -> Output:
    """Batched ablation over enough sampled heads to fill whole passes (memory measurement only): the same
    peak as the full sweep, one pass of ``rows_per_pass`` rows."""
    per_pass = max(1, ctx.rows_per_pass // ctx.batch_size)
    sub = dataclasses.replace(ctx, sample_heads=max(per_pass, ctx.sample_heads or 0), full_ablation=False)
    return sampled_ablation(sub, "batched")


def memory_fn(name: str, fn: Method) -> Method:
    """What to run to measure method ``name``'s peak: ``fn`` itself, or for the full batched ablation a
    sampled one with the same peak."""
    return sampled_batched if name == "ablate-batched" else fn


def worker_args(ctx: Context, *, model: str, device: str, dtype: str, tasks: str,
                columns: dict[str, str] | None = None) -> dict:
    """The JSON a memory worker rebuilds ``ctx`` from: the model and task specs as the user gave them
    (``load_model`` and ``load_tasks`` arguments) and the context's settings."""
    return {"model": model, "device": device, "dtype": dtype, "tasks": tasks, "columns": columns,
            "batch_size": ctx.batch_size,
            "max_examples": ctx.max_examples, "rows_per_pass": ctx.rows_per_pass,
            "sample_heads": ctx.sample_heads, "full_ablation": ctx.full_ablation}


def measure_memory_subprocess(name: str, args: dict, timeout: float) -> tuple[float | None, str]:
    """Peak memory of method ``name`` in a fresh ``python -m headscore.bench --memory-worker`` process
    (``args``: :func:`worker_args`), and how it was read (or why it could not be)."""
    cmd = [sys.executable, "-m", __package__, "--memory-worker", name, "--worker-args", json.dumps(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**MALLOC_ENV, **os.environ})
    except subprocess.TimeoutExpired:
        return None, f"memory worker timed out after {timeout:.0f}s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            doc = json.loads(line[len(MARKER):])
            return doc["mib"], doc["how"] + " (fresh subprocess)"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return None, f"memory worker failed: {tail[0]}"


def worker_main(name: str, args: dict) -> None:
    """The memory worker: load the model and tasks, run method ``name`` once (warm-up), then print its
    measured peak as one ``HEADSCORE_MEMORY {json}`` line."""
    lm = load_model(args["model"], device=args["device"], dtype=args["dtype"])
    ctx = Context(lm, load_tasks(args["tasks"], args.get("columns")), args["batch_size"], args["max_examples"],
                  args["rows_per_pass"], args["sample_heads"], args.get("full_ablation", True))
    ctx.prep  # noqa: B018 - tokenise before measuring
    fn = resolve(name)
    if isinstance(fn, str):
        raise SystemExit(f"unavailable: {fn}")
    setup = getattr(fn, "setup", None)
    if setup is not None:
        setup(ctx)  # one-off conversion (e.g. TransformerLens' bridge): not part of the peak
    fn = memory_fn(name, fn)
    fn(ctx)  # warm-up: pages in the (memory-mapped) weights and one-off caches, which every method would pay
    mib, how = measure_memory_here(fn, ctx)
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        how += ", malloc: mmap from 64 KiB, one arena"
    print(MARKER + json.dumps({"mib": mib, "how": how}), flush=True)
