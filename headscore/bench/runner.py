"""The bench run: every method once as warm-up, then ``repeats`` rounds interleaving the methods (round
robin, so load drift on a shared machine hits all of them alike), the median reported; then agreement
with batched zero ablation and peak memory (:mod:`.memory`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from ..compare import compare
from ..patch import head_layout
from ..results import HeadScores
from .memory import measure_memory_here, measure_memory_subprocess, memory_fn
from .methods import Context, Method, Output
from .registry import DEFAULT_METHODS, HEAVY, LABELS, resolve
from .tables import Row, machine_info, versions


def _mean_spearman(scores: HeadScores, truth: HeadScores) -> float:
    return statistics.fmean(a.spearman for a in compare(scores, truth).values())


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _agreement(rows: dict[str, Row], outputs: dict[str, Output]) -> None:
    """Spearman vs batched ablation, sampled sweeps vs batched ablation, attributions vs taylor: into the rows."""
    truth = outputs.get("ablate-batched")
    truth_scores = truth.scores if truth else None
    if truth_scores is not None:
        for name, out in outputs.items():
            if out.scores is not None and name != "ablate-batched":
                rows[name].spearman = _mean_spearman(out.scores, truth_scores)
            if out.partial:
                gap = max(abs(v - float(truth_scores.values[t, i // truth_scores.num_heads,
                                                             i % truth_scores.num_heads]))
                          for i, per_task in out.partial.items() for t, v in enumerate(per_task))
                rows[name].note += f"; max |diff| vs batched ablation on sampled heads {gap:.1e}"
    taylor = outputs.get("taylor")
    if taylor is not None and taylor.scores is not None:
        for name, out in outputs.items():
            if out.scores is not None and name.endswith("attribution"):
                gap = float((out.scores.values - taylor.scores.values).abs().max())
                rows[name].note = (rows[name].note + "; " if rows[name].note else "") + \
                    f"max |diff| vs headscore taylor {gap:.1e}"


def run_bench(ctx: Context, methods: Sequence[str] = DEFAULT_METHODS, *, repeats: int = 3, warmup: int = 1,
              memory: str = "auto", memory_args: dict | None = None, memory_timeout: float = 900,
              log: Callable[[str], None] | None = None) -> dict:
    """Time (median of ``repeats`` interleaved rounds after ``warmup``), measure memory and agreement.

    ``memory``: ``subprocess`` (one fresh process per method; needs ``memory_args`` naming the
    model, tasks, ...: :func:`.memory.worker_args`), ``inprocess``, ``auto`` (subprocess when
    ``memory_args`` is given, else in process) or ``off``.
    """
    log = log or (lambda _msg: None)
    rows: dict[str, Row] = {}
    fns: dict[str, Method] = {}
    for name in methods:
        fn = resolve(name)
        if isinstance(fn, str):
            rows[name] = Row(name, LABELS.get(name, name), f"unavailable: {fn}")
        else:
            fns[name] = fn
            rows[name] = Row(name, LABELS.get(name, name), "ok")
    ctx.prep  # noqa: B018
    outputs: dict[str, Output] = {}

    def once(name: str) -> None:
        start = time.perf_counter()
        try:
            out = fns[name](ctx)
        except Exception as exc:  # noqa: BLE001 - one failing method must not sink the table
            rows[name].status = f"error: {_error(exc)}"
            fns.pop(name)
            return
        if ctx.lm.device.type == "cuda":
            torch.cuda.synchronize(ctx.lm.device)
        elapsed = time.perf_counter() - start
        rows[name].times.append(out.seconds if out.seconds is not None else elapsed)
        if out.note:
            rows[name].note = out.note
            rows[name].status = "extrapolated" if "extrapolated" in out.note else rows[name].status
        outputs.setdefault(name, out)

    for name in list(fns):
        setup = getattr(fns[name], "setup", None)
        if setup is not None:
            log(f"setup (not timed): {name}")
            try:
                setup(ctx)
            except Exception as exc:  # noqa: BLE001
                rows[name].status = f"error in setup: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                fns.pop(name)
    heavy = HEAVY if ctx.full_ablation else frozenset()
    light = [m for m in methods if m in fns and m not in heavy]
    for r in range(warmup):
        for name in [m for m in light if m in fns]:
            log(f"warm-up {r + 1}/{warmup}: {name}")
            once(name)
    for row in rows.values():
        row.times.clear()
    for r in range(repeats):
        for name in [m for m in light if m in fns]:
            log(f"round {r + 1}/{repeats}: {name}")
            once(name)
    for name in [m for m in methods if m in fns and m in heavy]:  # full sweeps: once
        log(f"once: {name}")
        once(name)
    for row in rows.values():
        if row.times:
            row.seconds = statistics.median(row.times)
    _agreement(rows, outputs)

    if memory == "auto":
        memory = "subprocess" if memory_args is not None else "inprocess"
    if ctx.lm.device.type == "cuda" and memory == "subprocess":
        memory = "inprocess"
    if memory != "off":
        for name in [m for m in methods if m in fns]:
            log(f"memory: {name}")
            if memory == "subprocess":
                rows[name].peak_mib, rows[name].memory_how = measure_memory_subprocess(name, memory_args,
                                                                                       memory_timeout)
            else:
                rows[name].peak_mib, rows[name].memory_how = measure_memory_here(memory_fn(name, fns[name]), ctx)
                rows[name].memory_how += " (in process)"

    layout = head_layout(ctx.lm.model)
    prep = ctx.prep
    return {
        "model": ctx.lm.name, "device": str(ctx.lm.device), "dtype": str(next(ctx.lm.model.parameters()).dtype),
        "layers": layout.num_layers, "heads_per_layer": layout.num_heads,
        "heads": layout.num_layers * layout.num_heads, "examples": len(prep.examples), "tasks": prep.tasks,
        "tokens": sum(len(t.ids) for t in prep.tokenized), "batch_size": ctx.batch_size,
        "rows_per_pass": ctx.rows_per_pass, "sample_heads": ctx.sample_heads, "repeats": repeats,
        "warmup": warmup, "machine": machine_info(), "versions": versions(),
        "rows": [asdict(r) for r in rows.values()],
    }
