"""``headscore bench``: all-head scoring side by side with ablation and hook-based peers."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..bench import add_arguments, run_from_args
from ..output_paths import OutputDir
from .common import check_command_outputs

BENCH_FILES = ("bench.json", "bench.csv", "bench.md")


def register(sub) -> dict[str, Callable]:
    """Add ``bench``."""
    add_arguments(sub.add_parser("bench", help="time and memory of all-head scoring vs ablation and "
                                               "hook-based peers, side by side in one run"))
    return {"bench": cmd_bench}


def cmd_bench(args: argparse.Namespace) -> None:
    """``headscore bench``."""
    if args.out is not None:
        check_command_outputs(args, dirs=[OutputDir("--out", args.out, BENCH_FILES)])
    run_from_args(args)
