"""One-pass scoring vs real ablation on one model and data set, measured side by side in one run.

Reports, per task, the Spearman and Kendall correlation and top-10 overlap of each gradient
method against zero ablation, and the wall time of all-head scoring against batched and
sequential (one head per forward pass) ablation.

    python benchmarks/score_vs_ablation.py --model smollm2-135m --out benchmarks/results/smollm2_builtin.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import headscore
from headscore import bench
from headscore.data.tasks import load_tasks
from headscore.output_files import atomic_write
from headscore.results import library_versions


def timed(fn, *args, **kwargs):
    """Run ``fn`` and return (result, wall seconds)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def sequential_sample(lm, examples, num_heads: int, kw: dict):
    """Time the naive sweep (one forward pass per head) on ``num_heads`` evenly spaced heads.

    The bench's sampled sweep (:func:`headscore.bench.sampled_ablation`, its head sample and its
    extrapolation: clean passes once plus the per-head passes scaled by all heads / sampled heads).
    Returns the extrapolated seconds, the sampled per-task loss increases [T, K] and the flat head indices.
    """
    ctx = bench.Context(lm, examples, batch_size=kw["batch_size"], max_examples=kw["max_examples"],
                        sample_heads=num_heads)
    out = bench.sampled_ablation(ctx, "sequential")
    heads = sorted(out.partial)
    sampled = torch.tensor([out.partial[h] for h in heads], dtype=torch.float64).T
    return out.seconds, sampled, torch.tensor(heads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="builtin")
    p.add_argument("--max-examples", type=int, default=None, help="examples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--methods", default="taylor,abs,fisher,atp-mean")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-sequential", action="store_true", help="skip the naive one-head-per-pass sweep")
    p.add_argument("--sequential-heads", type=int, default=None,
                   help="time the sequential sweep on this many evenly spaced heads and extrapolate to all heads "
                        "(marked 'extrapolated'); default: all heads")
    p.add_argument("--out", default=None, help="write all figures as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = headscore.load_model(args.model)
    examples = load_tasks(args.tasks)
    kw = dict(batch_size=args.batch_size, max_examples=args.max_examples, progress=True)
    headscore.score(lm, examples[: args.batch_size], batch_size=args.batch_size, progress=False)  # warm-up

    timings: dict[str, float] = {}
    scores = {}
    for method in args.methods.split(","):
        scores[method], timings[method] = timed(headscore.score, lm, examples, method=method, **kw)
    truth, timings["ablation-batched"] = timed(headscore.ablate, lm, examples, mode="batched", **kw)
    gap, extrapolated = None, False
    if args.skip_sequential:
        pass
    elif args.sequential_heads:
        seconds, sampled, heads = sequential_sample(lm, examples, args.sequential_heads, kw)
        timings["ablation-sequential"] = seconds
        extrapolated = True
        flat = truth.values.flatten(1)[:, heads]
        gap = float((sampled - flat).abs().max())
    else:
        sequential, timings["ablation-sequential"] = timed(headscore.ablate, lm, examples, mode="sequential", **kw)
        gap = float((sequential.values - truth.values).abs().max())

    agreement = {m: {t: a.as_dict() for t, a in headscore.compare(s, truth).items()} for m, s in scores.items()}
    doc = {
        "model": args.model, "tasks": truth.tasks, "counts": truth.counts.tolist(),
        "heads": truth.num_layers * truth.num_heads, "batch_size": args.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "versions": library_versions(), "seconds": timings, "agreement_vs_zero_ablation": agreement,
        "batched_vs_sequential_max_abs_diff": gap, "sequential_extrapolated": extrapolated,
        "sequential_heads_measured": args.sequential_heads if extrapolated else None,
    }
    print(f"\n{args.model}: {int(truth.counts.sum())} examples, {doc['heads']} heads, batch {args.batch_size}")
    print(f"{'task':<26}" + "".join(f"{m:>10}" for m in scores) + "   (Spearman vs zero ablation)")
    for t in truth.tasks:
        print(f"{t:<26}" + "".join(f"{agreement[m][t]['spearman']:>10.3f}" for m in scores))
    print("\nwall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    for base in ("ablation-batched", "ablation-sequential"):
        if base in timings:
            mark = " (extrapolated)" if extrapolated and base == "ablation-sequential" else ""
            print(f"{base}{mark} / taylor = {timings[base] / timings['taylor']:.1f}x")
    if gap is not None:
        print(f"batched vs sequential ablation, max |difference| = {gap:.2e}")
    if args.out:
        atomic_write(args.out, json.dumps(doc, indent=1).encode())
        truth.save(Path(args.out).with_suffix(".ablation.hs"))
        for method, result in scores.items():
            result.save(Path(args.out).with_suffix(f".{method}.hs"))


if __name__ == "__main__":
    main()
