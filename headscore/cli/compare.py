"""``headscore compare``: per-task agreement of two score files."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from ..intervals import agreement_table
from ..results import HeadScores, atomic_write
from ..stats import format_interval
from ..text import printable
from .common import add_interval_args, at_least, check_command_outputs, interval_options


def register(sub) -> dict[str, Callable]:
    """Add ``compare``."""
    c = sub.add_parser("compare", help="per-task Spearman, Kendall and top-k overlap of two score files")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--k", type=at_least(1), default=10, help="top-k size (default 10)")
    c.add_argument("--json", default=None, help="also write the table as JSON")
    add_interval_args(c)
    return {"compare": cmd_compare}


def cmd_compare(args: argparse.Namespace) -> None:
    """``headscore compare A B``."""
    check_command_outputs(args, [("--json", args.json)], inputs=[("A", args.a), ("B", args.b)])
    a, b = HeadScores.load(args.a), HeadScores.load(args.b)
    table = agreement_table(a, b, args.k, **interval_options(args))
    print(f"{printable(a.method)} vs {printable(b.method)}")
    first = next(iter(table.values()))
    if "spearman_ci" in first:
        print(f"[low, high]: {args.level:.0%} bootstrap intervals over examples ({args.resamples} resamples, seed "
              f"{args.seed}; {'paired: same examples' if first['paired'] else 'files resampled independently'})")
    elif args.resamples > 0:
        missing = " and ".join(n for n, s in (("A", a), ("B", b)) if not s.has_examples)
        print(f"no intervals: {missing} kept no per-example values (made before they were kept, or by a "
              "multi-process run)")
    print(f"{'task':<28} {'spearman':>24} {'kendall':>8} {'top-' + str(args.k):>18}")
    for task, row in table.items():
        print(f"{printable(task):<28} {format_interval(row['spearman'], row.get('spearman_ci')):>24} "
              f"{row['kendall']:>8.3f} {format_interval(row['topk_overlap'], row.get('topk_overlap_ci'), '.2f'):>18}")
    if args.json:
        atomic_write(args.json, json.dumps(table, indent=1).encode())
