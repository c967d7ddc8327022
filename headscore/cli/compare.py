"""``headscore compare``: per-task agreement of two score files."""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from typing import TypeVar

from ..compare import (
    compare_edges,
    compare_positions,
    exact_counts,
    largest_differences,
    provenance_differences,
    require_finite,
)
from ..errors import HeadscoreError
from ..intervals import agreement_table
from ..output_files import atomic_write
from ..report.uncertainty import bias_note
from ..results import HeadScores, json_bytes
from ..stats import format_interval, min_examples_for
from ..text import printable
from .common import add_interval_args, at_least, check_command_outputs, interval_options, load_head_scores

T = TypeVar("T")


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
    c.add_argument("--no-progress", action="store_true", help="hide the bootstrap's progress bar (shown on a "
                       "terminal when the intervals take over 2 s)")
    return {"compare": cmd_compare}


def cmd_compare(args: argparse.Namespace) -> None:
    """``headscore compare A B``."""
    check_command_outputs(args, [("--json", args.json)], inputs=[("A", args.a), ("B", args.b)])
    a, b = load_finite(args.a), load_finite(args.b)
    if a.model and b.model and a.model != b.model:
        warnings.warn(f"the files name different models ({a.model} in {args.a}, {b.model} in {args.b}); "
                      "their heads need not correspond", stacklevel=1)
    if a.edges_only or b.edges_only:  # exact edge patching: nothing but edges to compare
        if args.misses:
            raise HeadscoreError("--misses lists heads; an exact edge-patching file (ablate --edges) has edges only")
        doc = {"_edges": _print_edges(a, b, args), **_print_differences(a, b)}
        if args.json:
            atomic_write(args.json, json_bytes(doc))
        return
    clash = sorted(set(a.tasks) & set(b.tasks) & JSON_KEYS) if args.json else []
    if clash:
        raise HeadscoreError(f"--json: task {clash[0]!r} has the name of a key the JSON keeps for itself "
                             f"({', '.join(sorted(JSON_KEYS))}); rename the task, or drop --json")
    table = agreement_table(a, b, args.k, **interval_options(args), min_examples=min_examples_for(args.level))
    print(f"{printable(a.method)} vs {printable(b.method)}")
    _print_interval_notes(table, a, b, args)
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
    doc: dict = {**table, **_print_differences(a, b)}
    positions = _extra_section("per (head, position)", lambda: compare_positions(a, b, args.k)) \
        if a.has_positions and b.has_positions else None
    if positions is not None:
        print(f"per (head, position): {'task':<28} {'spearman':>8} {'kendall':>8} {'top-' + str(args.k):>7}")
        for task, agree in positions.items():
            print(f"{'':<22}{printable(task):<28} {agree.spearman:>8.3f} {agree.kendall:>8.3f} "
                  f"{agree.topk_overlap:>7.2f}")
        doc = {**doc, "_positions": {t: g.as_dict() for t, g in positions.items()}}
    if shown:
        doc = {**doc, "_exact": {side: counts for side, counts in exact.items() if counts is not None}}
    if args.misses:
        print("largest |A - B| (layer.head: A, B" + ("; * = an exact value)" if shown else ")"))
        for task in table:
            misses = largest_differences(a, b, task, args.misses)
            print(f"  {printable(task)}: " + ", ".join(
                f"{m.layer}.{m.head}: {m.a:+.3g}{'*' if m.a_exact else ''}, {m.b:+.3g}{'*' if m.b_exact else ''}"
                for m in misses))
    edges = _extra_section("edges", lambda: _print_edges(a, b, args)) if a.has_edges and b.has_edges else None
    if edges is not None:
        doc = {**doc, "_edges": edges}
    if args.json:
        atomic_write(args.json, json_bytes(doc))


JSON_KEYS = frozenset({"_differences", "_positions", "_exact", "_edges"})
"""The keys ``compare --json`` writes beside the tasks' rows."""


def _extra_section(name: str, compute: Callable[[], T]) -> T | None:
    """A section after the head-level table (per position, edges): where the two files cannot be compared
    there (no position or task in common), one line says why, and the command goes on (the table stands)."""
    try:
        return compute()
    except HeadscoreError as exc:
        print(f"{name}: not compared ({exc})")
        return None


def _print_interval_notes(table: dict[str, dict], a: HeadScores, b: HeadScores, args: argparse.Namespace) -> None:
    """Above the table: what its brackets are, and which tasks have none for want of examples (or why no task has
    any)."""
    with_ci = [row for row in table.values() if "spearman_ci" in row]
    shown = [row for row in with_ci if any(math.isfinite(row[key][0]) for key in ("spearman_ci", "topk_overlap_ci")
                                           if key in row)]
    if shown:
        paired = "paired: same examples" if shown[0]["paired"] else "files resampled independently"
        print(f"[low, high]: {args.level:.0%} bootstrap intervals over examples ({args.resamples} resamples, seed "
              f"{args.seed}; {paired})")
    few = {task: row["examples"] for task, row in table.items() if "min_examples" in row}
    if few:
        counts = ", ".join(f"{printable(task)} (A {na}, B {nb})" for task, (na, nb) in few.items())
        print(f"no interval for {counts}: a {args.level:.0%} bootstrap interval needs at least "
              f"{min_examples_for(args.level)} examples of a task in each file (docs/report.md)")
    biased = bias_note(table, printable, f"top-{args.k}")
    if biased is not None:
        print(f"{biased} (docs/report.md)")
    if not with_ci and not few and args.resamples > 0:
        missing = " and ".join(n for n, s in (("A", a), ("B", b)) if not s.has_examples)
        dropped = [n for n, s in (("A", a), ("B", b)) if (s.extra or {}).get("example_values_dropped")]
        why = (f"{' and '.join(dropped)} had more examples than per-example values are kept for" if dropped else
               "made before they were kept, or by a multi-process run")
        print(f"no intervals: {missing} kept no per-example values ({why})")


def _print_differences(a: HeadScores, b: HeadScores) -> dict:
    """A note per thing the two files were measured under differently (metric, baseline); the ``--json`` field
    ``_differences`` ({what: {"A": ..., "B": ...}}), empty when nothing differs."""
    differences = provenance_differences(a, b)
    verbs = {"metric": "measure different metrics", "baseline": "use different baselines"}
    for what, (x, y) in differences.items():  # any JSON value a file may hold, shown as one line
        print(f"note: the files {verbs[what]} (A {printable(x)} vs B {printable(y)})")
    if not differences:
        return {}
    return {"_differences": {what: {"A": x, "B": y} for what, (x, y) in differences.items()}}


def load_finite(path: str, heads_for: str | None = None) -> HeadScores:
    """The scores file at ``path``; HeadscoreError naming it where it holds an infinite score
    (:func:`headscore.compare.require_finite`), or, with ``heads_for`` (the option that names it), where it holds
    edge values only (:func:`load_head_scores`)."""
    scores = HeadScores.load(path) if heads_for is None else load_head_scores(path, heads_for)
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
