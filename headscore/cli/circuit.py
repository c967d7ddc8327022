"""``headscore circuit``: each task's circuit from a scores file's edge scores, its faithfulness curve and
pictures (static and interactive)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..api import circuit
from ..errors import HeadscoreError
from ..output_files import OutputSet
from ..output_paths import OutputDir
from ..results import HeadScores, json_bytes
from ..text import printable
from .common import at_least, check_command_outputs, fraction_up_to_one, load_model_and_tasks

CIRCUIT_FILES = ("circuits.json", "circuit.png", "circuit.pdf", "faithfulness.png", "faithfulness.pdf",
                 "circuit.html")
"""What ``headscore circuit`` writes into its directory."""


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes must be whole numbers of at least 1")
    return sizes


def register(sub) -> dict[str, Callable]:
    """Add ``circuit``."""
    from .common import add_model_args

    c = sub.add_parser("circuit", help="each task's circuit from edge scores (score --edges): top edges pruned to "
                                       "input -> logits paths, faithfulness curve, pictures")
    c.add_argument("scores", help="a scores file with edge scores (headscore score --edges)")
    size = c.add_mutually_exclusive_group()
    size.add_argument("--edges", type=at_least(1), default=None, metavar="N",
                      help="the circuit's size: the top N edges by |score| (before pruning)")
    size.add_argument("--target-faithfulness", type=fraction_up_to_one, default=None, metavar="F",
                      help="the smallest size tried whose faithfulness reaches F (0 < F <= 1)")
    c.add_argument("--sizes", type=_sizes, default=None, metavar="N,N,...",
                   help="circuit sizes for the curve (default 10, 20, 50, 100, ... up to every edge)")
    c.add_argument("--select", choices=["abs", "signed"], default="abs",
                   help="rank edges by |score| (abs, default) or by score, largest first (signed); docs/edges.md")
    c.add_argument("--rows-per-pass", type=at_least(1), default=64, help="circuit rows per forward pass")
    c.add_argument("--out", required=True, help="output directory (circuits.json, circuit.png/.pdf, "
                                                "faithfulness.png/.pdf, circuit.html)")
    add_model_args(c)
    return {"circuit": cmd_circuit}


def cmd_circuit(args: argparse.Namespace) -> None:
    """``headscore circuit SCORES --out DIR``."""
    from ..report.circuit import circuit_pictures, faithfulness_pictures
    from ..report.circuit_html import circuit_page

    check_command_outputs(args, dirs=[OutputDir("--out", args.out, CIRCUIT_FILES)], inputs=[("SCORES", args.scores)])
    scores = HeadScores.load(args.scores)
    if not scores.has_edges:
        raise HeadscoreError(f"{args.scores} has no edge scores (score it with --edges)")
    if args.edges is not None and args.edges > scores.edge_maps.num_edges:
        raise HeadscoreError(f"--edges {args.edges}: {args.scores} has {scores.edge_maps.num_edges} edges")
    lm, examples = load_model_and_tasks(args)
    circuits = circuit(lm, examples, scores, edges=args.edges, target_faithfulness=args.target_faithfulness,
                       sizes=args.sizes, select=args.select, batch_size=args.batch_size,
                       rows_per_pass=args.rows_per_pass, max_examples=args.max_examples,
                       progress=not args.no_progress)
    doc = {"scores": args.scores, "model": scores.model, "method": scores.method,
           "circuits": [c.as_json() for c in circuits]}
    with OutputSet() as outputs:
        out = outputs.directory(args.out, CIRCUIT_FILES, label="--out")
        (out / "circuits.json").write_bytes(json_bytes(doc))
        # each figure drawn once, rendered in memory and written atomically (as the report's are)
        circuit_pictures(circuits, out / "circuit")
        curve_png, _ = faithfulness_pictures(circuits, out / "faithfulness")
        (out / "circuit.html").write_text(circuit_page(circuits, title=f"Circuits of {scores.model} "
                                                                        f"({scores.method})",
                                                       curve_png=curve_png.read_bytes()), encoding="utf-8")
    for c in circuits:
        top = ", ".join(f"{u} -> {d}" for u, d, _ in c.edge_list()[:3])
        print(f"  {printable(c.task)}: {int(c.edges.sum())} edges (top {c.asked}), faithfulness "
              f"{c.faithfulness:.3f}; {top}")
    print(f"circuits -> {args.out}")
