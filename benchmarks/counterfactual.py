"""Attribution patching (AtP) against real activation patching on the built-in IOI suite, side by side.

For each metric (logit-diff, nll, prob): AtP (``score --baseline corrupt``) and activation patching
(``ablate --baseline corrupt``, every head at all positions) on the same examples; per task and metric
Spearman and top-10 overlap, and the heads where first-order misses most (largest |AtP - patching|).
Per position: AtP and patching of one (head, position) at a time on a subset, compared the same way.
Time: the plain forward+backward (no gates; backward to the input embeddings), taylor against zero, and
AtP against the corrupted run (median of ``--repeats`` after a warm-up); patching per head and per
(head, position) on the subset, timed once each, with their ratio.

    python benchmarks/counterfactual.py --max-examples 4 --positions-examples 2 \\
        --out benchmarks/results/ioi-counterfactual

Writes ``counterfactual.json`` and the score files (``atp-<metric>.hs``, ``patch-<metric>.hs``, and
``*-positions.hs``) into ``--out``, which must not hold anything else of value (files are replaced).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import headscore
from headscore.bench import floor_pass, machine_info
from headscore.compare import compare, compare_positions, largest_differences
from headscore.data.examples import limit_per_task
from headscore.data.tasks import load_tasks
from headscore.loss import resolve_metric
from headscore.output_files import atomic_write
from headscore.results import library_versions

METRICS = ("logit-diff", "nll", "prob")


def timed(fn, *args, **kwargs):
    """(result, wall seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def interleaved_times(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each function over ``repeats`` rounds after one warm-up round; within a round the
    functions run back to back, so a slow spell of a shared machine hits all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn)[1])
    return times


def agreement_rows(atp, patch, k: int = 10, misses: int = 5) -> dict:
    """Per task: Spearman, top-k overlap and the largest misses of AtP against patching."""
    rows = {}
    for task, agree in compare(atp, patch, k).items():
        rows[task] = {**agree.as_dict(), "misses": [
            {"layer": m.layer, "head": m.head, "atp": m.a, "patching": m.b} for m in
            largest_differences(atp, patch, task, misses)]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=headscore.models.DEFAULT_MODEL)
    parser.add_argument("--max-examples", type=int, default=4, help="IOI examples per task (5 tasks)")
    parser.add_argument("--positions-examples", type=int, default=2,
                        help="examples of the first task for the per-position comparison")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-examples", type=int, default=None,
                        help="IOI examples per task for the timing part (default: --max-examples)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parts", default="timing,metrics,positions,figures",
                        help="which parts to run (comma-separated); a part's results replace its section of an "
                             "existing counterfactual.json in --out")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = headscore.load_model(args.model)
    examples = limit_per_task(load_tasks("ioi"), args.max_examples)
    subset = limit_per_task([e for e in examples if e.task == examples[0].task], args.positions_examples)
    kw = {"batch_size": args.batch_size, "progress": False}
    previous = out / "counterfactual.json"
    doc: dict = json.loads(previous.read_text()) if previous.is_file() else {}
    doc.update({"model": lm.name, "examples": len(examples), "tasks": sorted({e.task for e in examples}),
                "platform": platform.platform(), "versions": library_versions(),
                 "torch_threads": torch.get_num_threads()})
    command = ("python benchmarks/counterfactual.py " f"--max-examples {args.max_examples} --positions-examples "
               f"{args.positions_examples} --timing-examples {args.timing_examples or args.max_examples} --batch-size "
               f"{args.batch_size} --repeats {args.repeats} --threads "
               f"{torch.get_num_threads()} --parts {','.join(sorted(parts))} --out {args.out}")
    doc.setdefault("commands", {}).update({part: command for part in parts})
    doc.setdefault("machines", {}).update({part: machine_info() for part in parts})
    if "timing" in parts:
        timing(doc, lm, limit_per_task(load_tasks("ioi"), args.timing_examples or args.max_examples), args, kw)
    if "metrics" in parts:
        metrics(doc, lm, examples, out, kw)
    if "positions" in parts:
        positions(doc, lm, subset, out, kw)
    if "figures" in parts:
        figures(lm, subset, out)
    atomic_write(out / "counterfactual.json", json.dumps(doc, indent=1).encode())


def timing(doc: dict, lm, examples, args, kw: dict) -> None:
    """The floor, taylor and AtP against the corrupted run, timed on the same examples in interleaved rounds;
    the ratios are medians of the per-round ratios."""
    times = interleaved_times({
        # the floor: forward and backward to the input embeddings, no gates (tokenising included, as in score)
        "floor": lambda: floor_pass(lm.model, headscore.prepare(lm, examples).batches(args.batch_size, progress=False),
                                    resolve_metric("logit-diff")),
        "taylor": lambda: headscore.score(lm, examples, metric="logit-diff", **kw),
        "atp": lambda: headscore.score(lm, examples, metric="logit-diff", baseline="corrupt", **kw),
    }, args.repeats)
    median = {name: statistics.median(t) for name, t in times.items()}

    def ratio(name: str) -> float:
        return statistics.median(x / f for x, f in zip(times[name], times["floor"], strict=True))

    doc["time"] = {"examples": len(examples), "floor_s": median["floor"], "taylor_s": median["taylor"],
                   "atp_corrupt_s": median["atp"], "atp_over_floor": ratio("atp"),
                   "taylor_over_floor": ratio("taylor"), "runs": times, "threads": torch.get_num_threads()}
    print(f"{len(examples)} examples: floor {median['floor']:.2f} s, taylor {median['taylor']:.2f} s, AtP (corrupt) "
          f"{median['atp']:.2f} s; per-round ratios: taylor {ratio('taylor'):.2f}x, AtP {ratio('atp'):.2f}x the floor",
          flush=True)


def metrics(doc: dict, lm, examples, out: Path, kw: dict) -> None:
    """AtP against activation patching per metric."""
    doc["metrics"] = {}
    for metric in METRICS:
        atp_scores = headscore.score(lm, examples, metric=metric, baseline="corrupt", **kw)
        patch_scores, seconds = timed(headscore.ablate, lm, examples, metric=metric, baseline="corrupt", **kw)
        atp_scores.save(out / f"atp-{metric}.hs")
        patch_scores.save(out / f"patch-{metric}.hs")
        doc["metrics"][metric] = {"patching_s": seconds, "mode": patch_scores.extra["mode"],
                                  "tasks": agreement_rows(atp_scores, patch_scores)}
        mean_rho = statistics.mean(r["spearman"] for r in doc["metrics"][metric]["tasks"].values())
        print(f"{metric}: patching {seconds:.1f} s; mean Spearman(AtP, patching) {mean_rho:.3f}", flush=True)



def positions(doc: dict, lm, subset, out: Path, kw: dict) -> None:
    """Per position, on a subset: AtP and patching of each (head, position); whole-head patching timed beside."""
    pos_atp = headscore.score(lm, subset, metric="logit-diff", baseline="corrupt", per_position=True, **kw)
    pos_patch, t_pos = timed(headscore.ablate, lm, subset, metric="logit-diff", baseline="corrupt",
                             per_position=True, **kw)
    _, t_head = timed(headscore.ablate, lm, subset, metric="logit-diff", baseline="corrupt", **kw)
    pos_atp.save(out / "atp-logit-diff-positions.hs")
    pos_patch.save(out / "patch-logit-diff-positions.hs")
    agree = compare_positions(pos_atp, pos_patch)
    # the per-position run also patches whole heads: its extra cost is the per-position part
    doc["positions"] = {"examples": len(subset), "task": subset[0].task, "positions": pos_atp.positions,
                        "per_head_s": t_head, "per_head_and_position_s": t_pos,
                        "ratio": t_pos / t_head, "agreement": {t: a.as_dict() for t, a in agree.items()}}
    print(f"per position ({len(subset)} examples of {subset[0].task}): per head {t_head:.1f} s, per head and "
          f"position {t_pos:.1f} s ({t_pos / t_head:.1f}x); Spearman {next(iter(agree.values())).spearman:.3f}")


def figures(lm, subset, out: Path) -> None:
    """The pictures of docs/counterfactual.md from the score files of the other parts: the report of AtP against
    patching (logit-diff), and the per-position maps of both, labelled with the tokens of the first example."""
    from headscore.report import position_heatmaps, write_report

    atp, patch = (headscore.HeadScores.load(out / f"{kind}-logit-diff.hs") for kind in ("atp", "patch"))
    write_report(atp, out / "report", ablation=patch)
    pos = {kind: headscore.HeadScores.load(out / f"{kind}-logit-diff-positions.hs") for kind in ("atp", "patch")}
    example = headscore.prepare(lm, subset[:1]).tokenized[0]
    # the subset's examples have one length: the shown positions are this example's tokens but the last
    tokens = {subset[0].task: [lm.tokenizer.decode([i]) for i in example.ids[:-1]]}
    for kind, title in (("atp", "AtP, one pass"), ("patch", "Activation patching, a pass per head and token")):
        position_heatmaps(pos[kind], out / f"positions-{kind}", k=12, tokens=tokens,
                          title=f"{title}\ndrop in logit difference, top 12 heads, {lm.name}")


if __name__ == "__main__":
    main()
