"""``headscore report``: heatmap grid, scatter against ablation and a Markdown summary."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

from ..edges.faithfulness import score_circuits
from ..errors import HeadscoreError
from ..intervals import agreement_table
from ..output_paths import OutputDir
from ..report import REPORT_FILES, write_report
from ..text import printable
from .common import add_interval_args, at_least, check_command_outputs, interval_options
from .compare import load_finite


def register(sub) -> dict[str, Callable]:
    """Add ``report``."""
    r = sub.add_parser("report", help="heatmap grid, scatter vs ablation, a Markdown summary and an interactive "
                                      "page (index.html)")
    r.add_argument("scores")
    r.add_argument("--ablation", default=None, help="ablation scores file to compare against")
    r.add_argument("--compare", default=None, metavar="OTHER",
                   help="another scores file (e.g. another method): its agreement table goes into index.html")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--k", type=at_least(1), default=10, help="top heads listed per task")
    r.add_argument("--circuit-edges", type=at_least(1), default=100, metavar="N",
                   help="for scores with edges (score --edges): each task's top N edges by |score|, pruned to "
                        "input -> logits paths, drawn in circuit.png and index.html (default 100)")
    add_interval_args(r)
    r.add_argument("--no-progress", action="store_true", help="hide the bootstrap's progress bar (shown on a "
                       "terminal when the intervals take over 2 s)")
    return {"report": cmd_report}


def cmd_report(args: argparse.Namespace) -> None:
    """``headscore report SCORES --out DIR``."""
    check_command_outputs(args, dirs=[OutputDir("--out", args.out, REPORT_FILES)],
                          inputs=[("SCORES", args.scores), ("--ablation", args.ablation), ("--compare", args.compare)])
    scores = load_finite(args.scores)  # an infinite score has no colour and no rank
    ablation = load_finite(args.ablation, "--ablation") if args.ablation else None
    other = load_finite(args.compare, "--compare") if args.compare else None
    comparison = other_comparison = None
    if ablation is not None:
        common = [t for t in scores.tasks if t in ablation.tasks]
        if not common:
            raise HeadscoreError("the scores and the ablation file have no task in common")
        left_out = [t for t in scores.tasks if t not in common]
        if left_out:  # the report pairs every panel with its ablation: say which tasks it leaves out
            warnings.warn(f"--ablation {args.ablation} has no {', '.join(printable(t) for t in left_out)}: the "
                          "report shows the tasks both files have", stacklevel=1)
        scores, ablation = scores.select(common), ablation.select(common)
        comparison = agreement_table(scores, ablation, args.k, **interval_options(args))
    if other is not None:
        common = [t for t in scores.tasks if t in other.tasks]
        if not common:
            raise HeadscoreError("the scores and the --compare file have no task in common")
        other_comparison = agreement_table(scores.select(common), other.select(common), args.k,
                                           **interval_options(args))
    circuits = score_circuits(scores, args.circuit_edges) if scores.has_edges else None
    try:
        paths = write_report(scores, args.out, ablation=ablation, comparison=comparison, k=args.k, circuits=circuits,
                             other_comparison=other_comparison,
                             other_name=f"{other.method} ({args.compare})" if other is not None else "")
    except ValueError as exc:
        raise HeadscoreError(str(exc)) from None
    for name, path in paths.items():
        print(f"{name}: {path}")
