"""Edge scores on a real model (issue 25): cost beside the floor, extra peak memory, agreement with exact edge
patching on each task's top edges, and circuits with their faithfulness curve.

    python benchmarks/edges.py --tasks ioi --max-examples 3 --metric logit-diff --baseline corrupt \\
        --threads 2 --out benchmarks/results/edges

1. Cost: head scoring (taylor/AtP, the floor: one forward + backward per batch, plus the corrupted forward for
   ``--baseline corrupt``) and edge scoring (``score(..., edges=True)``) in alternating rounds, in one process;
   medians and their ratio.
2. Memory: each in a fresh subprocess (glibc malloc told to give freed blocks back, as ``headscore bench``
   does), its peak resident memory above the loaded model on a second run; the extra of edges over heads,
   against the formula of docs/edges.md at the same shapes.
3. Agreement: exact edge patching (``ablate_edges``) of each task's ``--top`` edges by |score|; Spearman and
   Pearson of score against patching per task, over those edges.
4. Circuits (``circuit``): faithfulness of the top-N circuits of each task against N, the circuit reaching
   ``--target`` faithfulness, their pictures.
Needs the machine to itself (other jobs on the cores change the timings several-fold).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

import headscore
from headscore.bench.tables import machine_info
from headscore.data.tasks import load_tasks
from headscore.figures import save_figure

MARK = "EDGES_MEMORY "


def formula(layers: int, heads: int, kv: int, d_model: int, tokens: int, batch: int, bytes_per: int,
            block: int = 4) -> dict:
    """Extra bytes of edge scoring over head scoring (docs/edges.md): 5 L*B*T*d kept (MLP outputs, their
    changes, the heads' changes, the corrupted MLP outputs, the MLP's own input copy), the scores B*U*V in
    float32, one layer's transients B*T*d*(3n + H) (reader gradients, their product layout, the norm's
    pullback; the recomputed head contributions) and the other layers of a block of readers (block - 1) B*T*n*d."""
    n = heads + 2 * kv + 1
    up, down = 1 + layers * (heads + 1), layers * n + 1
    kept = 5 * layers * batch * tokens * d_model * bytes_per
    scores = batch * up * down * 4
    transient = batch * tokens * d_model * (3 * n + heads) * bytes_per
    blocked = (block - 1) * batch * tokens * n * d_model * bytes_per
    return {"kept": kept, "scores": scores, "transient": transient, "blocked": blocked,
            "total": kept + scores + transient + blocked}


def worker(args: argparse.Namespace) -> None:
    """Peak memory of one method above the loaded model (second run), printed as one line."""
    from headscore.bench.memory import _proc_status, _reset_hwm, _trim

    torch.set_num_threads(args.threads)
    lm = headscore.load_model(progress=False)
    examples = load_tasks(args.tasks)
    kw = dict(metric=args.metric, baseline=args.baseline, max_examples=args.max_examples,
              batch_size=args.batch_size, progress=False, edges=args.worker == "edges")
    headscore.score(lm, examples, **kw)
    _trim()
    if not _reset_hwm():
        raise SystemExit("no /proc/self/clear_refs: cannot reset the high-water mark")
    base = _proc_status("VmRSS")
    headscore.score(lm, examples, **kw)
    peak = _proc_status("VmHWM")
    print(MARK + json.dumps({"above_model_mib": peak - base, "process_peak_mib": peak}), flush=True)


def memory(args: argparse.Namespace, which: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    cmd = [sys.executable, __file__, "--worker", which, "--tasks", args.tasks, "--metric", args.metric,
           "--baseline", args.baseline, "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    if args.max_examples:
        cmd += ["--max-examples", str(args.max_examples)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith(MARK))[len(MARK):])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="ioi")
    p.add_argument("--max-examples", type=int, default=3)
    p.add_argument("--metric", default="logit-diff")
    p.add_argument("--baseline", default="corrupt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--top", type=int, default=500, help="edges per task measured by exact patching")
    p.add_argument("--target", type=float, default=0.8, help="faithfulness the chosen circuits reach")
    p.add_argument("--out", default=None, help="directory for edges.json and the pictures")
    p.add_argument("--parts", default="cost,memory,agreement,circuits",
                   help="which parts to run (comma-separated; default all)")
    p.add_argument("--worker", choices=["heads", "edges"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-check"
        probe.write_text("ok")
        probe.unlink()
    torch.set_num_threads(args.threads)
    lm = headscore.load_model(progress=False)
    examples = load_tasks(args.tasks)
    kw = dict(metric=args.metric, baseline=args.baseline, max_examples=args.max_examples,
              batch_size=args.batch_size, progress=False)
    doc: dict = {"model": lm.name, "tasks": args.tasks, "max_examples": args.max_examples, "metric": args.metric,
                 "baseline": args.baseline, "threads": args.threads, "batch_size": args.batch_size,
                 "command": " ".join(["python", "benchmarks/edges.py", *(argv or sys.argv[1:])]),
                 "machine": machine_info(), "torch": torch.__version__}

    parts = {p.strip() for p in args.parts.split(",")}
    # 1. cost, alternating rounds after one warm-up of each
    headscore.score(lm, examples, **kw)
    scores = headscore.score(lm, examples, edges=True, **kw)
    times: dict[str, list[float]] = {"heads": [], "edges": []}
    for _ in range(args.rounds if "cost" in parts else 0):
        for name in ("heads", "edges"):
            start = time.perf_counter()
            headscore.score(lm, examples, edges=name == "edges", **kw)
            times[name].append(time.perf_counter() - start)
    doc["edges"] = scores.edge_maps.num_edges
    doc["examples"] = int(scores.counts.sum())
    if "cost" in parts:
        med = {k: statistics.median(v) for k, v in times.items()}
        doc["seconds"] = {k: v for k, v in times.items()}
        doc["median_seconds"] = med
        doc["cost_ratio"] = med["edges"] / med["heads"]
        print(f"cost: heads {med['heads']:.2f}s, edges {med['edges']:.2f}s: {doc['cost_ratio']:.2f}x "
              f"({doc['edges']} edges, {doc['examples']} examples)", flush=True)
    if "memory" in parts:
        _memory_part(args, lm, examples, doc)
    if "agreement" in parts:
        exact = _agreement_part(args, lm, examples, scores, doc)
    if "circuits" in parts:
        circuits = _circuits_part(args, lm, examples, scores, doc)
    if out is not None:
        from headscore.report.circuit import circuit_figure, faithfulness_figure

        if "circuits" in parts:
            save_figure(circuit_figure(circuits), out / "circuit")
            save_figure(faithfulness_figure(circuits), out / "faithfulness")
        if "agreement" in parts:
            save_figure(_scatter(scores, exact, args.top), out / "scores-vs-patching")
        path = out / "edges.json"
        previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        path.write_text(json.dumps({**previous, **doc}, indent=1), encoding="utf-8")
        print(f"-> {out}")


def _memory_part(args: argparse.Namespace, lm, examples, doc: dict) -> None:
    """2. memory, fresh subprocesses."""
    mem = {name: memory(args, name) for name in ("heads", "edges")}
    cfg = lm.model.config
    tokens = max(len(lm.tokenizer(ex.prompt + ex.target)["input_ids"]) for ex in examples)
    predicted = formula(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size,
                        tokens, args.batch_size, 4)
    extra = mem["edges"]["above_model_mib"] - mem["heads"]["above_model_mib"]
    doc["memory_mib"] = mem
    doc["extra_mib"] = extra
    doc["extra_of_head_peak"] = extra / mem["heads"]["process_peak_mib"]
    doc["extra_of_head_working"] = extra / mem["heads"]["above_model_mib"]
    doc["formula_mib_at_longest_batch"] = {k: v / 2**20 for k, v in predicted.items()}
    llama8b = formula(32, 32, 8, 4096, 512, 1, 2)
    weights_8b = 8.03e9 * 2
    doc["llama3_8b_512_tokens_bf16"] = {**{k: v / 2**30 for k, v in llama8b.items()},
                                        "weights_gib": weights_8b / 2**30,
                                        "extra_of_weights": llama8b["total"] / weights_8b,
                                        "eap_ig_buffer_gib": (1 + 32 * 33) * 512 * 4096 * 2 / 2**30}
    print(f"memory above the model: heads {mem['heads']['above_model_mib']:.0f} MiB, edges "
          f"{mem['edges']['above_model_mib']:.0f} MiB: +{extra:.0f} MiB = {doc['extra_of_head_peak']:.1%} of head "
          f"scoring's peak ({mem['heads']['process_peak_mib']:.0f} MiB), {doc['extra_of_head_working']:.1%} of its "
          f"working memory; formula {predicted['total'] / 2**20:.0f} MiB at the longest batch", flush=True)
    print(f"Llama-3-8B, 512 tokens, batch 1, bf16: extra {llama8b['total'] / 2**30:.2f} GiB = "
          f"{llama8b['total'] / weights_8b:.1%} of the weights alone", flush=True)


def _agreement_part(args: argparse.Namespace, lm, examples, scores, doc: dict):
    """3. agreement with exact edge patching on each task's top edges."""
    start = time.perf_counter()
    exact = headscore.ablate_edges(lm, examples, scores=scores, top=args.top, baseline=args.baseline,
                                   metric=args.metric, max_examples=args.max_examples,
                                   batch_size=args.batch_size, progress=False)
    doc["exact_seconds"] = time.perf_counter() - start
    doc["exact_edges"] = int(exact.extra["edges_measured"])
    per_task = {}
    for task in scores.tasks:
        s, e = scores.edges(task), exact.edges(task)
        flat = torch.nan_to_num(s.abs(), nan=-1.0).flatten()
        top = torch.topk(flat, args.top).indices
        x, y = s.flatten()[top].numpy(), e.flatten()[top].numpy()
        per_task[task] = {"spearman": float(stats.spearmanr(x, y).statistic),
                          "pearson": float(stats.pearsonr(x, y).statistic),
                          "sign_agreement": float(np.mean(np.sign(x) == np.sign(y)))}
        print(f"{task}: Spearman {per_task[task]['spearman']:.3f}, Pearson {per_task[task]['pearson']:.3f} "
              f"over its top {args.top} edges", flush=True)
    doc["agreement_top"] = per_task
    return exact


def _circuits_part(args: argparse.Namespace, lm, examples, scores, doc: dict):
    """4. circuits and their faithfulness."""
    start = time.perf_counter()
    circuits = headscore.circuit(lm, examples, scores, target_faithfulness=args.target,
                                 max_examples=args.max_examples, batch_size=args.batch_size, progress=False)
    doc["circuit_seconds"] = time.perf_counter() - start
    doc["circuits"] = []
    for c in circuits:  # each circuit's 50 largest edges (a whole circuit can hold tens of thousands)
        entry = c.as_json()
        entry["edges_total"], entry["edges"] = len(entry["edges"]), entry["edges"][:50]
        doc["circuits"].append(entry)
    for c in circuits:
        print(f"{c.task}: {int(c.edges.sum())} edges reach faithfulness {c.faithfulness:.3f} "
              f"(target {args.target}); curve " +
              ", ".join(f"{p.edges}:{p.faithfulness:.2f}" for p in c.curve), flush=True)
    return circuits


def _scatter(scores, exact, top: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * min(len(scores.tasks), 3), 3.6 * ((len(scores.tasks) + 2) // 3)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots((len(scores.tasks) + 2) // 3, min(len(scores.tasks), 3), squeeze=False)
    for ax, task in zip(axes.flat, scores.tasks, strict=False):
        s, e = scores.edges(task), exact.edges(task)
        idx = torch.topk(torch.nan_to_num(s.abs(), nan=-1.0).flatten(), top).indices
        x, y = s.flatten()[idx].numpy(), e.flatten()[idx].numpy()
        ax.scatter(x, y, s=5, alpha=0.6)
        lim = float(max(np.abs(x).max(), np.abs(y).max()))
        ax.plot([-lim, lim], [-lim, lim], color="0.6", lw=0.8)
        ax.set_title(f"{task}: rho {stats.spearmanr(x, y).statistic:.2f}", fontsize=9)
        ax.set_xlabel("edge score (one pass)")
        ax.set_ylabel("exact edge patching")
    for ax in list(axes.flat)[len(scores.tasks):]:
        ax.set_visible(False)
    return fig


if __name__ == "__main__":
    main()
