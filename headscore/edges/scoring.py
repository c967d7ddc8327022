"""``score(..., edges=True)``: head scores and every edge's score from the same clean forward and backward per
batch (plus the corrupted run's forward for ``baseline="corrupt"``, or one pass for the means)."""

from __future__ import annotations

import dataclasses
import time

import torch

from ..accumulate import TaskAccumulator
from ..edge_maps import EdgeMaps
from ..errors import HeadscoreError
from ..loss import Metric
from ..methods.gradient import refuse_non_finite
from ..patch import patch
from ..prepared import Prepared
from ..results import HeadScores
from .attribution import WriterOutputs, check_decomposition, edge_attributions, writer_baselines, writer_outputs
from .residual import residual_model

EDGE_BASELINES = ("zero", "mean", "corrupt")


def edge_baseline(baseline: object, method: str) -> str:
    """The writers' baseline an edge run takes (HeadscoreError for one edges have no writer outputs for)."""
    if baseline is None:
        return "mean" if method == "atp-mean" else "zero"
    if not isinstance(baseline, str) or baseline not in EDGE_BASELINES:
        shown = "a baseline tensor" if isinstance(baseline, torch.Tensor) else repr(baseline)
        raise HeadscoreError(f"edges take baseline zero, mean or corrupt (every writer's: embeddings, heads, "
                             f"MLPs), not {shown}")
    return baseline


def score_edges(prep: Prepared, *, name: str, baseline: str, metric: Metric, meaning: str, batch_size: int,
                progress: bool, steps: int | None = None, fraction: float = 1.0) -> HeadScores:
    """Head scores (``name``: taylor, atp-mean, atp-corrupt) with the edge scores of every task attached
    (:class:`~headscore.edge_maps.EdgeMaps`); UnsupportedModelError for a family edges cannot decompose.

    ``steps`` (baseline ``corrupt``; None: attribution patching at the clean run): EAP-IG-inputs, the gradients
    averaged over ``steps`` runs whose input embeddings lie between the corrupted and the clean prompt's
    (midpoints of equal pieces of the share ``fraction`` of the segment next to the clean end; 1: all of it, as
    published), the changes the clean and corrupted runs' own; a head's value is then the sum of its edge scores
    (the same quantity for the node)."""
    if prep.labelled:
        raise HeadscoreError("edges are scored for a causal LM's target tokens; a sequence classifier's labelled "
                             "examples are not supported")
    model = prep.lm.model
    rm = residual_model(model)
    graph = rm.graph
    acc = prep.accumulator()
    edge_acc = TaskAccumulator(prep.tasks, len(graph.upstream), len(graph.downstream), keep_examples=True)
    start = time.perf_counter()
    with patch(model) as heads, prep.naming_examples():
        baseline_of = writer_baselines(model, heads, rm, baseline,
                                       prep.batches(batch_size, desc="mean outputs", progress=progress))
        for i, batch in enumerate(prep.batches(batch_size, desc=f"score ({name}, edges)", progress=progress)):
            if i == 0:
                check_decomposition(model, heads, rm, batch)
            base = baseline_of(batch)
            if steps is None:
                _, scores, grad = edge_attributions(model, heads, rm, batch, base, metric=metric)
                refuse_non_finite(grad, batch)
                acc.add(batch.task_index, -grad, batch.example_index)  # taylor's value: the node score
            else:
                scores = _input_path(model, heads, rm, batch, base, metric, steps, fraction)
                acc.add(batch.task_index, _head_sums(rm, scores), batch.example_index)
            refuse_non_finite(scores, batch, "edge scores")  # NaN reads as "no such edge" in the file
            edge_acc.add(batch.task_index, scores, batch.example_index)
    seconds = time.perf_counter() - start
    result = prep.result(acc, name, seconds=seconds, batch_size=batch_size, metric=metric.name,
                         metric_meaning=meaning, baseline=baseline, edges=graph.num_edges,
                         passes_per_batch=1 if steps is None else steps,
                         **({} if steps is None else {"steps": steps, "path": "inputs", "path_fraction": fraction}))
    missing = ~graph.allowed
    kept = edge_acc.examples
    example_values = None
    if kept is not None and result.example_values is not None:
        example_values = kept[0].masked_fill(missing, float("nan"))
    maps = EdgeMaps(list(graph.upstream), list(graph.downstream), edge_acc.mean.masked_fill(missing, float("nan")),
                    edge_acc.stderr.masked_fill(missing, float("nan")), example_values)
    return dataclasses.replace(result, edge_maps=maps)


def _input_path(model, heads, rm, batch, base: WriterOutputs, metric: Metric, steps: int,
                fraction: float = 1.0) -> torch.Tensor:
    """EAP-IG-inputs edge scores [B, U, V]: the mean over ``steps`` inputs on the segment from the corrupted
    to the clean input embeddings (its share ``fraction`` next to the clean end) of the gradient, against the
    clean-to-corrupted changes."""
    clean = writer_outputs(model, heads, rm, batch)
    total = None
    for k in range(steps):
        alpha = 1.0 - fraction * (k + 0.5) / steps  # 0 = the corrupted input, 1 = the clean one
        point = base.emb + alpha * (clean.emb - base.emb)
        _, scores, _ = edge_attributions(model, heads, rm, batch, base, metric=metric, clean=clean, first_input=point)
        total = scores if total is None else total + scores
    return total / steps


def _head_sums(rm, scores: torch.Tensor) -> torch.Tensor:
    """Each head's value [B, L, H]: the sum of its edge scores over every reader."""
    graph = rm.graph
    rows = torch.tensor([graph.head_index(layer, h) for layer in range(graph.num_layers)
                         for h in range(graph.num_heads)], device=scores.device)
    return scores[:, rows].sum(-1).view(scores.shape[0], graph.num_layers, graph.num_heads)
