"""Per-position activation patching, the plain path against the fast one, side by side on the same batches.

The work of ``headscore ablate --per-position`` beyond the per-head ablation: every (layer, head, token) cell
of every batch patched on its own. ``old`` is the plain path (one gate row per cell, the whole sequence each
pass, layers below the cell replayed: what ``ablate`` ran before the fast path); ``new`` is
:mod:`headscore.methods.position_patching` (the clean run's keys and values before the cell's token, only the
tokens up to the last one the metric reads, layers below the cell replayed), including its check on the
first batch. Within each batch the two take turns in small pieces (the plain path a layer at a time, the fast
one a token at a time, each piece going to the path that has done the smaller share of its work), so a slow
spell of a shared machine hits both alike; wall and CPU seconds are kept apart. Both feed a per-position map
as ``ablate`` does; the JSON has the seconds of each, the speedup and the largest difference between their
``position_values`` (and per cell).

    python benchmarks/position_patching.py --tasks ioi --max-examples 3 --metric logit-diff \\
        --baseline corrupt --out benchmarks/results/position-patching.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import headscore
from headscore.data.tasks import load_tasks
from headscore.loss import resolve_metric
from headscore.methods.ablation import clean_losses, prefix_reuse_works
from headscore.methods.baseline import corrupt_head_outputs, mean_head_outputs
from headscore.methods.position_patching import (
    PositionPatcher,
    fast_position_deltas,
    plain_position_deltas,
    position_patching_works,
)
from headscore.output_files import atomic_write
from headscore.patch import patch
from headscore.positions import PositionMaps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model name or directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--tasks", default="ioi", help="task spec, as for headscore ablate --tasks")
    p.add_argument("--max-examples", type=int, default=3, help="examples per task")
    p.add_argument("--metric", default="logit-diff", choices=["nll", "logit-diff", "prob"])
    p.add_argument("--baseline", default="corrupt", choices=["zero", "mean", "corrupt"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rows-per-pass", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    return p.parse_args(argv)


class BatchRun:
    """One batch's per-position patching both ways, in pieces: the plain path a layer at a time, the fast path
    a token at a time (its clean run, and on the first batch ablate's check, counted in its first piece)."""

    def __init__(self, model, heads, batch, base, clean, metric, mode: str, rows_per_pass: int, check: bool):
        self.args = (model, heads, batch, base)
        self.clean, self.metric, self.mode, self.rows, self.check = clean, metric, mode, rows_per_pass, check
        self.patcher: PositionPatcher | None = None

    def old(self, layer: int) -> torch.Tensor:
        """The plain path's cells of one layer."""
        return plain_position_deltas(*self.args[:3], self.clean, self.args[3], metric=self.metric, mode=self.mode,
                                     max_rows=self.rows, layers=[layer])

    def new(self, position: int) -> torch.Tensor:
        """The fast path's cells of one token."""
        if self.check and not position_patching_works(*self.args, metric=self.metric, mode=self.mode):
            raise SystemExit("the fast path does not apply to this model")
        self.check = False
        if self.patcher is None:
            self.patcher = PositionPatcher(*self.args, metric=self.metric, replay=self.mode == "prefix")
        return fast_position_deltas(self.patcher, max_rows=self.rows, positions=[position])

    def interleaved(self) -> tuple[dict, dict, dict]:
        """(values [B, L, T, H], wall seconds, CPU seconds) of each path; the next piece always goes to the path
        that has done the smaller share of its pieces."""
        layout, batch = self.args[1].layout, self.args[2]
        width = batch.input_ids.shape[1]
        pieces = {"old": [(self.old, layer) for layer in range(layout.num_layers)],
                  "new": [(self.new, position) for position in range(width)]}
        values = {name: torch.zeros(batch.size, layout.num_layers, width, layout.num_heads, dtype=torch.float64)
                  for name in pieces}
        done = dict.fromkeys(pieces, 0)
        took = dict.fromkeys(pieces, 0.0)
        used = dict.fromkeys(pieces, 0.0)
        while any(done[n] < len(pieces[n]) for n in pieces):
            name = min((n for n in pieces if done[n] < len(pieces[n])), key=lambda n: done[n] / len(pieces[n]))
            fn, arg = pieces[name][done[name]]
            wall, proc = time.perf_counter(), time.process_time()
            values[name] += fn(arg)
            took[name] += time.perf_counter() - wall
            used[name] += time.process_time() - proc
            done[name] += 1
        return values, took, used


def main(argv: list[str] | None = None) -> dict:
    """Run both paths on every batch; write and return the numbers."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = headscore.load_model() if args.model is None else headscore.load_model(args.model)
    prep = headscore.prepare(lm, load_tasks(args.tasks), max_examples=args.max_examples)
    metric = resolve_metric(args.metric)
    model = lm.model
    seconds = {"old": 0.0, "new": 0.0}
    cpu = {"old": 0.0, "new": 0.0}
    per_cell = 0.0
    batches = []
    with patch(model) as heads, prep.naming_examples():
        layout = heads.layout
        maps = {name: PositionMaps(prep.tokenized, prep.tasks, layout) for name in seconds}
        static = None
        if args.baseline == "mean":
            static = mean_head_outputs(model, heads, prep.batches(args.batch_size, progress=False))
        replay = fast = None
        for i, batch in enumerate(prep.batches(args.batch_size, progress=False)):
            base = corrupt_head_outputs(model, heads, batch) if args.baseline == "corrupt" else static
            if replay is None:  # as ablate decides its mode on the first batch
                replay = prefix_reuse_works(model, heads, batch, base, metric)
            mode = "prefix" if replay else "batched"
            clean = clean_losses(model, heads, batch, metric)
            run = BatchRun(model, heads, batch, base, clean, metric, mode, args.rows_per_pass, check=fast is None)
            values, took, used = run.interleaved()
            fast = True
            for name in seconds:
                seconds[name] += took[name]
                cpu[name] += used[name]
                maps[name].add(batch, values[name])
            width = batch.input_ids.shape[1]
            print(f"batch {i} ({batch.size} x {width} tokens): old {took['old']:.1f} s, new {took['new']:.1f} s",
                  flush=True)
            per_cell = max(per_cell, float((values["new"] - values["old"]).abs().max()))
            batches.append({"rows": batch.size, "tokens": width, "seconds_old": round(took["old"], 2),
                            "seconds_new": round(took["new"], 2)})
    old_map, new_map = maps["old"].acc.mean, maps["new"].acc.mean
    result = {
        "command": "python benchmarks/position_patching.py " + " ".join(argv if argv is not None else []),
        "model": lm.name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tasks": args.tasks, "max_examples": args.max_examples, "examples": len(prep.examples),
        "metric": args.metric, "baseline": args.baseline, "batch_size": args.batch_size,
        "rows_per_pass": args.rows_per_pass, "batches": batches, "mode": mode,
        "seconds_old": round(seconds["old"], 2), "seconds_new": round(seconds["new"], 2),
        "speedup": round(seconds["old"] / seconds["new"], 2),
        "cpu_seconds_old": round(cpu["old"], 2), "cpu_seconds_new": round(cpu["new"], 2),
        "cpu_speedup": round(cpu["old"] / cpu["new"], 2),
        "max_abs_diff_position_values": float((new_map - old_map).abs().max()),
        "max_abs_position_value": float(old_map.abs().max()),
        "max_abs_diff_per_cell": per_cell,
        "threads": torch.get_num_threads(), "machine": platform.platform(), "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
