"""The ``headscore`` command: score, ablate, compare, report. Thin: parses arguments, calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import HeadscoreError


def _tasks_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="builtin",
                        help="examples: 'builtin' (the built-in suite, default), 'cogqa:PATH' (a CogQA JSON "
                             "file) or a JSONL file of "
                             '{"prompt", "target", "task"} objects')
    parser.add_argument("--max-examples", type=int, default=None, help="at most this many examples per task")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m (embedded, default), a local model directory, or a cached hub id")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default: 8)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _tasks_arg(parser)


def _parser() -> argparse.ArgumentParser:
    from .api import BASELINES, METHODS

    p = argparse.ArgumentParser(prog="headscore", description="Score how much every attention head matters per task.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score all heads from one forward and one backward pass per batch")
    _model_args(s)
    s.add_argument("--method", default="taylor", choices=[*METHODS, "probe"],
                   help="gradient scorer, or 'probe' (the CogQA study's probe; needs 2+ tasks)")
    s.add_argument("--out", required=True, help="output scores file (.hs)")
    s.add_argument("--export", action="append", default=[], help="also write a .csv or .json copy (repeatable)")
    s.add_argument("--kernel", default="auto", choices=["auto", "on", "off"],
                   help="fused Triton attention kernel: auto (on CUDA), on, off (default: auto)")
    s.add_argument("--checkpoint", default=None,
                   help="checkpoint file of a resumable run (default with --checkpoint-every/--resume: OUT.ckpt)")
    s.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="write the checkpoint every N batches (default 0: only at the end)")
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    s.add_argument("--distributed", action="store_true",
                   help="data-parallel over torch.distributed ranks (automatic when WORLD_SIZE > 1, e.g. torchrun)")

    a = sub.add_parser("ablate", help="ground truth: the loss increase when each head (or a set) is ablated")
    _model_args(a)
    a.add_argument("--baseline", default="zero", choices=BASELINES)
    a.add_argument("--mode", default="batched", choices=["batched", "sequential"])
    a.add_argument("--rows-per-pass", type=int, default=64, help="rows per forward pass in batched mode")
    a.add_argument("--heads", default=None,
                   help="ablate this set of heads at once instead of each head: 'LAYER.HEAD,LAYER.HEAD,...'")
    a.add_argument("--gate", type=float, default=0.0, help="with --heads: the gate value (0 ablates, 2 doubles)")
    a.add_argument("--out", default=None, help="output scores file (.hs); required unless --heads")
    a.add_argument("--export", action="append", default=[], help="also write a .csv or .json copy (repeatable)")

    c = sub.add_parser("compare", help="per-task Spearman, Kendall and top-k overlap of two score files")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--k", type=int, default=10, help="top-k size (default 10)")
    c.add_argument("--json", default=None, help="also write the table as JSON")

    r = sub.add_parser("report", help="heatmap grid, scatter vs ablation and a Markdown summary")
    r.add_argument("scores")
    r.add_argument("--ablation", default=None, help="ablation scores file to compare against")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--k", type=int, default=10, help="top heads listed per task")

    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="time and memory of all-head scoring vs ablation and "
                                                     "hook-based peers, side by side in one run"))
    from .cogqa import add_cogqa_commands

    add_cogqa_commands(sub, _model_args)
    return p


def load_tasks(spec: str):
    """Examples named on the command line: 'builtin' or a JSONL path."""
    from .data.builtin import builtin_suite
    from .data.examples import load_jsonl

    if spec == "builtin":
        return builtin_suite()
    if spec.startswith("cogqa:"):
        from .data.cogqa import load_cogqa

        return load_cogqa(spec[len("cogqa:"):])
    return load_jsonl(spec)


def _check_out(path: str | None) -> None:
    if path is None:
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise HeadscoreError(f"{path}: directory {parent} does not exist")
    if Path(path).is_dir():
        raise HeadscoreError(f"{path} is a directory; give a file name such as scores.hs")


def _check_exports(paths: Sequence[str]) -> None:
    for path in paths:
        if Path(path).suffix.lower() not in (".csv", ".json"):
            raise HeadscoreError(f"{path}: --export needs a .csv or .json file name")
        _check_out(path)


def _parse_heads(text: str) -> list[tuple[int, int]]:
    heads = []
    for item in text.split(","):
        try:
            layer, head = item.strip().split(".")
            heads.append((int(layer), int(head)))
        except ValueError:
            raise HeadscoreError(f"--heads: {item!r} is not LAYER.HEAD (for example 3.5)") from None
    return heads


def _load(args):
    from .models import load_model

    if args.batch_size < 1:
        raise HeadscoreError(f"--batch-size must be at least 1, got {args.batch_size}")
    examples = load_tasks(args.tasks)
    return load_model(args.model, device=args.device, dtype=args.dtype), examples


def _print_top(scores, k: int = 3) -> None:
    for task in scores.tasks:
        top = ", ".join(f"L{layer}.H{head} ({value:+.3g})" for layer, head, value in scores.top_k(k, task))
        print(f"  {task}: {top}")


def _finish(scores, out: str, exports: Sequence[str]) -> None:
    scores.save(out)
    for path in exports:
        scores.export(path)
    n = int(scores.counts.sum())
    print(f"{scores.method}: {len(scores.tasks)} tasks, {n} examples, {scores.num_layers}x{scores.num_heads} heads "
          f"in {scores.extra.get('seconds', 0):.1f}s -> {out}")
    _print_top(scores)


def cmd_score(args) -> None:
    from .api import score

    _check_out(args.out)
    _check_exports(args.export)
    from .distributed import cli_begin, cli_end

    rank, world = cli_begin(args)
    lm, examples = _load(args)
    kernel = {"auto": None, "on": True, "off": False}[args.kernel]
    if args.method == "probe":
        from .data.examples import limit_per_task
        from .methods.probe import probe_scores

        result = probe_scores(lm, limit_per_task(examples, args.max_examples), batch_size=args.batch_size,
                              progress=not args.no_progress)
        print(f"probe held-out accuracy {result.extra['probe_accuracy']:.3f} "
              f"(chance {result.extra['chance_accuracy']:.3f})")
        _finish(result, args.out, args.export)
        return
    result = score(lm, examples, method=args.method, batch_size=args.batch_size, max_examples=args.max_examples,
                   progress=not args.no_progress and rank == 0, kernel=kernel, checkpoint=args.checkpoint,
                   checkpoint_every=args.checkpoint_every, resume=args.resume, distributed=world > 1)
    if rank == 0:
        _finish(result, args.out, args.export)
    cli_end(args, world)


def cmd_ablate(args) -> None:
    from .api import ablate, ablate_heads

    if args.heads is None and args.out is None:
        raise HeadscoreError("ablate needs --out (or --heads to ablate one set of heads)")
    _check_out(args.out)
    _check_exports(args.export)
    heads = _parse_heads(args.heads) if args.heads else None
    lm, examples = _load(args)
    progress = not args.no_progress
    if heads is not None:
        effects = ablate_heads(lm, examples, heads, baseline=args.baseline, gate=args.gate,
                               batch_size=args.batch_size, max_examples=args.max_examples, progress=progress)
        print(f"{'task':<28} {'n':>4} {'clean loss':>11} {'change':>10} {'stderr':>9}")
        for task, eff in effects.items():
            print(f"{task:<28} {eff.count:>4} {eff.clean_loss:>11.4f} {eff.delta:>+10.4f} {eff.stderr:>9.4f}")
        if args.out:
            doc = {t: vars(e) for t, e in effects.items()}
            from .results import atomic_write

            atomic_write(args.out, json.dumps(doc, indent=1).encode())
        return
    result = ablate(lm, examples, baseline=args.baseline, mode=args.mode, batch_size=args.batch_size,
                    rows_per_pass=args.rows_per_pass, max_examples=args.max_examples, progress=progress)
    _finish(result, args.out, args.export)


def cmd_compare(args) -> None:
    from .compare import compare
    from .results import HeadScores, atomic_write

    a, b = HeadScores.load(args.a), HeadScores.load(args.b)
    table = compare(a, b, k=args.k)
    print(f"{a.method} vs {b.method}")
    print(f"{'task':<28} {'spearman':>9} {'kendall':>8} {'top-' + str(args.k):>7}")
    for task, ag in table.items():
        print(f"{task:<28} {ag.spearman:>9.3f} {ag.kendall:>8.3f} {ag.topk_overlap:>7.2f}")
    if args.json:
        atomic_write(args.json, json.dumps({t: ag.as_dict() for t, ag in table.items()}, indent=1).encode())


def cmd_report(args) -> None:
    from .compare import compare
    from .results import HeadScores

    scores = HeadScores.load(args.scores)
    ablation = HeadScores.load(args.ablation) if args.ablation else None
    from .report import write_report
    comparison = None
    if ablation is not None:
        common = [t for t in scores.tasks if t in ablation.tasks]
        if not common:
            raise HeadscoreError("the scores and the ablation file have no task in common")
        scores, ablation = scores.select(common), ablation.select(common)
        comparison = {t: ag.as_dict() for t, ag in compare(scores, ablation, k=args.k).items()}
    try:
        paths = write_report(scores, args.out, ablation=ablation, comparison=comparison, k=args.k)
    except ValueError as exc:
        raise HeadscoreError(str(exc)) from None
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_bench(args) -> None:
    from .bench import run_from_args

    run_from_args(args)


COMMANDS = {"score": cmd_score, "ablate": cmd_ablate, "compare": cmd_compare, "report": cmd_report,
            "bench": cmd_bench}


def _cogqa_command(name: str):
    def run(args) -> None:
        from . import cogqa

        getattr(cogqa, name)(args)
    return run


COMMANDS.update({"intervene": _cogqa_command("cmd_intervene"),
                 "reproduce-cogqa": _cogqa_command("cmd_reproduce_cogqa")})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except HeadscoreError as exc:
        print(f"headscore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headscore: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
