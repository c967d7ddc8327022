"""Per-task running sums of per-example, per-head quantities, in float64, mergeable across processes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class TaskAccumulator:
    """Running count, sum and sum of squares per (task, layer, head).

    ``add(task_index [B], values [B, L, H])`` adds one value per example; ``mean`` and
    ``stderr`` read the result. Sums are float64 on the CPU whatever the model's dtype.
    """

    def __init__(self, tasks: Sequence[str], num_layers: int, num_heads: int):
        self.tasks = list(tasks)
        shape = (len(self.tasks), num_layers, num_heads)
        self.count = torch.zeros(len(self.tasks), dtype=torch.int64)
        self.sum = torch.zeros(shape, dtype=torch.float64)
        self.sumsq = torch.zeros(shape, dtype=torch.float64)

    def add(self, task_index: torch.Tensor, values: torch.Tensor) -> None:
        """Add per-example values [B, L, H] for examples of tasks ``task_index`` [B]."""
        idx = task_index.detach().cpu().long()
        v = values.detach().to("cpu", torch.float64)
        if v.shape[1:] != self.sum.shape[1:] or v.shape[0] != idx.shape[0]:
            raise ValueError(f"values {tuple(v.shape)} do not match tasks {tuple(idx.shape)} x "
                             f"{tuple(self.sum.shape[1:])}")
        self.count.index_add_(0, idx, torch.ones_like(idx))
        self.sum.index_add_(0, idx, v)
        self.sumsq.index_add_(0, idx, v * v)

    def merge(self, other: TaskAccumulator) -> None:
        """Add another accumulator's sums (same tasks and shape) into this one."""
        if other.tasks != self.tasks or other.sum.shape != self.sum.shape:
            raise ValueError("can only merge accumulators with the same tasks and shape")
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq

    @property
    def mean(self) -> torch.Tensor:
        """Mean per task [T, L, H] (NaN for a task with no examples)."""
        n = self.count.to(torch.float64)[:, None, None]
        return self.sum / n

    @property
    def stderr(self) -> torch.Tensor:
        """Standard error of the mean per task [T, L, H] (unbiased variance; NaN below 2 examples)."""
        n = self.count.to(torch.float64)[:, None, None]
        var = (self.sumsq - self.sum * self.sum / n).clamp_min(0) / (n - 1)
        return torch.sqrt(var / n)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that reproduce this accumulator (for checkpoints and all-reduce)."""
        return {"count": self.count, "sum": self.sum, "sumsq": self.sumsq}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore sums saved by :meth:`state_dict`."""
        for key in ("count", "sum", "sumsq"):
            getattr(self, key).copy_(state[key])
