"""Per-task running sums of per-example, per-head quantities, in float64, mergeable across processes."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

MAX_KEPT_VALUES = 2**25
"""Per-example values an accumulator keeps at most (float32: 128 MiB); beyond, it keeps only the sums."""


class TaskAccumulator:
    """Running count, sum and sum of squares per (task, layer, head).

    ``add(task_index [B], values [B, L, H])`` adds one value per example; ``mean`` and
    ``stderr`` read the result. With ``positions=P`` the values are per position, [B, L, H, P].
    Sums are float64 on the CPU whatever the model's dtype.
    With ``keep_examples`` it also keeps every example's values (float32; :attr:`examples`, in the
    order of the ``example_index`` given to :meth:`add`, else in the order added), for bootstrap
    intervals over examples, until they would exceed
    :data:`MAX_KEPT_VALUES` numbers; then it drops them, with a warning, keeps only the sums, and sets
    :attr:`dropped`.
    """

    def __init__(self, tasks: Sequence[str], num_layers: int, num_heads: int, *, positions: int | None = None,
                 keep_examples: bool = False):
        self.tasks = list(tasks)
        shape = (len(self.tasks), num_layers, num_heads) + (() if positions is None else (positions,))
        self.count = torch.zeros(len(self.tasks), dtype=torch.int64)
        self.sum = torch.zeros(shape, dtype=torch.float64)
        self.sumsq = torch.zeros(shape, dtype=torch.float64)
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = [] if keep_examples else None
        self.dropped = False
        """Whether the per-example values were dropped for their number (:data:`MAX_KEPT_VALUES`)."""

    @property
    def examples(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Kept per-example values [N, L, H] (float32) and their task indices [N], or None."""
        kept = self._joined()
        return None if kept is None else kept[:2]

    def _joined(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The kept values, task indices and example indices (None unless every add gave them), ordered
        by example index where known."""
        if self._kept is None:
            return None
        if not self._kept:  # none yet: an empty order, so that examples added after a reload are still ordered
            return torch.zeros(0, *self.sum.shape[1:]), torch.zeros(0, dtype=torch.int64), \
                torch.zeros(0, dtype=torch.int64)
        values, tasks = torch.cat([v for v, _, _ in self._kept]), torch.cat([t for _, t, _ in self._kept])
        if any(e is None for _, _, e in self._kept):
            return values, tasks, None
        index, order = torch.cat([e for _, _, e in self._kept]).sort(stable=True)
        return values[order], tasks[order], index

    def drop_examples(self) -> None:
        """Stop keeping per-example values (the sums stay)."""
        self._kept = None

    def add(self, task_index: torch.Tensor, values: torch.Tensor, example_index: torch.Tensor | None = None) -> None:
        """Add per-example values [B, L, H] for examples of tasks ``task_index`` [B] (``example_index`` [B]:
        their positions in the run, which order the kept examples)."""
        idx = task_index.detach().cpu().long()
        v = values.detach().to("cpu", torch.float64)
        if v.shape[1:] != self.sum.shape[1:] or v.shape[0] != idx.shape[0]:
            raise ValueError(f"values {tuple(v.shape)} do not match tasks {tuple(idx.shape)} x "
                             f"{tuple(self.sum.shape[1:])}")
        self.count.index_add_(0, idx, torch.ones_like(idx))
        self.sum.index_add_(0, idx, v)
        self.sumsq.index_add_(0, idx, v * v)
        if self._kept is not None:
            if int(self.count.sum()) * v.shape[1:].numel() > MAX_KEPT_VALUES:  # v[0] fails on an empty batch
                self._kept, self.dropped = None, True
                warnings.warn(f"per-example values are no longer kept: {int(self.count.sum())} examples of "
                              f"{v.shape[1:].numel()} values each pass {MAX_KEPT_VALUES:,} numbers; the scores are "
                              "whole, but a comparison of this file gets no intervals", stacklevel=2)
            else:
                order = None if example_index is None else example_index.detach().cpu().long().clone()
                self._kept.append((v.float(), idx.clone(), order))

    def mark(self) -> tuple:
        """A point to :meth:`rewind` to: copies of the sums (small: tasks x heads), and the kept examples' list
        with its length (only appended to, so its first entries stay as they are)."""
        kept = self._kept
        return self.count.clone(), self.sum.clone(), self.sumsq.clone(), kept, None if kept is None else len(kept)

    def rewind(self, mark: tuple) -> None:
        """Undo every :meth:`add` since :meth:`mark` gave ``mark``, a partly done one included (an interrupt that
        came inside it)."""
        count, total, square, kept, length = mark
        self.count.copy_(count)
        self.sum.copy_(total)
        self.sumsq.copy_(square)
        self._kept = None if kept is None else kept[:length]

    def merge(self, other: TaskAccumulator) -> None:
        """Add another accumulator's sums (same tasks and shape) into this one."""
        if other.tasks != self.tasks or other.sum.shape != self.sum.shape:
            raise ValueError("can only merge accumulators with the same tasks and shape")
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        if self._kept is not None and other._kept is not None:
            self._kept.extend(other._kept)
        else:
            self._kept = None

    @property
    def mean(self) -> torch.Tensor:
        """Mean per task [T, L, H] (NaN for a task with no examples)."""
        return self.sum / self._n()

    def _n(self) -> torch.Tensor:
        """The counts as float64, shaped to broadcast against the sums."""
        return self.count.to(torch.float64).view(-1, *[1] * (self.sum.dim() - 1))

    @property
    def stderr(self) -> torch.Tensor:
        """Standard error of the mean per task [T, L, H] (unbiased variance; NaN below 2 examples)."""
        n = self._n()
        var = (self.sumsq - self.sum * self.sum / n).clamp_min(0) / (n - 1)
        return torch.sqrt(var / n)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that reproduce this accumulator (for checkpoints): the sums, and the kept examples."""
        state = {"count": self.count, "sum": self.sum, "sumsq": self.sumsq}
        kept = self._joined()
        if kept is not None:
            state["example_values"], state["example_tasks"] = kept[:2]
            if kept[2] is not None:
                state["example_order"] = kept[2]
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` saved (a state without kept examples stops keeping them)."""
        for key in ("count", "sum", "sumsq"):
            getattr(self, key).copy_(state[key])
        if self._kept is not None:
            has = "example_values" in state and "example_tasks" in state
            order = state.get("example_order")
            self._kept = [(state["example_values"].float(), state["example_tasks"].long(),
                           None if order is None else order.long())] if has else None
