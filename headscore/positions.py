"""Named token positions for per-position maps: each token aligned from the end of its prompt.

A per-position map keeps, for every head, the term of each token t of the gate gradient,
``<O_t - m_t, dY_t>``, instead of only its sum. Examples of one run may have prompts and targets of
different lengths, so positions are named relative to the last prompt token (the answer position):
``end`` is the last prompt token, ``end-1`` the one before, ``end+1`` the first target token, and
so on. The last target token is left out (its output changes no prediction the built-in metrics read),
except under a user's metric, which may read every position's logits. An example has no
token at a position beyond its own prompt or target: its term there is 0 (nothing was there), and
a task's map there is the mean over all its examples of those terms, so summed over positions a
map equals the head's ordinary score. :attr:`PositionLayout.names` lists the positions of a run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .accumulate import TaskAccumulator
from .data.batching import Batch, TokenizedExample

if TYPE_CHECKING:
    from .patch import HeadLayout


def position_name(offset: int) -> str:
    """``end`` for 0, ``end-3`` for -3, ``end+1`` for 1."""
    return "end" if offset == 0 else f"end{offset:+d}"


@dataclass(frozen=True)
class PositionLayout:
    """The named positions of a run: ``before`` prompt tokens before the last, ``after`` target tokens after it,
    and whether each row's last token is one (``last``: for a user's metric, which may read its logits).

    Column ``c`` of a per-position map is offset ``c - before`` from the last prompt token.
    """

    before: int
    after: int
    last: bool = False

    @classmethod
    def of(cls, items: Sequence[TokenizedExample], *, last: bool = False) -> PositionLayout:
        """The layout covering every example's prompt and every target token but the last (with ``last``, the
        last too)."""
        keep = 0 if last else 1
        return cls(max(it.prompt_length - 1 for it in items), max(it.num_target - keep for it in items), last)

    @property
    def width(self) -> int:
        """Number of named positions (P)."""
        return self.before + 1 + self.after

    @property
    def names(self) -> list[str]:
        """Position names, column by column."""
        return [position_name(c - self.before) for c in range(self.width)]

    def columns(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row and batch position, its column (``index`` [B, T]) and whether it is a named
        position of that row (``valid`` [B, T]: a prompt token or a target token, the last only with
        :attr:`last`)."""
        t = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
        prompt = batch.prompt_lengths[:, None]
        length = batch.attention_mask.sum(1, keepdim=True)
        offset = t[None] - (prompt - 1)
        valid = (t[None] < length - (0 if self.last else 1)) & (offset >= -self.before) & (offset <= self.after)
        return (offset + self.before).clamp(0, self.width - 1), valid

    def to_named(self, values: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-position values in batch positions [B, L, T, H] -> named positions [B, L, H, P] (0 where a
        row has no token)."""
        index, valid = self.columns(batch)
        b, layers, t, heads = values.shape
        out = values.new_zeros(b, layers, heads, self.width)
        src = (values * valid[:, None, :, None].to(values.dtype)).permute(0, 1, 3, 2)  # [B, L, H, T]
        return out.scatter_add_(3, index[:, None, None, :].expand(b, layers, heads, t).to(values.device), src)

    def present(self, batch: Batch) -> torch.Tensor:
        """[B, P] whether each row has a token at each named position."""
        index, valid = self.columns(batch)
        out = torch.zeros(batch.size, self.width, dtype=torch.int64, device=index.device)
        return out.scatter_add_(1, index, valid.long()) > 0


class PositionMaps:
    """A run's per-position maps: per task, the mean and standard error of each (layer, head, position)
    value, and how many examples have a token at each position.

    ``add(batch, values)`` takes values in the batch's positions [B, L, T, H]; ``attach(scores)`` returns
    the scores with ``positions``, ``position_values``, ``position_stderr`` and ``position_counts``.
    """

    def __init__(self, items: Sequence[TokenizedExample], tasks: Sequence[str], heads: HeadLayout, *,
                 last: bool = False):
        self.layout = PositionLayout.of(items, last=last)
        # [L, H] heads a layer does not have (per-layer head counts): NaN in the maps
        self.absent = None if heads.heads_per_layer is None else heads.absent_heads()
        lengths = {it.prompt_length for it in items}
        if len(lengths) > 1:
            warnings.warn(f"per-position: prompts of {min(lengths)} to {max(lengths)} tokens are aligned at their "
                          "last token ('end'); a task's value at a position averages over all its examples, 0 for "
                          "one without a token there (position_counts says how many have one)", stacklevel=4)
        self.acc = TaskAccumulator(tasks, heads.num_layers, heads.num_heads, positions=self.layout.width)
        self.counts = torch.zeros(len(tasks), self.layout.width, dtype=torch.int64)

    def add(self, batch: Batch, values: torch.Tensor) -> None:
        """Add one batch's values [B, L, T, H] (T = the batch's positions)."""
        self.acc.add(batch.task_index, self.layout.to_named(values, batch))
        self.counts.index_add_(0, batch.task_index.cpu(), self.layout.present(batch).long().cpu())

    def attach(self, scores):
        """``scores`` (a HeadScores) with these maps."""
        mean, stderr = self.acc.mean, self.acc.stderr
        if self.absent is not None:
            mean = mean.masked_fill(self.absent[..., None], float("nan"))
            stderr = stderr.masked_fill(self.absent[..., None], float("nan"))
        return replace(scores, positions=self.layout.names, position_values=mean, position_stderr=stderr,
                       position_counts=self.counts)
