"""``circuit()``: for each task, circuits of growing size from its edge scores and their faithfulness on its
examples; the circuit asked for (a number of edges, or the smallest reaching a faithfulness)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data.batching import Batch, make_batches
from ..errors import HeadscoreError
from ..loss import Metric
from ..patch import patch
from ..prepared import Prepared
from ..results import HeadScores
from .attribution import WriterOutputs, check_decomposition, writer_baselines
from .circuit import FaithfulnessPoint, circuit_losses, circuit_sizes, faithfulness, sizes_for, top_circuit
from .graph import EdgeGraph
from .residual import ResidualModel, residual_model


@dataclass
class Circuit:
    """One task's circuit and the faithfulness curve it was chosen from.

    Attributes:
        task: the task.
        upstream, downstream: the node names (as in :attr:`HeadScores.edge_nodes`).
        edges: bool [U, V], the circuit's edges (the top ``asked`` by |score|, pruned to input -> logits paths).
        scores: float64 [U, V], the edge scores it was chosen by (NaN where no edge exists).
        asked: the number of top edges taken before pruning.
        curve: faithfulness of each circuit size tried, smallest first.
        clean_loss, none_loss: the metric's mean loss with every edge clean, and with none.
        baseline, metric: what "patched" and "loss" mean (from the scores).
        selection: how edges were ranked (``abs``: by |score|; ``signed``: by score).
    """

    task: str
    upstream: list[str]
    downstream: list[str]
    edges: torch.Tensor
    scores: torch.Tensor
    asked: int
    curve: list[FaithfulnessPoint] = field(default_factory=list)
    clean_loss: float = float("nan")
    none_loss: float = float("nan")
    baseline: str = "corrupt"
    metric: str = "nll"
    selection: str = "abs"

    @property
    def faithfulness(self) -> float:
        """The chosen circuit's faithfulness."""
        return next((p.faithfulness for p in self.curve if p.asked == self.asked), float("nan"))

    def edge_list(self) -> list[tuple[str, str, float]]:
        """(upstream, downstream, score) of the circuit's edges, largest |score| first."""
        pairs = self.edges.nonzero().tolist()
        rows = [(self.upstream[u], self.downstream[v], float(self.scores[u, v])) for u, v in pairs]
        return sorted(rows, key=lambda r: -abs(r[2]))

    def as_json(self) -> dict:
        """Everything as JSON: the edges with their scores, the curve, the losses."""
        return {"task": self.task, "baseline": self.baseline, "metric": self.metric, "selection": self.selection,
                "asked": self.asked,
                "edges": [{"upstream": u, "downstream": d, "score": s} for u, d, s in self.edge_list()],
                "faithfulness": self.faithfulness, "clean_loss": self.clean_loss, "none_loss": self.none_loss,
                "curve": [vars(p) for p in self.curve]}


def score_circuits(scores: HeadScores, edges: int, by: str = "abs") -> list[Circuit]:
    """Each task's top ``edges`` edges of ``scores`` pruned to input -> logits paths, without running the model
    (no faithfulness): what the report draws."""
    maps = scores.edge_maps
    if maps is None:
        raise HeadscoreError("the scores have no edge scores (score with --edges)")
    try:
        graph = EdgeGraph.from_nodes(maps.upstream, maps.downstream, maps.existing, some=scores.edges_only)
    except ValueError as exc:
        raise HeadscoreError(f"the scores' edges: {exc}") from None
    baseline, metric = str(scores.extra.get("baseline", "")), str(scores.extra.get("metric", "nll"))
    return [Circuit(task, list(graph.upstream), list(graph.downstream), top_circuit(graph, scores.edges(task), edges,
                                                                                   by),
                    scores.edges(task), edges, baseline=baseline, metric=metric, selection=by)
            for task in scores.tasks]


def find_circuits(prep: Prepared, scores: HeadScores, metric: Metric, baseline: str, *, edges: int | None = None,
                  target: float | None = None, sizes: Sequence[int] | None = None, by: str = "abs",
                  batch_size: int = 8, rows_per_pass: int = 64, progress: bool = True) -> list[Circuit]:
    """Each task's circuit (see :func:`headscore.api.circuit`); ``metric`` and the writers' ``baseline`` those the
    scores were made with."""
    if not scores.has_edges:
        raise HeadscoreError("the scores have no edge scores (score with --edges)")
    model = prep.lm.model
    rm = residual_model(model)
    graph = rm.graph
    if scores.edge_nodes != (graph.upstream, graph.downstream):
        raise HeadscoreError("the scores' edge nodes are not this model's (scores of another model?)")
    total = graph.num_edges
    if edges is not None and edges > total:
        raise HeadscoreError(f"{edges} edges asked for, but the model has {total}")
    tried = sizes_for([*(circuit_sizes(total) if sizes is None else sizes), *([edges] if edges else [])], total)
    tasks = [t for t in prep.tasks if t in scores.tasks]
    if not tasks:
        raise HeadscoreError(f"no task of the examples is in the scores ({', '.join(scores.tasks)})")
    with patch(model) as heads:
        check_decomposition(model, heads, rm, next(iter(prep.batches(batch_size, progress=False))))
        baseline_of = writer_baselines(model, heads, rm, baseline,
                                       prep.batches(batch_size, desc="mean outputs", progress=progress))
        out = []
        for task in tasks:
            grid = scores.edges(task)
            masks = torch.stack([torch.zeros_like(graph.allowed), graph.allowed,
                                 *[top_circuit(graph, grid, n, by) for n in tried]])
            losses = _mean_losses(prep, heads, rm, task, masks, baseline_of, metric, batch_size, rows_per_pass,
                                  progress)
            none, clean = losses[0], losses[1]
            curve = [FaithfulnessPoint(n, int(m.sum()), loss, faithfulness(loss, clean, none))
                     for n, m, loss in zip(tried, masks[2:], losses[2:], strict=True)]
            asked = edges if edges is not None else _smallest(curve, target)
            chosen = masks[2 + tried.index(asked)] if asked in tried else top_circuit(graph, grid, asked, by)
            out.append(Circuit(task, list(graph.upstream), list(graph.downstream), chosen, grid, asked, curve,
                               clean, none, baseline, metric.name, by))
    return out


def _smallest(curve: list[FaithfulnessPoint], target: float | None) -> int:
    """The smallest size whose faithfulness reaches ``target`` (the largest tried if none does)."""
    if target is None:
        return curve[-1].asked
    return next((p.asked for p in curve if p.faithfulness >= target), curve[-1].asked)


def _mean_losses(prep: Prepared, heads, rm: ResidualModel, task: str, masks: torch.Tensor,
                 baseline_of: Callable[[Batch], WriterOutputs], metric: Metric, batch_size: int, rows_per_pass: int,
                 progress: bool) -> list[float]:
    """The task's mean loss under each circuit of ``masks`` [K, U, V]."""
    index = prep.tasks.index(task)
    total = torch.zeros(masks.shape[0], dtype=torch.float64)
    count = 0
    mine = [ex for ex in prep.tokenized if ex.task_index == index]
    bar = tqdm(total=len(mine) * masks.shape[0], desc=f"circuits ({task})", unit="run", disable=not progress,
               leave=False)
    with bar:
        for batch in make_batches(mine, batch_size, prep.lm.pad_id):
            batch = batch.to(prep.lm.device)
            losses = circuit_losses(prep.lm.model, heads, rm, batch, masks, baseline_of(batch), metric=metric,
                                    max_rows=rows_per_pass, on_pass=lambda k, b=batch.size: bar.update(k * b))
            total += losses.sum(1)
            count += batch.size
    if count == 0:
        raise HeadscoreError(f"task {task!r} has no examples here")
    return (total / count).tolist()
