"""``headscore bench``: all-head scoring against the alternatives, on one model, data set and device, in one run.

Methods (each scores every head of every task, except the floor):

- ``floor``: a plain forward + backward pass with input gradients only (the embeddings'
  output requires grad, no weight gradients): the least any gradient method can cost;
- ``taylor``: :func:`headscore.score` (one forward + one backward pass per batch);
- ``ablate-batched`` / ``ablate-sequential``: :func:`headscore.ablate`, the ground truth;
  the sequential (naive, one forward pass per head) sweep may be timed on a sample of heads
  and extrapolated to all L*H heads (marked ``extrapolated``);
- ``hooks-attribution``: gradient x activation at each ``o_proj`` input, collected with plain
  torch hooks, the way activation-caching libraries are used (no dependency; equals taylor);
- peers from ``benchmarks/peers.py`` (nnsight, TransformerLens), loaded lazily: a peer that
  cannot be imported is reported as ``unavailable: <reason>``.

Timing: every method runs once as warm-up, then ``repeats`` rounds interleave the methods
(round robin, so load drift on a shared machine hits all of them alike); the median is
reported. Memory: the peak above the loaded model, on the CPU the RSS high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) of a fresh subprocess per method, measured on
its second run (the first one pages in the memory-mapped weights, a cost common to all), on
CUDA ``torch.cuda.max_memory_allocated``. Agreement: mean over tasks of the Spearman
correlation with batched zero ablation (:func:`headscore.compare`).
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .compare import compare
from .errors import HeadscoreError
from .loss import example_losses
from .methods.ablation import clean_losses, gated_losses, single_head_gates
from .models import LoadedModel
from .patch import head_layout, patch
from .prepared import Prepared, prepare
from .results import HeadScores, library_versions

DEFAULT_METHODS = ("floor", "taylor", "ablate-batched", "ablate-sequential", "hooks-attribution",
                   "nnsight-attribution", "tl-attribution", "tl-ablation")
HEAVY = frozenset({"ablate-batched"})  # timed once (no warm-up, no repeats): minutes on a CPU
PEERS_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


@dataclass
class Context:
    """What every method gets: the model, the examples and the run's settings."""

    lm: LoadedModel
    examples: list
    batch_size: int = 8
    max_examples: int | None = None
    rows_per_pass: int = 64
    sample_heads: int | None = 16
    full_ablation: bool = True  # False: batched ablation also timed on the head sample (no Spearman)
    _prep: Prepared | None = field(default=None, repr=False)

    @property
    def prep(self) -> Prepared:
        """The tokenised examples (cached: tokenising is not what is being measured)."""
        if self._prep is None:
            self._prep = prepare(self.lm, self.examples, max_examples=self.max_examples)
        return self._prep

    @property
    def num_heads_total(self) -> int:
        layout = head_layout(self.lm.model)
        return layout.num_layers * layout.num_heads

    def head_sample(self) -> list[int] | None:
        """Flat indices l*H + h of the heads a sampled sweep measures (None: all heads)."""
        n = self.num_heads_total
        if self.sample_heads is None or self.sample_heads >= n:
            return None
        k = max(1, self.sample_heads)
        return sorted({int(round(i * (n - 1) / max(1, k - 1))) for i in range(k)}) if k > 1 else [0]


@dataclass
class Output:
    """What one run of a method returns: its scores (None for the floor or a partial sweep) and,
    for a sampled sweep, the extrapolated seconds for all heads."""

    scores: HeadScores | None = None
    seconds: float | None = None
    note: str = ""
    partial: dict | None = None  # {flat head index: [T] per-task mean delta} for a sampled sweep


Method = Callable[[Context], Output]


# ----------------------------------------------------------------------------- built-in methods

def target_losses(logits: torch.Tensor, batch) -> torch.Tensor:
    """Mean target NLL per row [B] from full logits [B, T, V]: the loss :func:`example_losses` computes."""
    labels = batch.input_ids[:, 1:]
    mask = batch.target_mask[:, 1:].to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits[:, :-1].to(mask.dtype), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum(1) / mask.sum(1)


def run_floor(ctx: Context) -> Output:
    """Forward + backward to the embeddings' output only (weights frozen): the cost floor."""
    model = ctx.lm.model
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for batch in ctx.prep.batches(ctx.batch_size, progress=False):
            example_losses(model, batch).sum().backward()
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return Output()


def run_taylor(ctx: Context) -> Output:
    """headscore.score(method='taylor') over all heads."""
    from .api import score

    return Output(score(ctx.lm, ctx.examples, method="taylor", batch_size=ctx.batch_size,
                        max_examples=ctx.max_examples, progress=False))


def run_ablate_batched(ctx: Context) -> Output:
    """headscore.ablate(mode='batched'): every head, rows of one pass carry different gates."""
    from .api import ablate

    if not ctx.full_ablation:
        return sampled_ablation(ctx, "batched")

    return Output(ablate(ctx.lm, ctx.examples, mode="batched", batch_size=ctx.batch_size,
                         rows_per_pass=ctx.rows_per_pass, max_examples=ctx.max_examples, progress=False))


def sampled_ablation(ctx: Context, mode: str) -> Output:
    """Ablate a sample of heads (one forward pass per head when sequential) and extrapolate the
    time to all heads: clean passes + (time of the sampled heads) * (L*H / sample)."""
    sample = ctx.head_sample()
    if sample is None:
        from .api import ablate

        return Output(ablate(ctx.lm, ctx.examples, mode=mode, batch_size=ctx.batch_size,
                             rows_per_pass=ctx.rows_per_pass, max_examples=ctx.max_examples, progress=False))
    prep = ctx.prep
    layout = head_layout(ctx.lm.model)
    rows = single_head_gates(layout.num_layers, layout.num_heads)[sample]
    acc_rows = _RowAccumulator(len(prep.tasks), len(sample))
    t_clean = t_heads = 0.0
    with patch(ctx.lm.model) as heads:
        for batch in prep.batches(ctx.batch_size, progress=False):
            t0 = time.perf_counter()
            clean = clean_losses(ctx.lm.model, heads, batch)
            t1 = time.perf_counter()
            ablated = gated_losses(ctx.lm.model, heads, batch, rows, None, mode=mode, max_rows=ctx.rows_per_pass)
            t_heads += time.perf_counter() - t1
            t_clean += t1 - t0
            acc_rows.add(batch.task_index, ablated - clean[None])
    n = ctx.num_heads_total
    return Output(seconds=t_clean + t_heads * n / len(sample),
                  note=f"extrapolated from {len(sample)} of {n} heads",
                  partial=dict(zip(sample, acc_rows.mean().T.tolist(), strict=True)))


class _RowAccumulator:
    """Per-task mean of [K, B] deltas: [T, K]."""

    def __init__(self, tasks: int, k: int):
        self.sum = torch.zeros(tasks, k, dtype=torch.float64)
        self.count = torch.zeros(tasks, dtype=torch.float64)

    def add(self, task_index: torch.Tensor, delta: torch.Tensor) -> None:
        idx = task_index.cpu().long()
        self.sum.index_add_(0, idx, delta.T.double())
        self.count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def mean(self) -> torch.Tensor:
        return self.sum / self.count[:, None]


def run_ablate_sequential(ctx: Context) -> Output:
    """headscore's sequential (naive) ablation: one forward pass per head (sampled + extrapolated)."""
    return sampled_ablation(ctx, "sequential")


def o_proj_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The output projection of every attention layer, in layer order (o_proj / out_proj / c_proj / dense)."""
    layers = []
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            continue
        for name in ("o_proj", "out_proj", "c_proj", "dense"):
            proj = getattr(module, name, None)
            if isinstance(proj, torch.nn.Module):
                layers.append((idx, proj))
                break
    if not layers:
        raise HeadscoreError("no attention output projection (o_proj) found")
    return [proj for _, proj in sorted(layers, key=lambda x: x[0])]


def attribution_from_acts(acts: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], num_heads: int) -> torch.Tensor:
    """Per-example -sum_t <act, grad> per head: [B, L, H] from per-layer [B, T, H*D] tensors."""
    out = []
    for a, g in zip(acts, grads, strict=True):
        b, t, _ = a.shape
        out.append(-(a.double() * g.double()).view(b, t, num_heads, -1).sum((1, 3)))
    return torch.stack(out, 1)


def run_hooks_attribution(ctx: Context) -> Output:
    """Gradient x activation at each o_proj input, with plain torch forward pre-hooks and
    ``retain_grad`` (how hook-based libraries cache activations); weights keep their
    ``requires_grad`` as loaded, as a user of those libraries has them."""
    model, prep = ctx.lm.model, ctx.prep
    num_heads = head_layout(model).num_heads
    projs = o_proj_modules(model)
    acc = prep.accumulator()
    for batch in prep.batches(ctx.batch_size, progress=False):
        acts: list[torch.Tensor] = []

        def save(_m, args, acts=acts):
            x = args[0]
            if not x.requires_grad:
                x.requires_grad_(True)
            x.retain_grad()
            acts.append(x)

        handles = [p.register_forward_pre_hook(save) for p in projs]
        try:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            target_losses(logits, batch).sum().backward()
        finally:
            for h in handles:
                h.remove()
        acc.add(batch.task_index, attribution_from_acts([a.detach() for a in acts], [a.grad for a in acts],
                                                       num_heads))
    model.zero_grad(set_to_none=True)
    return Output(prep.result(acc, "hooks-attribution"))


BUILTIN: dict[str, Method] = {
    "floor": run_floor,
    "taylor": run_taylor,
    "ablate-batched": run_ablate_batched,
    "ablate-sequential": run_ablate_sequential,
    "hooks-attribution": run_hooks_attribution,
}

LABELS = {
    "floor": "forward+backward, input grads only (floor)",
    "taylor": "headscore taylor, all heads (one pass)",
    "ablate-batched": "headscore ablation, batched",
    "ablate-sequential": "headscore ablation, sequential (naive)",
    "hooks-attribution": "grad x act via torch hooks on o_proj",
    "nnsight-attribution": "nnsight grad x act (o_proj input .grad)",
    "tl-attribution": "TransformerLens grad x act (hook_z)",
    "tl-ablation": "TransformerLens per-head ablation (hook_z)",
}


def load_peers(path: Path | None = None):
    """The peers module (benchmarks/peers.py), or a string saying why it cannot be loaded."""
    path = PEERS_FILE if path is None else Path(path)
    if not path.is_file():
        return f"{path} not found (peers need a source checkout of headscore)"
    spec = importlib.util.spec_from_file_location("headscore_bench_peers", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure makes the peers unavailable, with the reason
        return f"cannot load {path}: {exc}"
    return module


def resolve(name: str, peers=None) -> Method | str:
    """The method called ``name``, or the reason it is unavailable."""
    if name in BUILTIN:
        return BUILTIN[name]
    peers = load_peers() if peers is None else peers
    if isinstance(peers, str):
        return peers
    if name not in peers.PEERS:
        raise HeadscoreError(f"unknown bench method {name!r}; choose from {', '.join(DEFAULT_METHODS)}")
    reason = peers.unavailable(name)
    return reason if reason else peers.PEERS[name]


# ----------------------------------------------------------------------------- measurement

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
        import ctypes

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
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fn(ctx)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return after - before, "ru_maxrss growth (lower bound)"


def _memory_subprocess(name: str, args: dict, timeout: float) -> tuple[float | None, str]:
    cmd = [sys.executable, "-m", "headscore.bench", "--memory-worker", name, "--worker-args", json.dumps(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"memory worker timed out after {timeout:.0f}s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("HEADSCORE_MEMORY "):
            doc = json.loads(line[len("HEADSCORE_MEMORY "):])
            return doc["mib"], doc["how"] + " (fresh subprocess)"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return None, f"memory worker failed: {tail[0]}"


def _worker_main(name: str, args: dict) -> None:
    from .data.tasks import load_tasks
    from .models import load_model

    lm = load_model(args["model"], device=args["device"], dtype=args["dtype"])
    ctx = Context(lm, load_tasks(args["tasks"]), args["batch_size"], args["max_examples"], args["rows_per_pass"],
                  args["sample_heads"], args.get("full_ablation", True))
    ctx.prep  # noqa: B018 - tokenise before measuring
    fn = resolve(name)
    if isinstance(fn, str):
        raise SystemExit(f"unavailable: {fn}")
    setup = getattr(fn, "setup", None)
    if setup is not None:
        setup(ctx)  # one-off conversion (e.g. TransformerLens' bridge): not part of the peak
    if name == "ablate-batched":
        fn = sampled_batched  # same peak as the full sweep: one pass of rows_per_pass rows
    fn(ctx)  # warm-up: pages in the (memory-mapped) weights and one-off caches, which every method would pay
    mib, how = measure_memory_here(fn, ctx)
    print("HEADSCORE_MEMORY " + json.dumps({"mib": mib, "how": how}), flush=True)


def sampled_batched(ctx: Context) -> Output:
    """Batched ablation over enough sampled heads to fill whole passes (memory measurement only)."""
    per_pass = max(1, ctx.rows_per_pass // ctx.batch_size)
    sub = Context(ctx.lm, ctx.examples, ctx.batch_size, ctx.max_examples, ctx.rows_per_pass,
                  max(per_pass, ctx.sample_heads or 0), False, ctx._prep)
    return sampled_ablation(sub, "batched")


@dataclass
class Row:
    """One method's figures."""

    method: str
    label: str
    status: str  # ok | extrapolated | unavailable: ... | error: ...
    seconds: float | None = None
    times: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    memory_how: str = ""
    spearman: float | None = None
    note: str = ""

    def ratio_to(self, other: Row | None) -> float | None:
        if other is None or not self.seconds or not other.seconds:
            return None
        return self.seconds / other.seconds


def _mean_spearman(scores: HeadScores, truth: HeadScores) -> float:
    return statistics.fmean(a.spearman for a in compare(scores, truth).values())


def run_bench(ctx: Context, methods: Sequence[str] = DEFAULT_METHODS, *, repeats: int = 3, warmup: int = 1,
              memory: str = "auto", memory_args: dict | None = None, memory_timeout: float = 900,
              log: Callable[[str], None] | None = None) -> dict:
    """Time (median of ``repeats`` interleaved rounds after ``warmup``), measure memory and agreement.

    ``memory``: ``subprocess`` (one fresh process per method; needs ``memory_args`` naming the
    model, tasks, ...), ``inprocess``, ``auto`` (subprocess when ``memory_args`` is given, else in
    process) or ``off``.
    """
    log = log or (lambda _msg: None)
    peers = None
    if any(m not in BUILTIN for m in methods):
        peers = load_peers()
    rows: dict[str, Row] = {}
    fns: dict[str, Method] = {}
    for name in methods:
        fn = resolve(name, peers)
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
            rows[name].status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
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

    truth = outputs.get("ablate-batched")
    truth_scores = truth.scores if truth else None
    if truth_scores is not None:
        for name, out in outputs.items():
            if out.scores is not None and name != "ablate-batched":
                rows[name].spearman = _mean_spearman(out.scores, truth_scores)
            if out.partial and truth_scores is not None:
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

    if memory == "auto":
        memory = "subprocess" if memory_args is not None else "inprocess"
    if ctx.lm.device.type == "cuda" and memory == "subprocess":
        memory = "inprocess"
    if memory != "off":
        for name in [m for m in methods if m in fns]:
            log(f"memory: {name}")
            if memory == "subprocess":
                rows[name].peak_mib, rows[name].memory_how = _memory_subprocess(name, memory_args, memory_timeout)
            else:
                fn = sampled_batched if name == "ablate-batched" else fns[name]
                rows[name].peak_mib, rows[name].memory_how = measure_memory_here(fn, ctx)
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


def machine_info() -> dict:
    """CPU model, cores, torch threads, load average, GPU (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["loadavg"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    """Versions of headscore, torch, transformers and the peers (where installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = library_versions()
    for name in ("nnsight", "transformer-lens"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _fmt(x: float | None, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_table(doc: dict) -> str:
    """The results as a Markdown table (time, ratios to the floor and to taylor, memory, Spearman)."""
    rows = [Row(**r) for r in doc["rows"]]
    by = {r.method: r for r in rows}
    floor, taylor = by.get("floor"), by.get("taylor")
    lines = ["| method | status | wall s (median) | x floor | x taylor | peak MiB | Spearman vs ablation | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.label} (`{r.method}`) | {r.status} | {_fmt(r.seconds, '.3f')} | "
                     f"{_fmt(r.ratio_to(floor), '.2f')} | {_fmt(r.ratio_to(taylor), '.1f')} | "
                     f"{_fmt(r.peak_mib, '.0f')} | {_fmt(r.spearman, '.3f')} | {r.note} |")
    return "\n".join(lines)


def write_outputs(doc: dict, out_dir: str | Path, stem: str = "bench") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.md`` into ``out_dir``."""
    from .results import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
    atomic_write(paths["json"], json.dumps(doc, indent=1).encode())
    fields = ["method", "label", "status", "seconds", "peak_mib", "spearman", "note", "memory_how", "times"]
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in doc["rows"]:
            w.writerow({**r, "times": " ".join(f"{t:.4f}" for t in r["times"])})
    atomic_write(paths["md"], (format_table(doc) + "\n").encode())
    return paths


# ----------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (embedded, default), a local model directory, or a cached hub id")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--tasks", default="builtin", help="'builtin' or a JSONL file of {prompt, target, task}")
    p.add_argument("--max-examples", type=int, default=None, help="at most this many examples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rows-per-pass", type=int, default=64, help="rows per forward pass in batched ablation")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(DEFAULT_METHODS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after warm-up (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sample-heads", type=int, default=16,
                   help="heads timed in the naive sweeps before extrapolating to all heads (0: all heads)")
    p.add_argument("--sample-ablation", action="store_true",
                   help="time batched ablation on the head sample too (extrapolated; no Spearman: for slow CPUs)")
    p.add_argument("--memory", default="subprocess", choices=["subprocess", "inprocess", "off"],
                   help="peak memory: a fresh subprocess per method (default), in this process, or off")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="directory for bench.json, bench.csv and bench.md")


def run_from_args(args: argparse.Namespace) -> dict:
    """Run ``headscore bench`` from parsed arguments; prints the table and writes the outputs."""
    from .data.tasks import load_tasks
    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        raise HeadscoreError("--batch-size and --repeats must be at least 1, --warmup at least 0")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in DEFAULT_METHODS:
            raise HeadscoreError(f"unknown bench method {m!r}; choose from {', '.join(DEFAULT_METHODS)}")
    sample = None if args.sample_heads == 0 else args.sample_heads
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    ctx = Context(lm, load_tasks(args.tasks), args.batch_size, args.max_examples, args.rows_per_pass, sample,
                  not args.sample_ablation)
    worker = {"model": args.model, "device": args.device, "dtype": args.dtype, "tasks": args.tasks,
              "batch_size": args.batch_size, "max_examples": args.max_examples,
              "rows_per_pass": args.rows_per_pass, "sample_heads": sample, "full_ablation": not args.sample_ablation}
    doc = run_bench(ctx, methods, repeats=args.repeats, warmup=args.warmup, memory=args.memory,
                    memory_args=worker if args.memory == "subprocess" else None,
                    log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    doc["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    m = doc["machine"]
    print(f"{doc['model']} on {doc['device']} ({m['cpu']}, {m['cores']} cores, {m['torch_threads']} threads, "
          f"load {m['loadavg']}): {doc['examples']} examples, {doc['heads']} heads, batch {doc['batch_size']}")
    print(format_table(doc))
    if args.out:
        for kind, path in write_outputs(doc, args.out).items():
            print(f"{kind}: {path}")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m headscore.bench``: the bench (same options as ``headscore bench``) or a memory worker."""
    p = argparse.ArgumentParser(prog="python -m headscore.bench", description=__doc__.splitlines()[0])
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-args", default=None, help=argparse.SUPPRESS)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.memory_worker:
        _worker_main(args.memory_worker, json.loads(args.worker_args))
        return 0
    try:
        run_from_args(args)
    except HeadscoreError as exc:
        print(f"headscore: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
