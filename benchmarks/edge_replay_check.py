"""What exact edge patching's replay check costs: `edge_replay_works` on the first batch of the IOI suite
(logit difference, corrupted baselines), timed after a warm-up call.

    .venv/bin/python benchmarks/edge_replay_check.py [--model smollm2-135m] [--examples 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import headscore
from headscore.data.tasks import load_tasks
from headscore.edges.attribution import writer_outputs
from headscore.edges.patching import edge_replay_works
from headscore.edges.residual import residual_model
from headscore.loss import resolve_metric
from headscore.prepared import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = headscore.load_model(args.model)
    prep = prepare(lm, list(load_tasks("ioi"))[:args.examples])
    rm = residual_model(lm.model)
    metric = resolve_metric("logit-diff")
    batch = next(iter(prep.batches(args.examples, progress=False)))
    with headscore.patch(lm.model) as gates:
        base = writer_outputs(lm.model, gates, rm, batch.corrupted())
        edge_replay_works(lm.model, gates, rm, batch, base, metric)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            works = edge_replay_works(lm.model, gates, rm, batch, base, metric)
            times.append(time.perf_counter() - start)
    times.sort()
    print(f"{args.model}: replay {'works' if works else 'does not work'}; check on a batch of {batch.size} x "
          f"{batch.input_ids.shape[1]} tokens: median {times[len(times) // 2]:.2f} s of {args.repeats} "
          f"({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
