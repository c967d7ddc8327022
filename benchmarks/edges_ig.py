"""EAP-IG-inputs against AtP for edges (issue 25): Spearman and Pearson with exact edge patching on each IOI task's
500 edges with the largest |AtP score| (SmolLM2-135M, 3 examples per template, logit-diff, corrupt).

    python benchmarks/edges_ig.py        # writes benchmarks/results/edges/eap-ig.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from scipy import stats

import headscore
from headscore.data.tasks import load_tasks

OPTIONS = dict(metric="logit-diff", baseline="corrupt", max_examples=3, progress=False)


def main() -> None:
    torch.set_num_threads(2)
    lm = headscore.load_model(progress=False)
    examples = load_tasks("ioi")
    atp = headscore.score(lm, examples, edges=True, **OPTIONS)
    ig = {steps: headscore.score(lm, examples, edges=True, method="ig", steps=steps, **OPTIONS) for steps in (3, 5)}
    exact = headscore.ablate_edges(lm, examples, scores=atp, top=500, **OPTIONS)
    out = {}
    for task in atp.tasks:
        idx = torch.topk(torch.nan_to_num(atp.edges(task).abs(), nan=-1.0).flatten(), 500).indices
        truth = exact.edges(task).flatten()[idx].numpy()
        row = {}
        for name, scores in (("atp", atp), *((f"ig{k}", s) for k, s in ig.items())):
            x = scores.edges(task).flatten()[idx].numpy()
            row[name] = float(stats.spearmanr(x, truth).statistic)
            row[f"{name}_pearson"] = float(stats.pearsonr(x, truth).statistic)
        out[task] = row
        print(task, {k: round(v, 3) for k, v in row.items()}, flush=True)
    path = Path(__file__).parent / "results" / "edges" / "eap-ig.json"
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
