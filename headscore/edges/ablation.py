"""Exact edge patching as a scores file: each chosen edge patched alone on every example, the change of the loss
kept per task (the ground truth edge scores are checked against)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..accumulate import TaskAccumulator
from ..edge_maps import EdgeMaps
from ..errors import HeadscoreError
from ..loss import Metric
from ..patch import patch
from ..prepared import Prepared
from ..results import HeadScores
from .attribution import check_decomposition, writer_baselines
from .graph import EdgeGraph
from .patching import Edge, edge_patched_losses, edge_replay_works
from .residual import residual_model


def edges_by_name(graph: EdgeGraph, names: Sequence[tuple[str, str]]) -> list[Edge]:
    """Edge indices from (upstream, downstream) names, each edge once (a repeat was measured and counted twice);
    HeadscoreError for an item that is no pair of names, an unknown node or a missing edge."""
    out = []
    for item in names:
        if isinstance(item, str) or not isinstance(item, (tuple, list)) or len(item) != 2 \
                or not all(isinstance(n, str) for n in item):
            raise HeadscoreError(f"each edge is an (upstream, downstream) pair of node names, e.g. ('L0.H3', "
                                 f"'L2.H1.q'), not {item!r}")
        up, down = item
        try:
            u, v = graph.index(up, upstream=True), graph.index(down, upstream=False)
        except ValueError as exc:
            raise HeadscoreError(str(exc)) from None
        if not bool(graph.allowed[u, v]):
            raise HeadscoreError(f"no edge {up} -> {down}: {up} writes after {down} reads")
        if (u, v) not in out:
            out.append((u, v))
    return out


def top_edges(scores: HeadScores, top: int) -> list[Edge]:
    """The union over tasks of each task's ``top`` edges by |score| (HeadscoreError for a count larger than
    the edges there are)."""
    maps = scores.edge_maps
    if maps is None:
        raise HeadscoreError("these scores have no edge scores to pick the top edges from (score with --edges)")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise HeadscoreError(f"the number of edges must be a whole number of at least 1, got {top!r}")
    if top > maps.num_edges:
        raise HeadscoreError(f"{top} edges asked for, but the model has {maps.num_edges}")
    chosen: dict[Edge, None] = {}
    for t in range(len(scores.tasks)):
        flat = torch.nan_to_num(maps.values[t].abs(), nan=-1.0).flatten()
        for i in torch.topk(flat, top).indices.tolist():
            chosen.setdefault(divmod(i, len(maps.downstream)), None)
    return list(chosen)


def exact_edge_scores(prep: Prepared, edges: Sequence[Edge], *, baseline: str, metric: Metric, meaning: str,
                      batch_size: int, rows_per_pass: int, progress: bool) -> HeadScores:
    """Every edge of ``edges`` patched alone on every example: HeadScores whose edge maps hold, per task, the
    mean change of the loss (NaN for edges not measured, marked by ``edge_maps.exact``); its head values
    are NaN (no head was measured). Method ``edge-patching-zero``/``-mean``/``-corrupt``."""
    model = prep.lm.model
    rm = residual_model(model)
    graph = rm.graph
    if not edges:
        raise HeadscoreError("no edges to patch")
    num_up, num_down = len(graph.upstream), len(graph.downstream)
    acc = TaskAccumulator(prep.tasks, num_up, num_down, keep_examples=True)
    index = torch.tensor(edges)
    bar = tqdm(total=len(prep.examples) * len(edges), desc=f"patch edges ({baseline})", unit="edge",
               disable=not progress, leave=False)
    start = time.perf_counter()
    with patch(model) as heads, prep.naming_examples(), bar:
        baseline_of = writer_baselines(model, heads, rm, baseline,
                                       prep.batches(batch_size, desc="mean outputs", progress=progress))
        prefix = True
        for i, batch in enumerate(prep.batches(batch_size, progress=False)):
            base = baseline_of(batch)
            if i == 0:
                check_decomposition(model, heads, rm, batch)
                prefix = edge_replay_works(model, heads, rm, batch, base, metric)
            before, patched = edge_patched_losses(model, heads, rm, batch, edges, base, metric=metric,
                                                  max_rows=rows_per_pass, prefix=prefix,
                                                  on_pass=lambda n, b=batch.size: bar.update(n * b))
            values = torch.zeros(batch.size, num_up, num_down, dtype=torch.float64)
            values[:, index[:, 0], index[:, 1]] = (patched - before[None]).T
            acc.add(batch.task_index, values, batch.example_index)
    measured = torch.zeros(num_up, num_down, dtype=torch.bool)
    measured[index[:, 0], index[:, 1]] = True
    nan = float("nan")
    kept = acc.examples
    layout_nan = torch.full((len(prep.tasks), graph.num_layers, graph.num_heads), nan, dtype=torch.float64)
    result = HeadScores(layout_nan, layout_nan.clone(), acc.count.clone(), list(prep.tasks),
                        f"edge-patching-{baseline}", prep.lm.name, prep.data_hash,
                        extra={"seconds": time.perf_counter() - start, "batch_size": batch_size,
                               "metric": metric.name, "metric_meaning": meaning, "baseline": baseline,
                               "edges_measured": len(edges), "mode": "prefix" if prefix else "batched"})
    maps = EdgeMaps(list(graph.upstream), list(graph.downstream), acc.mean.masked_fill(~measured, nan),
                    acc.stderr.masked_fill(~measured, nan), None,
                    measured[None].expand(len(prep.tasks), -1, -1).clone())
    if kept is not None:
        ex = kept[0].masked_fill(~measured, nan)
        heads_nan = torch.full((ex.shape[0], graph.num_layers, graph.num_heads), nan, dtype=torch.float32)
        result = dataclasses.replace(result, example_values=heads_nan, example_tasks=kept[1])
        maps.example_values = ex
    return dataclasses.replace(result, edge_maps=maps)
