"""How closely each estimator tracks exact ablation (or activation patching), and at what cost, in one run.

For three settings on one model (default: the embedded SmolLM2-135M):

- ``builtin``: the built-in suite, NLL, zero ablation;
- ``ioi``: the IOI suite, logit difference, corrupted prompts (AtP against activation patching);
- ``induction``: repeated random words (the second half repeats the first; the target is the next
  repeated word), NLL, zero ablation;

every method scores the same examples and exact ablation/patching (prefix reuse) gives the truth. Per task:
Spearman and Pearson with the truth over all heads, top-10 and top-20 recall (share of the true top-k
that the method's top-k holds), sign errors among the true top-20 (the method's value has the other
sign), and the method's wall time as a multiple of taylor's (one forward + backward per batch) measured
in the same process (median of ``--repeats`` runs; the exact run once). Writes ``fidelity.json``,
``fidelity.md`` and ``pareto.png`` (mean Spearman against cost, exact ablation as the far point).

    python benchmarks/fidelity.py --out benchmarks/results/fidelity --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import headscore
from headscore.compare import spearman
from headscore.data.examples import Example
from headscore.data.tasks import load_tasks
from headscore.output_files import atomic_write
from headscore.results import HeadScores, library_versions

WORDS = ("apple river stone cloud green paper music table light horse window garden silver winter summer "
         "doctor market forest bridge yellow orange purple rabbit castle dragon pencil rocket planet island "
         "butter candle mirror jacket pocket ticket letter number circle square yellow basket bottle carpet "
         "engine farmer finger flower hammer kitten ladder magnet needle parrot rabbit saddle tomato violin").split()

SETTINGS = {
    "builtin": {"tasks": "builtin", "metric": "nll", "baseline": None, "exact": "zero"},
    "ioi": {"tasks": "ioi", "metric": "logit-diff", "baseline": "corrupt", "exact": "corrupt"},
    "induction": {"tasks": "induction", "metric": "nll", "baseline": None, "exact": "zero"},
}

# name -> score() keyword arguments; "verify" runs are taylor plus exact values on the chosen heads
METHODS = {
    "taylor": {"method": "taylor"},
    "ig (2 steps, path 1 -> 0.8)": {"method": "ig", "steps": 2, "path_fraction": 0.2},
    "ig (2 steps, path 1 -> 0)": {"method": "ig", "steps": 2, "path_fraction": 1.0},
    "ig (4 steps, path 1 -> 0)": {"method": "ig", "steps": 4, "path_fraction": 1.0},
    "curvature": {"method": "curvature"},
    "taylor + verify 5%": {"method": "taylor", "verify": True},
}


def induction_examples(n: int, length: int = 10, seed: int = 0) -> list[Example]:
    """``n`` prompts of ``length`` distinct random words followed by their first ``length // 2`` again;
    the target is the next repeated word (only an induction mechanism can predict it)."""
    rng = random.Random(seed)
    words = sorted(set(WORDS))
    out = []
    for _ in range(n):
        seq = rng.sample(words, length)
        half = length // 2
        out.append(Example(" ".join(seq + seq[:half]), " " + seq[half], "induction"))
    return out


def examples_for(setting: str, per_task: int) -> list[Example]:
    """The setting's examples, ``per_task`` per task (induction: one task of ``per_task`` examples)."""
    if setting == "induction":
        return induction_examples(per_task)
    examples = load_tasks(SETTINGS[setting]["tasks"])
    counts: dict[str, int] = {}
    kept = []
    for ex in examples:
        if counts.get(ex.task, 0) < per_task:
            counts[ex.task] = counts.get(ex.task, 0) + 1
            kept.append(ex)
    return kept


def slug(name: str) -> str:
    """A file-name form of a method's name: ``ig (2 steps, path 1 -> 0.8)`` -> ``ig-2-steps-path-1-0.8``."""
    return "-".join("".join(c if c.isalnum() or c == "." else " " for c in name).split())


def recall(est: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Share of the true top-k (largest values) among the estimate's top-k."""
    top_t = set(torch.topk(truth.flatten(), k).indices.tolist())
    top_e = set(torch.topk(est.flatten(), k).indices.tolist())
    return len(top_t & top_e) / k


def sign_errors(est: torch.Tensor, truth: torch.Tensor, k: int = 20) -> int:
    """How many of the true top-k heads the estimate gives the other sign."""
    idx = torch.topk(truth.flatten(), k).indices
    return int((torch.sign(est.flatten()[idx]) != torch.sign(truth.flatten()[idx])).sum())


def per_task(est: HeadScores, truth: HeadScores) -> dict[str, dict[str, float]]:
    """Agreement figures of every task."""
    out = {}
    for t, task in enumerate(truth.tasks):
        e, x = est.task(task), truth.values[t]
        out[task] = {"spearman": spearman(e.numpy(), x.numpy()),
                     "pearson": float(np.corrcoef(e.flatten().numpy(), x.flatten().numpy())[0, 1]),
                     "recall10": recall(e, x, 10), "recall20": recall(e, x, 20),
                     "sign_errors20": sign_errors(e, x, 20)}
        if est.exact is not None:
            out[task]["exact_heads"] = int(est.exact[est.tasks.index(task)].sum())
    return out


def run_setting(lm, setting: str, per_task_n: int, batch_size: int, repeats: int, out: Path) -> dict:
    """Every method and the exact run on one setting."""
    spec = SETTINGS[setting]
    examples = examples_for(setting, per_task_n)
    common = {"batch_size": batch_size, "metric": spec["metric"], "baseline": spec["baseline"], "progress": False}
    headscore.score(lm, examples[:batch_size], **common)  # warm-up
    results, seconds = {}, {}
    for name, kw in METHODS.items():
        times = []
        for _ in range(1 if kw.get("verify") else repeats):
            start = time.perf_counter()
            results[name] = headscore.score(lm, examples, **common, **kw)
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
        print(f"[{setting}] {name}: {seconds[name]:.1f} s", flush=True)
    start = time.perf_counter()
    truth = headscore.ablate(lm, examples, baseline=spec["exact"], metric=spec["metric"], batch_size=batch_size,
                             progress=True)
    seconds["exact"] = time.perf_counter() - start
    print(f"[{setting}] exact: {seconds['exact']:.1f} s", flush=True)
    truth.save(out / f"{setting}.exact.hs")
    for name, res in results.items():
        res.save(out / f"{setting}.{slug(name)}.hs")
    unit = seconds["taylor"]
    rows = {}
    for name, res in results.items():
        tasks = per_task(res, truth)
        rows[name] = {"cost": seconds[name] / unit, "seconds": seconds[name], "tasks": tasks,
                      "mean": {k: float(np.mean([v[k] for v in tasks.values()]))
                               for k in ("spearman", "pearson", "recall10", "recall20", "sign_errors20")},
                      "min": {k: float(np.min([v[k] for v in tasks.values()]))
                              for k in ("spearman", "pearson", "recall10", "recall20")},
                      "max_sign_errors20": int(max(v["sign_errors20"] for v in tasks.values()))}
        if res.extra.get("verify_seconds") is not None:
            rows[name]["verify_seconds"] = res.extra["verify_seconds"]
            rows[name]["verify_share_of_exact"] = seconds[name] / seconds["exact"]
    rows["exact"] = {"cost": seconds["exact"] / unit, "seconds": seconds["exact"],
                     "mean": {"spearman": 1.0, "pearson": 1.0, "recall10": 1.0, "recall20": 1.0,
                              "sign_errors20": 0.0}}
    return {"examples": len(examples), "tasks": truth.tasks, "metric": spec["metric"], "exact": spec["exact"],
            "methods": rows}


def pareto(doc: dict, path: Path) -> None:
    """Mean Spearman with the truth against cost (x taylor), one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(doc["settings"])
    names = list(dict.fromkeys(n for s in settings for n in doc["settings"][s]["methods"]))
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    markers = {n: "*" if n == "exact" else "os^Dvp<>h"[i % 9] for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.9), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        rows = doc["settings"][setting]["methods"]
        for name, row in rows.items():
            ax.scatter([row["cost"]], [row["mean"]["spearman"]], s=90 if name == "exact" else 45,
                       marker=markers[name], color=colours[name], edgecolor="black", linewidth=0.5, zorder=3,
                       label=name)
        ax.set_xscale("log")
        ax.set_xlabel("cost (x taylor: one forward + backward)")
        ax.set_ylabel("mean Spearman with exact, per task")
        ax.set_title(f"{setting} ({doc['settings'][setting]['metric']}, {doc['settings'][setting]['exact']})")
        ax.axhline(0.95, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
        ax.set_ylim(min(-0.05, min(r["mean"]["spearman"] for r in rows.values()) - 0.05), 1.05)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(f"Agreement vs cost on {doc['model']} (dashed: target 0.95)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(doc: dict) -> str:
    """One table per setting."""
    lines = [f"# Fidelity on {doc['model']} ({doc['machine']})", ""]
    for setting, sdoc in doc["settings"].items():
        lines += [f"## {setting}: {sdoc['examples']} examples, {len(sdoc['tasks'])} task(s), metric {sdoc['metric']}, "
                  f"truth: {sdoc['exact']}", "", f"    {doc.get('commands', {}).get(setting, '')}", "",
                  "| method | cost (x taylor) | Spearman mean (min) | Pearson mean (min) | top-10 recall | "
                  "top-20 recall mean (min) | sign errors in true top-20 (max) |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in sdoc["methods"].items():
            m = row["mean"]
            if name == "exact":
                lines.append(f"| exact | {row['cost']:.1f} | 1 | 1 | 1 | 1 | 0 |")
                continue
            n = row["min"]
            lines.append(f"| {name} | {row['cost']:.2f} | {m['spearman']:.3f} ({n['spearman']:.3f}) | "
                         f"{m['pearson']:.3f} ({n['pearson']:.3f}) | {m['recall10']:.2f} | "
                         f"{m['recall20']:.2f} ({n['recall20']:.2f}) | {m['sign_errors20']:.1f} "
                         f"({row['max_sign_errors20']}) |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--settings", default="builtin,ioi,induction")
    p.add_argument("--replot", action="store_true", help="only redraw pareto.png and fidelity.md from fidelity.json")
    p.add_argument("--update", action="store_true",
                   help="keep the other settings of an existing fidelity.json (rerun only --settings)")
    p.add_argument("--per-task", type=int, default=2, help="examples per task (induction: examples in all)")
    p.add_argument("--induction-examples", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each estimator (median)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="directory for fidelity.json, fidelity.md, pareto.png and the maps")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.replot:
        doc = json.loads((out / "fidelity.json").read_text())
        atomic_write(out / "fidelity.md", markdown(doc).encode())
        pareto(doc, out / "pareto.png")
        return
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".writable"
    probe.write_text("")  # fail now, not after an hour of ablation
    probe.unlink()
    lm = headscore.load_model(args.model)
    doc = {"model": lm.name, "machine": f"{platform.processor() or platform.machine()}, "
                                        f"{torch.get_num_threads()} torch threads",
           "versions": library_versions(), "settings": {}}
    command = "python benchmarks/fidelity.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if v is not None and v is not False)
    if args.update and (out / "fidelity.json").exists():
        doc = json.loads((out / "fidelity.json").read_text())
    for setting in args.settings.split(","):
        doc.setdefault("commands", {})[setting] = command
    for setting in args.settings.split(","):
        n = args.induction_examples if setting == "induction" else args.per_task
        doc["settings"][setting] = run_setting(lm, setting, n, args.batch_size, args.repeats, out)
        atomic_write(out / "fidelity.json", json.dumps(doc, indent=1).encode())
    atomic_write(out / "fidelity.md", markdown(doc).encode())
    pareto(doc, out / "pareto.png")
    print(markdown(doc))


if __name__ == "__main__":
    main()
