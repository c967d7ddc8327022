"""``headscore bench``: all-head scoring side by side with ablation and hook-based peers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..bench import DEFAULT_METHODS, Context, format_table, run_bench, worker_args, write_outputs
from ..data.tasks import task_source
from ..errors import HeadscoreError
from ..output_paths import OutputDir
from .common import MAX_THREADS, add_model_args, at_least, check_command_outputs, load_model_and_tasks

BENCH_FILES = ("bench.json", "bench.csv", "bench.md")


def register(sub) -> dict[str, Callable]:
    """Add ``bench``."""
    add_arguments(sub.add_parser("bench", help="time and memory of all-head scoring vs ablation and "
                                               "hook-based peers, side by side in one run"))
    return {"bench": cmd_bench}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    add_model_args(p)  # --model, --device, --dtype, --batch-size, --no-progress, --tasks, --max-examples
    p.add_argument("--rows-per-pass", type=at_least(1), default=64, help="rows per forward pass in batched ablation")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(DEFAULT_METHODS)}")
    p.add_argument("--repeats", type=at_least(1), default=3, help="timed rounds after warm-up (median reported)")
    p.add_argument("--warmup", type=at_least(0), default=1)
    p.add_argument("--sample-heads", type=at_least(0), default=16,
                   help="heads timed in the naive sweeps before extrapolating to all heads (0: all heads)")
    p.add_argument("--sample-ablation", action="store_true",
                   help="time batched ablation on the head sample too (extrapolated; no Spearman: for slow CPUs); "
                        "prefix ablation runs every head still (its cost does not scale from a sample)")
    p.add_argument("--memory", default="subprocess", choices=["subprocess", "inprocess", "off"],
                   help="peak memory: a fresh subprocess per method (default), in this process, or off")
    p.add_argument("--threads", type=at_least(1, MAX_THREADS), default=None,
                   help="torch CPU threads, 1 or more (default: torch's choice)")
    p.add_argument("--out", default=None, help="directory for bench.json, bench.csv and bench.md")


def cmd_bench(args: argparse.Namespace) -> None:
    """``headscore bench``."""
    source = task_source(args.tasks)
    if args.memory == "subprocess" and source is not None and source.exists() and not source.is_file():
        raise HeadscoreError(f"--tasks {source} is not a regular file (a pipe?), and --memory subprocess reads it "
                             "again in each worker: save the tasks to a file, or use --memory inprocess")
    if args.out is not None:
        check_command_outputs(args, dirs=[OutputDir("--out", args.out, BENCH_FILES)])
    run_from_args(args)


def run_from_args(args: argparse.Namespace) -> dict:
    """Run ``headscore bench`` from parsed arguments; prints the table and writes the outputs."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise HeadscoreError(f"--methods names no method; choose from {', '.join(DEFAULT_METHODS)}")
    for m in methods:
        if m not in DEFAULT_METHODS:
            raise HeadscoreError(f"unknown bench method {m!r}; choose from {', '.join(DEFAULT_METHODS)}")
    sample = None if args.sample_heads == 0 else args.sample_heads
    lm, examples = load_model_and_tasks(args)
    ctx = Context(lm, examples, args.batch_size, args.max_examples, args.rows_per_pass, sample,
                  not args.sample_ablation)
    worker = worker_args(ctx, model=args.model, device=args.device, dtype=args.dtype, tasks=args.tasks,
                         columns=args.columns)
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
