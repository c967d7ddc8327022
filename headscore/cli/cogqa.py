"""``headscore intervene`` and ``headscore reproduce-cogqa``: the CogQA study's workflows."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..cogqa import REPRODUCTION_FILES, intervene, reproduce_cogqa
from ..cogqa.reproduce import ci_cell, interval_cell
from ..data.examples import limit_per_task
from ..errors import HeadscoreError
from ..models import load_model
from ..output_files import OutputSet
from ..output_paths import OutputDir
from ..results import json_bytes
from ..text import printable
from .common import (
    add_interval_args,
    add_model_args,
    at_least,
    check_command_outputs,
    finite_float,
    load_head_scores,
    load_model_and_tasks,
    open_fraction,
)


def register(sub) -> dict[str, Callable]:
    """Add ``intervene`` and ``reproduce-cogqa``."""
    i = sub.add_parser("intervene", help="ablate / amplify each task's top-k heads vs k random heads")
    add_model_args(i)
    i.add_argument("--scores", required=True, help="scores file (.hs) whose maps pick the top-k heads")
    i.add_argument("--k", type=at_least(1), default=5, help="heads per set (default 5)")
    i.add_argument("--seeds", type=at_least(0), default=3, help="random k-head control sets (default 3)")
    i.add_argument("--scale", type=finite_float, default=2.0, help="gate of the amplification rows (default 2.0)")
    i.add_argument("--others-per-function", type=at_least(-1), default=-1,
                   help="examples of each other task a task's head set is measured on (default -1 = all)")
    i.add_argument("--out", default=None, help="write the table as Markdown (.md) and JSON (.json) next to it")
    add_interval_args(i)

    r = sub.add_parser("reproduce-cogqa", help="the CogQA 'Cognitive Mirrors' head maps, checked by ablation")
    r.add_argument("path", help="the CogQA JSON file")
    r.add_argument("--out", required=True, help="output directory (report.md, figures, scores)")
    add_model_args(r, tasks=False)
    r.add_argument("--max-per-function", type=at_least(0), default=40,
                   help="sub-questions per function for probe and taylor (default 40; 0 = all)")
    r.add_argument("--gradient-per-function", type=at_least(0), default=0,
                   help="of those, examples per function for the taylor scores (default 0 = all)")
    r.add_argument("--ablation-per-function", type=at_least(0), default=3,
                   help="shortest examples per function ablated head by head (default 3; 0 = skip)")
    r.add_argument("--intervention-per-function", type=at_least(-1), default=10,
                   help="examples per function for the interventions, from questions no map saw; with "
                        "--max-per-function 0 every question is in the maps, and they come from the probe's "
                        "held-out questions, which the maps were built from (default 10; 0 = skip; -1 = all)")
    r.add_argument("--others-per-function", type=at_least(-1), default=2,
                   help="examples of each other function a function's head sets are measured on "
                        "(default 2; -1 = all)")
    r.add_argument("--k", type=at_least(1), default=5, help="heads per intervention set (default 5)")
    r.add_argument("--seeds", type=at_least(0), default=5, help="random k-head control sets (default 5)")
    add_interval_args(r)  # --seed also seeds the example sampling, the split and the probe
    r.add_argument("--train-fraction", type=open_fraction, default=0.8,
                   help="share of the questions the probe trains on (default 0.8; between 0 and 1)")
    r.add_argument("--chat-template", action="store_true", help="wrap prompts in the model's chat template")
    return {"intervene": cmd_intervene, "reproduce-cogqa": cmd_reproduce_cogqa}


def cmd_intervene(args: argparse.Namespace) -> None:
    """``headscore intervene``."""
    if args.out is not None and (not Path(args.out).name or args.out.endswith(("/", os.sep))):
        raise HeadscoreError(f"--out {args.out!r} names no file; give a file name (its .md and .json are written)")
    stem = None if args.out is None else Path(args.out).with_suffix("")
    outs = [] if stem is None else [("--out", str(stem.with_suffix(s))) for s in (".md", ".json")]
    check_command_outputs(args, outs, inputs=[("--scores", args.scores)])
    scores = load_head_scores(args.scores, "--scores")
    lm, examples = load_model_and_tasks(args)
    result = intervene(lm, limit_per_task(examples, args.max_examples), scores, k=args.k, seeds=range(args.seeds),
                       scale=args.scale, resamples=args.resamples, level=args.level, seed=args.seed,
                       progress=not args.no_progress,
                       others_per_function=None if args.others_per_function < 0 else args.others_per_function)
    print(result.to_markdown())
    if stem is not None:
        with OutputSet() as outputs:
            outputs.write(stem.with_suffix(".md"), result.to_markdown().encode(), label="--out")
            outputs.write(stem.with_suffix(".json"), json_bytes(result.as_dict()), label="--out")
        print(f"-> {stem.with_suffix('.md')}, {stem.with_suffix('.json')}")


def cmd_reproduce_cogqa(args: argparse.Namespace) -> None:
    """``headscore reproduce-cogqa PATH --out DIR``."""
    # a pipe (<(cmd)) is fine: the reproduction reads the file once (load_cogqa)
    if Path(args.path).is_dir():
        raise HeadscoreError(f"{args.path} is a directory; give a CogQA JSON file")
    if not Path(args.path).exists():
        raise HeadscoreError(f"{args.path}: no such CogQA file")
    check_command_outputs(args, dirs=[OutputDir("--out", args.out, REPRODUCTION_FILES)],
                          inputs=[("PATH", args.path)])
    lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=not args.no_progress)
    ivn = args.intervention_per_function
    start = time.perf_counter()
    rep = reproduce_cogqa(lm, args.path, max_per_function=args.max_per_function or None,
                          gradient_per_function=args.gradient_per_function or None,
                          ablation_per_function=args.ablation_per_function,
                          intervention_per_function=None if ivn < 0 else ivn, k=args.k, seeds=range(args.seeds),
                          others_per_function=None if args.others_per_function < 0 else args.others_per_function,
                          resamples=args.resamples, level=args.level,
                          train_fraction=args.train_fraction, seed=args.seed, batch_size=args.batch_size,
                          chat_template=args.chat_template, progress=not args.no_progress)
    report = rep.write(args.out)
    p = rep.probe.extra
    print(f"probe held-out accuracy {p['probe_accuracy']:.3f} (chance {p['chance_accuracy']:.3f}); "
          f"{rep.counts['examples']} examples; {time.perf_counter() - start:.0f}s")
    if rep.ablation is not None:
        print(f"Spearman vs ablation, {args.level:.0%} bootstrap intervals over examples ({args.resamples} "
              "resamples; * = interval excludes 0):")
        for t in rep.probe.tasks:
            cells = [ci_cell(a.get("spearman"), a.get("spearman_ci"), "+.3f") for a in (
                rep.probe_vs_ablation.get(t, {}), rep.taylor_vs_ablation.get(t, {}),
                rep.same_examples_vs_ablation.get(t, {}))]
            print(f"  {printable(t):<24} probe {cells[0]}, taylor {cells[1]}, taylor on the ablated examples "
                  f"{cells[2]}")
    for src, v in rep.methods_compared.get("sources", {}).items():
        print(f"  interventions, top-{args.k} by {src:<12} own dloss {interval_cell(v['own'])}, "
              f"selectivity {interval_cell(v['selectivity'])}")
    print(f"-> {report}")
