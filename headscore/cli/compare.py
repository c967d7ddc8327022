"""``headscore compare``: per-task agreement of two score files."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

from ..compare import compare_edges, compare_positions, exact_counts, largest_differences, require_finite
from ..intervals import agreement_table
from ..output_files import atomic_write
from ..results import HeadScores, json_bytes
from ..stats import format_interval
from ..text import printable
from .common import add_interval_args, at_least, check_command_outputs, interval_options


def register(sub) -> dict[str, Callable]:
    """Add ``compare``."""
    c = sub.add_parser("compare", help="per-task Spearman, Kendall and top-k overlap of two score files")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--k", type=at_least(1), default=10, help="top-k size (default 10)")
    c.add_argument("--json", default=None, help="also write the table as JSON (an n/a figure as null)")
    c.add_argument("--misses", type=at_least(0), default=0, metavar="N",
                   help="also list, per task, the N heads where A and B differ most (e.g. where a first-order "
                        "estimate misses real ablation)")
    add_interval_args(c)
    return {"compare": cmd_compare}


def cmd_compare(args: argparse.Namespace) -> None:
    """``headscore compare A B``."""
    check_command_outputs(args, [("--json", args.json)], inputs=[("A", args.a), ("B", args.b)])
    a, b = load_finite(args.a), load_finite(args.b)
    if a.model and b.model and a.model != b.model:
        warnings.warn(f"the files name different models ({a.model} in {args.a}, {b.model} in {args.b}); "
                      "their heads need not correspond", stacklevel=1)
    if a.edges_only or b.edges_only:  # exact edge patching: nothing but edges to compare
        doc = {"_edges": _print_edges(a, b, args)}
        if args.json:
            atomic_write(args.json, json_bytes(doc))
        return
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
    exact = {side: exact_counts(s, list(table)) for side, s in (("A", a), ("B", b))}
    shown = [side for side, counts in exact.items() if counts is not None]
    if shown:
        print(f"exact A / exact B: heads per task whose value is exact (ablation/patching, not an estimate), of "
              f"{a.num_layers * a.num_heads}; - = that file has no exact mask")
    header = f"{'task':<28} {'spearman':>24} {'kendall':>8} {'top-' + str(args.k):>18}"
    print(header + ("".join(f" {'exact ' + side:>8}" for side in exact) if shown else ""))
    for task, row in table.items():
        line = (f"{printable(task):<28} {format_interval(row['spearman'], row.get('spearman_ci')):>24} "
                f"{row['kendall']:>8.3f} {format_interval(row['topk_overlap'], row.get('topk_overlap_ci'), '.2f'):>18}")
        if shown:
            line += "".join(f" {'-' if counts is None else counts[task]:>8}" for counts in exact.values())
        print(line)
    metrics = [printable(s.extra.get("metric", "nll")) for s in (a, b)]  # any JSON value a file may hold
    if metrics[0] != metrics[1]:
        print(f"note: the files measure different metrics (A {metrics[0]} vs B {metrics[1]})")
    doc: dict = table
    if a.has_positions and b.has_positions:
        positions = compare_positions(a, b, args.k)
        print(f"per (head, position): {'task':<28} {'spearman':>8} {'kendall':>8} {'top-' + str(args.k):>7}")
        for task, agree in positions.items():
            print(f"{'':<22}{printable(task):<28} {agree.spearman:>8.3f} {agree.kendall:>8.3f} "
                  f"{agree.topk_overlap:>7.2f}")
        doc = {**table, "_positions": {t: g.as_dict() for t, g in positions.items()}}
    if shown:
        doc = {**doc, "_exact": {side: counts for side, counts in exact.items() if counts is not None}}
    if args.misses:
        print("largest |A - B| (layer.head: A, B" + ("; * = an exact value)" if shown else ")"))
        for task in table:
            misses = largest_differences(a, b, task, args.misses)
            print(f"  {printable(task)}: " + ", ".join(
                f"{m.layer}.{m.head}: {m.a:+.3g}{'*' if m.a_exact else ''}, {m.b:+.3g}{'*' if m.b_exact else ''}"
                for m in misses))
    if a.has_edges and b.has_edges:
        doc = {**doc, "_edges": _print_edges(a, b, args)}
    if args.json:
        atomic_write(args.json, json_bytes(doc))


def load_finite(path: str) -> HeadScores:
    """The scores file at ``path``; HeadscoreError naming it where it holds an infinite score
    (:func:`headscore.compare.require_finite`)."""
    scores = HeadScores.load(path)
    require_finite(scores, path)
    return scores


def _print_edges(a: HeadScores, b: HeadScores, args: argparse.Namespace) -> dict:
    """Print the edge scores' agreement per task (over the edges both files have a value for); its JSON."""
    edges = compare_edges(a, b, args.k)
    print(f"edges, {printable(a.method)} vs {printable(b.method)}:")
    print(f"{'task':<28} {'edges':>7} {'spearman':>8} {'kendall':>8} {'top-' + str(args.k):>7}")
    for task, agree in edges.items():
        both = int((~a.edges(task).isnan() & ~b.edges(task).isnan()).sum())
        print(f"{printable(task):<28} {both:>7} {agree.spearman:>8.3f} {agree.kendall:>8.3f} "
              f"{agree.topk_overlap:>7.2f}")
    return {t: g.as_dict() for t, g in edges.items()}
