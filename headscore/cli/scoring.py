"""``headscore score`` and ``headscore ablate``."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..api import BASELINES, METHODS, ablate, ablate_edges, ablate_heads, score
from ..checkpoint import checkpoint_path
from ..cogqa.probe import probe_scores
from ..data.examples import limit_per_task
from ..distributed import env_world_size, init
from ..errors import HeadscoreError
from ..loss import METRICS
from ..methods.ablation import ABLATION_MODES
from ..methods.gradient import DEFAULT_IG_FRACTION, DEFAULT_IG_STEPS, NEEDS_MEAN_BASELINE
from ..output_files import atomic_write
from ..results import HeadScores, json_bytes
from ..text import printable
from .common import (
    add_model_args,
    at_least,
    check_command_outputs,
    check_scores_out,
    finite_float,
    load_model_and_tasks,
    save_scores,
)

METRIC_HELP = ("what the loss is: nll (default: target NLL), logit-diff (logit of the target's first token minus "
               "the foil's at the answer position; needs 'foil' in every example), prob (the target's probability); "
               "larger scores = the head matters more for it")
POSITION_NAMES = "positions named from the end of each prompt (end = last prompt token, end-1, ..., end+1 = first " \
                 "target token)"
POSITION_HELP = {"score": f"also keep each token's share of every head's score (they sum to it): {POSITION_NAMES}",
                 "ablate": "also patch each (head, token) alone, exactly (per-position patching; a head's cells need "
                           f"not sum to its own patching: effects across tokens do not add up): {POSITION_NAMES}"}


def _add_counterfactual_args(parser: argparse.ArgumentParser, baseline_default: str | None, command: str) -> None:
    parser.add_argument("--baseline", default=baseline_default, choices=BASELINES,
                        help="what a head is compared against: zero, mean (its mean output) or corrupt (its output on "
                             "each example's 'corrupt' prompt, per position: attribution / activation patching)"
                             + ("" if baseline_default else "; default zero (mean for atp-mean)"))
    parser.add_argument("--metric", default="nll", choices=METRICS, help=METRIC_HELP)
    parser.add_argument("--per-position", action="store_true", help=POSITION_HELP[command])


def register(sub) -> dict[str, Callable]:
    """Add ``score`` and ``ablate``."""
    s = sub.add_parser("score", help="score all heads from one forward and one backward pass per batch")
    add_model_args(s)
    s.add_argument("--method", default="taylor", choices=[*METHODS, "probe"],
                   help="gradient scorer, or 'probe' (the CogQA study's probe; needs 2+ tasks)")
    _add_counterfactual_args(s, None, "score")
    s.add_argument("--steps", type=at_least(1), default=None,
                   help=f"ig: points along the path, one forward + backward each (default {DEFAULT_IG_STEPS})")
    s.add_argument("--path-fraction", type=finite_float, default=None, metavar="F",
                   help="ig: the path runs from every gate at 1 to 1 - F (1 = all the way to the baseline; "
                        f"default {DEFAULT_IG_FRACTION}, the best measured: docs/fidelity.md); with --edges, the "
                        "input moves from the clean prompt's embeddings the share F of the way to the corrupted "
                        "one's (default 1, EAP-IG-inputs)")
    s.add_argument("--verify", type=at_least(1), nargs="?", const=True, default=None, metavar="K",
                   help="then measure exactly (ablation; patching with --baseline corrupt) the K heads per task "
                        "with the largest |score| and K flagged ones the estimate may underrate; their values "
                        "replace the estimates and are marked exact (K default: 5%% of the heads)")
    s.add_argument("--rows-per-pass", type=at_least(1), default=64,
                   help="with --verify: rows per forward pass of the exact measurements (default 64)")
    s.add_argument("--out", required=True, help="output scores file (.hs)")
    s.add_argument("--export", action="append", default=[], help="also write a .csv or .json copy (repeatable)")
    s.add_argument("--edges", action="store_true",
                   help="also score every edge between residual-stream nodes (embeddings, heads, MLPs -> query "
                        "heads, key/value heads, MLPs, logits) from the same pass (taylor or atp-mean; --method ig "
                        "--baseline corrupt: EAP-IG-inputs over --steps inputs)")
    s.add_argument("--export-edges", action="append", default=[], metavar="FILE",
                   help="with --edges: also write the edge scores as .csv or .json (repeatable)")
    s.add_argument("--kernel", default="auto", choices=["auto", "on", "off"],
                   help="fused Triton attention kernel: auto (on CUDA GPUs of Ampere or newer), on, off "
                        "(default: auto)")
    _add_checkpoint_args(s)
    s.add_argument("--distributed", action="store_true",
                   help="data-parallel over torch.distributed ranks (automatic when WORLD_SIZE > 1, e.g. torchrun)")

    a = sub.add_parser("ablate", help="ground truth: the loss increase when each head (or a set) is ablated")
    add_model_args(a)
    _add_counterfactual_args(a, "zero", "ablate")
    a.add_argument("--mode", default="prefix", choices=list(ABLATION_MODES),
                   help="prefix (default): layers below an ablated head run once per batch, about half the cost "
                        "of batched; batched: one pass carries many ablations; naive (= sequential): one pass per "
                        "head. All give the same numbers.")
    a.add_argument("--rows-per-pass", type=at_least(1), default=64,
                   help="rows per forward pass in prefix and batched mode (default 64)")
    a.add_argument("--heads", default=None,
                   help="ablate this set of heads at once instead of each head: 'LAYER.HEAD,LAYER.HEAD,...'")
    a.add_argument("--gate", type=finite_float, default=0.0, help="with --heads: the gate value (0 ablates, 2 doubles)")
    a.add_argument("--out", default=None, help="output scores file (.hs); required unless --heads (then a .json "
                   "table of the set's effect per task)")
    a.add_argument("--export", action="append", default=[], help="also write a .csv or .json copy (repeatable)")
    a.add_argument("--edges", action="store_true",
                   help="exact edge patching instead of heads: every edge, or with --scores and --top the top edges "
                        "of a scores file's edge scores (each task's, their union measured)")
    a.add_argument("--scores", default=None, metavar="FILE", help="with --edges: the scores file (scored --edges)")
    a.add_argument("--top", type=at_least(1), default=None, metavar="N",
                   help="with --edges --scores: each task's N edges with the largest |score|")
    a.add_argument("--export-edges", action="append", default=[], metavar="FILE",
                   help="with --edges: also write the exact edge values as .csv or .json (repeatable)")
    _add_checkpoint_args(a)
    return {"score": cmd_score, "ablate": cmd_ablate}


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--checkpoint-every``, ``--resume`` (score, ablate)."""
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file of a resumable run (default with --checkpoint-every/--resume: "
                             "OUT.ckpt)")
    parser.add_argument("--checkpoint-every", type=at_least(0), default=0, metavar="N",
                        help="write the checkpoint every N batches (default 0: at the end, and when the run stops "
                             "early: Ctrl-C, SIGTERM, an error)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")


def _uses_checkpoint(args: argparse.Namespace) -> bool:
    return bool(args.checkpoint or args.checkpoint_every or args.resume)


def _distributed_begin(args: argparse.Namespace) -> tuple[int, int]:
    """Under torchrun (or with ``--distributed``), the process group -> (rank, world size).

    Distributed when ``--distributed`` is given or ``WORLD_SIZE`` > 1 (torchrun sets it). A CUDA
    ``--device`` becomes ``cuda:LOCAL_RANK``.
    """
    if not _wants_distributed(args):
        return 0, 1
    if str(args.device).startswith("cuda") and ":" not in str(args.device):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(args.device))
    return init(device=args.device)


def _distributed_end(args: argparse.Namespace, world: int) -> None:
    """After rank 0 wrote the output: every rank deletes its checkpoint; the process group ends."""
    rank = 0
    if world > 1:
        dist.barrier()  # the output is written before any checkpoint goes
        rank = dist.get_rank()
    if args.checkpoint:
        checkpoint_path(args.checkpoint, rank, world).unlink(missing_ok=True)
    if world > 1:
        dist.destroy_process_group()


def _wants_distributed(args: argparse.Namespace) -> bool:
    return args.distributed or env_world_size() > 1


def cmd_score(args: argparse.Namespace) -> None:
    """``headscore score``. ``--checkpoint-every``/``--resume`` without ``--checkpoint`` use ``OUT.ckpt``."""
    uses_checkpoint = _uses_checkpoint(args)
    if args.method == "probe" and (uses_checkpoint or _wants_distributed(args)):
        raise HeadscoreError("--method probe supports neither --distributed nor checkpoints")
    if args.method == "probe" and (args.baseline or args.metric != "nll" or args.per_position or args.verify):
        raise HeadscoreError("--method probe takes no --baseline, --metric, --per-position or --verify")
    if args.path_fraction is not None and not 0 < args.path_fraction <= 1:
        raise HeadscoreError(f"--path-fraction must be in (0, 1], got {args.path_fraction}")
    for flag, value in (("--steps", args.steps), ("--path-fraction", args.path_fraction)):
        if value is not None and args.method != "ig":
            raise HeadscoreError(f"{flag} sets ig's path; --method {args.method} has none (add --method ig)")
    args.steps = DEFAULT_IG_STEPS if args.steps is None else args.steps
    if args.method in NEEDS_MEAN_BASELINE and args.baseline not in (None, "mean"):  # before the model loads
        raise HeadscoreError(f"method {args.method} uses the mean baseline; for baseline {args.baseline!r} use taylor")
    if args.verify is not None and args.per_position:
        raise HeadscoreError("--verify replaces heads' values by exact ones, whose per-position maps would stay "
                             "estimates: drop --verify or --per-position (ablate --per-position patches each "
                             "position exactly)")
    if args.verify is not None and args.method in ("abs", "fisher"):
        raise HeadscoreError(f"--verify replaces estimates by exact ablation values; --method {args.method} has no "
                             "exact counterpart (use taylor, ig, curvature or atp-mean)")
    if args.verify is not None and (uses_checkpoint or _wants_distributed(args)):
        raise HeadscoreError("--verify supports neither --distributed nor checkpoints")
    if args.method in ("curvature", "abs", "fisher") and args.per_position:
        raise HeadscoreError(f"--method {args.method} has no per-position maps (use taylor or ig with "
                             "--per-position)")
    if args.per_position and (uses_checkpoint or _wants_distributed(args)):
        raise HeadscoreError("--per-position supports neither --distributed nor checkpoints")
    _check_edge_flags(args, uses_checkpoint)
    if uses_checkpoint and not args.checkpoint:
        args.checkpoint = f"{args.out}.ckpt"
    if args.kernel == "on":
        from ..kernels.dispatch import kernel_unavailable  # imports triton: only when asked for

        problem = kernel_unavailable(args.device)
        if problem:
            raise HeadscoreError(f"--kernel on: {problem}; use --kernel auto (the kernel where it can run) or off")
    world = env_world_size() if _wants_distributed(args) else 1  # every rank's checkpoint file is an output
    checkpoints = [("--checkpoint", args.checkpoint)] if not args.checkpoint or world == 1 else \
        [(f"--checkpoint (rank {r}'s file)", str(checkpoint_path(args.checkpoint, r, world))) for r in range(world)]
    check_scores_out(args.out)
    check_command_outputs(args, [("--out", args.out), *(("--export", p) for p in args.export),
                                 *(("--export-edges", p) for p in args.export_edges), *checkpoints])
    rank, world = _distributed_begin(args)
    lm, examples = load_model_and_tasks(args)
    kernel = {"auto": None, "on": True, "off": False}[args.kernel]
    progress = not args.no_progress
    if args.method == "probe":
        result = probe_scores(lm, limit_per_task(examples, args.max_examples), batch_size=args.batch_size,
                              progress=progress)
        print(f"probe held-out accuracy {result.extra['probe_accuracy']:.3f} "
              f"(chance {result.extra['chance_accuracy']:.3f})")
        save_scores(result, args.out, args.export)
        return
    result = score(lm, examples, method=args.method, batch_size=args.batch_size, max_examples=args.max_examples,
                   baseline=args.baseline, metric=args.metric, per_position=args.per_position,
                   progress=progress and rank == 0, kernel=kernel, checkpoint=args.checkpoint,
                   checkpoint_every=args.checkpoint_every, resume=args.resume, distributed=world > 1,
                   steps=args.steps, path_fraction=args.path_fraction, verify=args.verify,
                   rows_per_pass=args.rows_per_pass, edges=args.edges)
    if rank == 0:
        save_scores(result, args.out, args.export, args.export_edges)
    _distributed_end(args, world)


def _check_edge_flags(args: argparse.Namespace, uses_checkpoint: bool) -> None:
    """``score --edges`` settings it cannot take, before the model loads."""
    if args.export_edges and not args.edges:
        raise HeadscoreError("--export-edges writes edge scores: add --edges")
    if not args.edges:
        return
    if args.method not in ("taylor", "atp-mean", "ig"):
        raise HeadscoreError(f"--edges scores edges with taylor (attribution patching), atp-mean or ig (EAP-IG-inputs),"
                             f" not --method {args.method}")
    if args.method == "ig" and args.baseline != "corrupt":
        raise HeadscoreError("--edges --method ig interpolates the input between the corrupted and the clean prompt "
                             "(EAP-IG-inputs): add --baseline corrupt")
    for flag, on in (("--per-position", args.per_position), ("--verify", args.verify is not None),
                     ("--checkpoint", uses_checkpoint), ("--distributed", _wants_distributed(args))):
        if on:
            raise HeadscoreError(f"--edges does not go with {flag}")


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``'3.5,7.1'`` -> [(3, 5), (7, 1)]; also the ``L3.H5`` the summaries print."""
    heads = []
    for item in text.split(","):
        try:
            layer, head = re.fullmatch(r"L?(-?\d+)\.H?(-?\d+)", item.strip()).groups()
            heads.append((int(layer), int(head)))
        except (AttributeError, ValueError):
            raise HeadscoreError(f"--heads: {item!r} is not LAYER.HEAD (for example 3.5 or L3.H5)") from None
    return heads


def cmd_ablate(args: argparse.Namespace) -> None:
    """``headscore ablate``."""
    if args.heads is None and args.out is None:
        raise HeadscoreError("ablate needs --out (or --heads to ablate one set of heads)")
    uses_checkpoint = _uses_checkpoint(args)
    for flag, on in (("--heads", args.heads is not None), ("--edges", args.edges),
                     ("--per-position", args.per_position)):
        if on and uses_checkpoint:
            raise HeadscoreError(f"checkpoints keep ablate's per-head map: they do not go with {flag}")
    if uses_checkpoint and not args.checkpoint:
        args.checkpoint = f"{args.out}.ckpt"
    if args.edges:
        _ablate_edges(args)
        return
    if args.scores or args.top or args.export_edges:
        raise HeadscoreError("--scores, --top and --export-edges go with --edges")
    if args.gate != 0.0 and args.heads is None:
        raise HeadscoreError("--gate sets the gate of the --heads set; without --heads every head is ablated (gate 0)")
    heads = parse_heads(args.heads) if args.heads is not None else None
    if heads is not None and args.export:
        raise HeadscoreError("--export needs the per-head map; with --heads, --out writes the table as JSON")
    if heads is not None and args.per_position:
        raise HeadscoreError("--per-position patches each head on its own; it does not go with --heads")
    if heads is not None and args.out and Path(args.out).suffix.lower() != ".json":
        raise HeadscoreError(f"--out {args.out}: with --heads the output is a JSON table of the set's effect per "
                             "task, not a scores file; give it a .json name")
    if heads is None:
        check_scores_out(args.out)
    check_command_outputs(args, [("--out", args.out), *(("--export", p) for p in args.export),
                                 ("--checkpoint", args.checkpoint)])
    lm, examples = load_model_and_tasks(args)
    progress = not args.no_progress
    if heads is not None:
        effects = ablate_heads(lm, examples, heads, baseline=args.baseline, gate=args.gate, metric=args.metric,
                               batch_size=args.batch_size, max_examples=args.max_examples, progress=progress)
        print(f"{'task':<28} {'n':>4} {'clean loss':>11} {'change':>10} {'stderr':>9}")
        for task, eff in effects.items():
            print(f"{printable(task):<28} {eff.count:>4} {eff.clean_loss:>11.4f} {eff.delta:>+10.4f} "
                  f"{eff.stderr:>9.4f}")
        if args.out:
            atomic_write(args.out, json_bytes({t: vars(e) for t, e in effects.items()}))
        return
    result = ablate(lm, examples, baseline=args.baseline, mode=args.mode, batch_size=args.batch_size,
                    rows_per_pass=args.rows_per_pass, max_examples=args.max_examples, metric=args.metric,
                    per_position=args.per_position, progress=progress, checkpoint=args.checkpoint,
                    checkpoint_every=args.checkpoint_every, resume=args.resume)
    save_scores(result, args.out, args.export)
    if args.checkpoint:  # the output is written: the checkpoint has done its job
        Path(args.checkpoint).unlink(missing_ok=True)


def _ablate_edges(args: argparse.Namespace) -> None:
    """``headscore ablate --edges``: exact edge patching of every edge, or of a scores file's top edges."""
    if args.heads is not None or args.per_position or args.mode != "prefix" or args.gate != 0.0:
        raise HeadscoreError("--edges patches edges: it does not go with --heads, --gate, --per-position or --mode")
    if (args.scores is None) != (args.top is None):
        raise HeadscoreError("--scores and --top come together (the top N edges of that file's edge scores)")
    if args.export:
        raise HeadscoreError("--export writes head maps; exact edge patching has none: use --export-edges")
    check_scores_out(args.out)
    check_command_outputs(args, [("--out", args.out), *(("--export-edges", p) for p in args.export_edges)],
                          inputs=[("--scores", args.scores)])
    chosen = None
    if args.scores is not None:
        chosen = HeadScores.load(args.scores)
        if not chosen.has_edges:
            raise HeadscoreError(f"{args.scores} has no edge scores (score it with --edges)")
        if args.top > chosen.edge_maps.num_edges:
            raise HeadscoreError(f"--top {args.top}: {args.scores} has {chosen.edge_maps.num_edges} edges")
    lm, examples = load_model_and_tasks(args)
    result = ablate_edges(lm, examples, scores=chosen, top=args.top, baseline=args.baseline or "zero",
                          metric=args.metric, batch_size=args.batch_size, rows_per_pass=args.rows_per_pass,
                          max_examples=args.max_examples, progress=not args.no_progress)
    save_scores(result, args.out, [], args.export_edges)
