"""Where the verified mode's time goes: taylor alone, then taylor + ``verify`` on the same examples, with the
time of each part (the scoring pass, the corrupted runs, the prefix-reuse check, the exact passes).

The settings and examples are ``benchmarks/fidelity.py``'s; the share of full exact ablation uses the exact
run's seconds in ``--fidelity`` (a ``fidelity.json`` made on the same machine). The parts are found by name in
the installed headscore (older versions named them otherwise; a part that is not there is not timed), so the
same script times an earlier commit too:

    python benchmarks/verify_cost.py --threads 2 --fidelity benchmarks/results/fidelity/fidelity.json
    PYTHONPATH=/path/to/older/checkout python benchmarks/verify_cost.py --threads 2 ...

``--verify 7,14,28,41`` times several K instead of the default (5% of the heads) and, beside the cost, gives each
verified map's top-20 recall and Spearman with the exact map: how recall and cost trade against each other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import headscore
import headscore.api as api
import headscore.methods.verify as verify
from headscore.results import HeadScores

sys.path.insert(0, str(Path(__file__).parent))
import fidelity  # noqa: E402  (the benchmark beside this one)

PARTS = {verify: ("selected_losses", "gated_losses", "clean_losses", "prefix_reuse_works"),
         api: ("_batch_baseline", "gate_gradients", "_estimate")}


def timed(seconds: dict, calls: dict) -> None:
    """Wrap every part found so that its wall time adds up in ``seconds``."""
    for module, names in PARTS.items():
        for name in names:
            if not hasattr(module, name):
                continue
            inner = getattr(module, name)

            def wrapper(*args, _inner=inner, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _inner(*args, **kwargs)
                finally:
                    seconds[_name] += time.perf_counter() - start
                    calls[_name] += 1
            setattr(module, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="builtin,ioi,induction")
    p.add_argument("--per-task", type=int, default=2)
    p.add_argument("--induction-examples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fidelity", type=Path, default=None, help="fidelity.json with the exact runs' seconds")
    p.add_argument("--verify", default="5%",
                   help="comma-separated K values to time (heads per task verified, plus as many flagged; "
                        "5%% = the default K); with --fidelity, each K's map is also compared with the exact map "
                        "beside that file (<setting>.exact.hs): top-20 recall and Spearman")
    args = p.parse_args()
    ks = [True if k == "5%" else int(k) for k in args.verify.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    exact = {}
    if args.fidelity is not None:
        doc = json.loads(args.fidelity.read_text())
        exact = {s: v["methods"]["exact"]["seconds"] for s, v in doc["settings"].items()}
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    timed(seconds, calls)
    lm = headscore.load_model("smollm2-135m")
    print(f"headscore from {Path(headscore.__file__).parent}, {torch.get_num_threads()} threads")
    for setting in args.settings.split(","):
        spec = fidelity.SETTINGS[setting]
        examples = fidelity.examples_for(setting, args.induction_examples if setting == "induction" else args.per_task)
        common = {"batch_size": args.batch_size, "metric": spec["metric"], "baseline": spec["baseline"],
                  "progress": False}
        headscore.score(lm, examples[:args.batch_size], **common)  # warm-up
        truth = None
        if args.fidelity is not None and (args.fidelity.parent / f"{setting}.exact.hs").exists():
            truth = HeadScores.load(args.fidelity.parent / f"{setting}.exact.hs")
        runs = [("taylor", {})] + [(f"taylor + verify {'5%' if k is True else k}", {"verify": k}) for k in ks]
        for label, kw in runs:
            seconds.clear()
            calls.clear()
            start = time.perf_counter()
            result = headscore.score(lm, examples, **common, **kw)
            wall = time.perf_counter() - start
            share = f", {wall / exact[setting]:.1%} of exact ({exact[setting]:.1f} s)" if setting in exact else ""
            parts = ", ".join(f"{name} {seconds[name]:.2f} s ({calls[name]})" for name in seconds)
            agreement = ""
            if truth is not None:
                tasks = fidelity.per_task(result, truth).values()
                agreement = (f"; top-20 recall {np.mean([t['recall20'] for t in tasks]):.2f} "
                             f"(min {min(t['recall20'] for t in tasks):.2f}), Spearman "
                             f"{np.mean([t['spearman'] for t in tasks]):.3f}")
                if getattr(result, "exact", None) is not None:
                    agreement += f", {float(result.exact.sum(dim=(1, 2)).double().mean()):.0f} exact heads per task"
            print(f"[{setting}] {label}: {wall:.2f} s{share}{agreement}; {parts}", flush=True)


if __name__ == "__main__":
    main()
