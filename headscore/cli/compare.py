"""``headscore compare``: per-task agreement of two score files."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from ..compare import compare
from ..results import HeadScores, atomic_write
from ..text import printable
from .common import at_least, check_command_outputs


def register(sub) -> dict[str, Callable]:
    """Add ``compare``."""
    c = sub.add_parser("compare", help="per-task Spearman, Kendall and top-k overlap of two score files")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--k", type=at_least(1), default=10, help="top-k size (default 10)")
    c.add_argument("--json", default=None, help="also write the table as JSON")
    return {"compare": cmd_compare}


def cmd_compare(args: argparse.Namespace) -> None:
    """``headscore compare A B``."""
    check_command_outputs(args, [("--json", args.json)], inputs=[("A", args.a), ("B", args.b)])
    a, b = HeadScores.load(args.a), HeadScores.load(args.b)
    table = compare(a, b, k=args.k)
    print(f"{printable(a.method)} vs {printable(b.method)}")
    print(f"{'task':<28} {'spearman':>9} {'kendall':>8} {'top-' + str(args.k):>7}")
    for task, ag in table.items():
        print(f"{printable(task):<28} {ag.spearman:>9.3f} {ag.kendall:>8.3f} {ag.topk_overlap:>7.2f}")
    if args.json:
        atomic_write(args.json, json.dumps({t: ag.as_dict() for t, ag in table.items()}, indent=1).encode())
