"""Which integrated-gradients path tracks activation patching best at head level: the input path or the gate path.

Issue 24 asks whether integrated gradients should move the gates (every gate from 1 toward its baseline, all
at once: ``score --method ig``) or the input (EAP-IG-inputs: the input embeddings from the clean prompt toward
the corrupted one, the gradient dotted with each head's clean-minus-corrupted output). The input path exists in
headscore for edges (``score --edges --method ig``), whose head values are the sums of their edge scores: the
same node quantity, (a_clean - a_corrupt) . mean gradient. This script scores the IOI setting of
``benchmarks/fidelity.py`` (logit difference, ABC-corrupted prompts, 2 examples per template) every way and
compares each head map with the exact patching map that ``fidelity.py`` wrote (``ioi.exact.hs``):

- ``AtP``: the gradient at the clean run (taylor against the corrupted run);
- ``gate path 1 -> 1 - f``: ``score --method ig --path-fraction f``;
- ``input path 1 -> 1 - f``: the gradient at input embeddings ``e_corrupt + alpha (e_clean - e_corrupt)`` for
  alpha at the midpoints of ``steps`` equal pieces of [1 - f, 1] (``score --edges --method ig --path-fraction
  f``; f = 1, the default there: EAP-IG-inputs as published).

Cost: each input-path run's wall time over AtP's through the same edge pass (both pay the edge bookkeeping),
and each gate-path run's over AtP's head-only time, median of ``--repeats``.

    python benchmarks/input_path_search.py --exact benchmarks/results/fidelity/ioi.exact.hs --threads 2 \
        --out benchmarks/results/fidelity/input_path_search.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import headscore
from headscore.output_files import atomic_write
from headscore.results import HeadScores

sys.path.insert(0, str(Path(__file__).parent))
import fidelity  # noqa: E402  (the benchmark beside this one: its examples and agreement figures)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--exact", required=True, help="fidelity.py's ioi.exact.hs (same examples: --per-task)")
    p.add_argument("--per-task", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="text file for the table (must not be the exact map)")
    args = p.parse_args()
    out, exact = Path(args.out), Path(args.exact)
    if out.resolve() == exact.resolve():
        raise SystemExit("--out would overwrite --exact")
    out.parent.mkdir(parents=True, exist_ok=True)
    probe = out.parent / ".writable"
    probe.write_text("")  # fail now if the folder cannot be written, not after the runs
    probe.unlink()
    if args.threads:
        torch.set_num_threads(args.threads)
    truth = HeadScores.load(exact)
    lm = headscore.load_model(args.model)
    examples = fidelity.examples_for("ioi", args.per_task)
    common = {"batch_size": args.batch_size, "metric": "logit-diff", "baseline": "corrupt", "progress": False}
    runs = [("AtP", "heads", {"method": "taylor"}),
            ("AtP (edge pass)", "edges", {"method": "taylor", "edges": True})]
    runs += [(f"gate path 1 -> {1 - f:g}, 2 steps", "heads", {"method": "ig", "steps": 2, "path_fraction": f})
             for f in (0.2, 1.0)]
    runs += [(f"input path 1 -> {1 - f:g}, {s} step{'s' * (s > 1)}", "edges",
              {"method": "ig", "steps": s, "path_fraction": f, "edges": True})
             for f, steps in ((1.0, (1, 2, 3, 5)), (0.2, (1, 2)), (0.5, (1, 2))) for s in steps]
    headscore.score(lm, examples[:args.batch_size], **common)  # warm-up
    seconds, rows = {}, []
    for name, unit, kw in runs:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = headscore.score(lm, examples, **common, **kw)
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
        tasks = fidelity.per_task(result, truth).values()
        cost = seconds[name] / seconds["AtP" if unit == "heads" else "AtP (edge pass)"]
        rows.append(f"| {name} | {cost:.2f} | {np.mean([t['spearman'] for t in tasks]):.3f} "
                    f"({min(t['spearman'] for t in tasks):.3f}) | {np.mean([t['pearson'] for t in tasks]):.3f} | "
                    f"{np.mean([t['recall20'] for t in tasks]):.2f} ({min(t['recall20'] for t in tasks):.2f}) | "
                    f"{np.mean([t['sign_errors20'] for t in tasks]):.1f} ({max(t['sign_errors20'] for t in tasks)}) |")
        print(rows[-1], flush=True)
    head = ["| method | cost (x AtP, same pass kind) | Spearman mean (min) | Pearson mean | top-20 recall mean (min) "
            "| sign errors in true top-20 mean (max) |", "|---|---:|---:|---:|---:|---:|"]
    text = "\n".join([f"{lm.name}, {len(examples)} IOI examples, {torch.get_num_threads()} threads; times (s): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()), "", *head, *rows]) + "\n"
    atomic_write(out, text.encode())
    print(text)


if __name__ == "__main__":
    main()
