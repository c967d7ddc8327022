"""Verified mode: estimate every head, then measure the heads that matter (and the doubtful ones) exactly.

Per task, the heads to verify are

- the ``k`` heads with the largest |estimate|, and
- ``flagged`` more: the heads the estimate may underrate, ranked by their *first-order mass*, the mean
  over the task's examples of sum_t |<O_t - m_t, dY_t>| (each token's term of the gate gradient taken
  apart, at every gate = 1). A head whose tokens' terms are large but cancel in the sum (paths that
  push the loss both ways, the failure GradDrop targets) has a small estimate and a large mass; a
  head whose effect is first order has both large. On SmolLM2's built-in suite this ranking reaches a
  task's true top-20 (by exact ablation) much sooner than |taylor| does (benchmarks/RESULTS.md).

The chosen heads of each task are ablated (or patched) one at a time on that task's examples, with
prefix reuse (:mod:`headscore.methods.ablation`), the examples of all tasks batched together, and their
values replace the estimates: the result's ``exact`` mask marks them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from numbers import Integral

import torch

from ..accumulate import TaskAccumulator
from ..data.batching import Batch, TokenizedExample, make_batches
from ..errors import HeadscoreError
from ..loss import Metric
from ..patch import HeadGates
from ..results import HeadScores
from .ablation import prefix_reuse_works, selected_losses, single_head_gates

DEFAULT_FRACTION = 0.05
"""Default ``k``: 5% of the model's heads (rounded up), and as many flagged heads again."""


def check_verify(verify: int | bool) -> None:
    """HeadscoreError for a ``verify`` setting that is neither a bool nor a whole number of at least 1 (what
    can be said before the model's head count is known)."""
    if not isinstance(verify, bool) and (not isinstance(verify, Integral) or verify < 1):
        raise HeadscoreError(f"verify takes a number of heads of at least 1 (or True for 5% of them), got {verify!r}")


def verify_count(verify: int | bool, num_heads: int) -> int:
    """How many top heads per task a ``verify`` setting asks for: ``True`` = 5% of ``num_heads`` (rounded up),
    an int = that many. HeadscoreError for a count below 1 or above the head count."""
    check_verify(verify)
    if isinstance(verify, bool):
        return max(1, math.ceil(DEFAULT_FRACTION * num_heads))
    if verify > num_heads:
        raise HeadscoreError(f"verify {verify}: the model has {num_heads} heads; verify between 1 and {num_heads}")
    return int(verify)


def first_order_mass(position_grad: torch.Tensor) -> torch.Tensor:
    """sum_t |term_t| per example and head: [B, L, H] from per-position gate gradients [B, L, T, H]."""
    return position_grad.abs().sum(2)


class MassCollector:
    """The first-order mass of every head, collected during the backward pass that gives the gate gradients
    (a gradient observer of :class:`~headscore.patch.HeadGates`): no per-position pass of its own.

    Each layer's term of token t is <O_t - m_t, dY_t>, the term the gate's backward sums (reduced in float32
    at least, as there); ``values`` [B, L, H] holds sum_t |term_t| once the backward pass has run.
    """

    def __init__(self, rows: int, num_layers: int, num_heads: int):
        self.values = torch.zeros(rows, num_layers, num_heads, dtype=torch.float64)

    def __call__(self, layer: int, out: torch.Tensor, baseline: torch.Tensor | None, dy: torch.Tensor) -> None:
        acc = torch.promote_types(dy.dtype, torch.float32)
        centred = out.to(acc) if baseline is None else out.to(acc) - baseline.to(acc)
        terms = torch.einsum("bthd,bthd->bth", centred, dy.to(acc))
        self.values[:, layer, :terms.shape[-1]] += terms.abs().sum(1).to("cpu", torch.float64)


def choose_heads(estimate: torch.Tensor, mass: torch.Tensor, k: int, flagged: int) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """For one task's [L, H] estimate and first-order mass: (top, flag) bool masks [L, H]. ``top`` holds the
    ``k`` heads of largest |estimate|; ``flag`` the ``flagged`` heads of largest mass among the rest. Absent
    heads (NaN) are never chosen."""
    flat = estimate.flatten().double()
    present = ~torch.isnan(flat)
    order = torch.argsort(torch.where(present, flat.abs(), -math.inf), descending=True, stable=True)
    top = torch.zeros_like(flat, dtype=torch.bool)
    top[order[:min(k, int(present.sum()))]] = True
    rest = torch.where(present & ~top, mass.flatten().double().nan_to_num(0.0), -math.inf)
    order = torch.argsort(rest, descending=True, stable=True)
    flag = torch.zeros_like(top)
    flag[order[:min(flagged, int((present & ~top).sum()))]] = True
    return top.view(estimate.shape), flag.view(estimate.shape)


@dataclass
class ExactValues:
    """Exact per-example changes of the chosen heads, by task."""

    heads: dict[int, torch.Tensor]
    """task row -> flat head indices (l * H + h) measured for it."""
    accumulators: dict[int, TaskAccumulator]
    """task row -> accumulator of those heads' changes ([1, n] per example)."""
    mode: str


class KeptBaselines:
    """Each batch's baseline from the scoring pass (the heads' outputs on its corrupted prompts), kept for the
    exact passes, which go through the same batches when every task has heads to verify: the corrupted runs
    are not run again. At most ``budget`` bytes are kept (a batch beyond it is run again when needed); each is
    handed out once and let go."""

    def __init__(self, budget: int = 256 * 2**20):
        self.budget, self.size = budget, 0
        self.kept: dict[tuple[int, ...], torch.Tensor] = {}

    @staticmethod
    def _key(batch: Batch) -> tuple[int, ...]:
        return tuple(batch.example_index.tolist())

    def keep(self, batch: Batch, baseline: torch.Tensor | None) -> None:
        """Keep ``batch``'s baseline if it is per batch and fits the budget."""
        if baseline is None or baseline.dim() != 5:
            return
        self._drop(self._key(batch))
        size = baseline.numel() * baseline.element_size()
        if self.size + size <= self.budget:
            self.kept[self._key(batch)] = baseline
            self.size += size

    def get(self, batch: Batch, compute: Callable[[Batch], torch.Tensor | None]) -> torch.Tensor | None:
        """The kept baseline of a batch of the same examples in the same order, else ``compute(batch)``."""
        kept = self._drop(self._key(batch))
        return kept if kept is not None and kept.shape[1:3] == batch.input_ids.shape else compute(batch)

    def _drop(self, key: tuple[int, ...]) -> torch.Tensor | None:
        """Let go of a kept baseline (returned, or None if none was kept)."""
        kept = self.kept.pop(key, None)
        if kept is not None:
            self.size -= kept.numel() * kept.element_size()
        return kept


def exact_changes(model: torch.nn.Module, heads: HeadGates, items: Sequence[TokenizedExample],
                  chosen: dict[int, torch.Tensor], tasks: Sequence[str], *, pad_id: int, device: torch.device,
                  batch_size: int, rows_per_pass: int, metric: Metric,
                  baseline_for: Callable[[Batch], torch.Tensor | None],
                  on_pass: Callable[[int], None] | None = None) -> ExactValues:
    """Ablate (or patch) each chosen head on its own, on its task's examples, with prefix reuse.

    ``chosen`` maps a task row to flat head indices; ``baseline_for(batch)`` gives the batch's baseline
    (the run's fixed one, or its corrupted-run head outputs). The examples of every task go through batches
    of ``batch_size`` together: per batch one recording pass (which also gives the losses at 1), then the
    (example, chosen head of its task) pairs in passes of at most ``rows_per_pass`` rows, cut by their
    first changed layer at the least estimated cost (:func:`~headscore.methods.ablation.selected_losses`).
    The mode is ``prefix`` unless the check on the first batch fails (then ``batched``), as in
    :func:`headscore.ablate`.
    """
    layout = heads.layout
    rows_all = single_head_gates(layout.num_layers, layout.num_heads)
    chosen = {t: flat for t, flat in chosen.items() if flat.numel()}
    accs = {t: TaskAccumulator(list(tasks), 1, flat.numel(), keep_examples=True) for t, flat in chosen.items()}
    mode = None
    for batch in make_batches([it for it in items if it.task_index in chosen], batch_size, pad_id):
        batch = batch.to(device)
        base = baseline_for(batch)
        if mode is None:
            mode = "prefix" if prefix_reuse_works(model, heads, batch, base, metric) else "batched"
        own = [chosen[int(t)] for t in batch.task_index.tolist()]
        rows = torch.repeat_interleave(torch.arange(batch.size), torch.tensor([len(f) for f in own]))
        clean, losses = selected_losses(model, heads, batch, rows, rows_all[torch.cat(own)], base,
                                        prefix=mode == "prefix", max_rows=rows_per_pass, metric=metric,
                                        on_pass=on_pass)
        delta = (losses - clean[rows]).split([len(f) for f in own])
        for b, (task_row, values) in enumerate(zip(batch.task_index.tolist(), delta, strict=True)):
            accs[int(task_row)].add(batch.task_index[b:b + 1], values.view(1, 1, -1), batch.example_index[b:b + 1])
    return ExactValues(chosen, accs, mode or "prefix")


def with_exact(result: HeadScores, exact: ExactValues) -> HeadScores:
    """``result`` with each measured head's value, standard error and per-example values replaced by the exact
    ones, and ``exact`` marking them ([tasks, L, H] bool)."""
    values, stderr = result.values.clone(), result.stderr.clone()
    mask = torch.zeros(values.shape, dtype=torch.bool)
    ex_values = None if result.example_values is None else result.example_values.clone()
    for task_row, acc in exact.accumulators.items():
        flat = exact.heads[task_row]
        values[task_row].view(-1)[flat] = acc.mean[task_row, 0]
        stderr[task_row].view(-1)[flat] = acc.stderr[task_row, 0]
        mask[task_row].view(-1)[flat] = True
        kept = acc.examples
        if ex_values is not None:
            rows = (result.example_tasks == task_row).nonzero().flatten()
            if kept is None or len(rows) != kept[0].shape[0]:
                ex_values = None  # cannot line the examples up: drop them rather than mix
            else:
                block = ex_values[rows].flatten(1)
                block[:, flat] = kept[0][:, 0].to(block)
                ex_values[rows] = block.view(-1, *ex_values.shape[1:])
    return replace(result, values=values, stderr=stderr, exact=mask, example_values=ex_values,
                   example_tasks=None if ex_values is None else result.example_tasks)
