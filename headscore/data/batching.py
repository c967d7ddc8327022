"""Tokenisation and batching: prompt and target tokenised apart and joined, a mask on target tokens."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import HeadscoreError
from ..text import printable
from .examples import Example


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + target; the last ``num_target`` ids are the target."""

    ids: tuple[int, ...]
    num_target: int
    task_index: int
    index: int


@dataclass(frozen=True)
class Batch:
    """A right-padded batch.

    Attributes:
        input_ids: [B, T] token ids (padding after each row's tokens).
        attention_mask: [B, T] 1 on real tokens.
        target_mask: [B, T] True where the token is a target token (predicted from position t-1).
        task_index: [B] index of each row's task in the run's task list.
        example_index: [B] position of each row's example in the input list.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    task_index: torch.Tensor
    example_index: torch.Tensor

    @property
    def size(self) -> int:
        """Number of rows."""
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``."""
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.target_mask,
                                               self.task_index, self.example_index)))

    def tile(self, copies: int) -> Batch:
        """The batch repeated ``copies`` times: row ``c * B + b`` is row ``b`` of copy ``c``."""
        def rep(t: torch.Tensor) -> torch.Tensor:
            return t.repeat(copies, *([1] * (t.dim() - 1)))
        return replace(self, input_ids=rep(self.input_ids), attention_mask=rep(self.attention_mask),
                       target_mask=rep(self.target_mask), task_index=rep(self.task_index),
                       example_index=rep(self.example_index))


def tokenize_examples(examples: Sequence[Example], tokenizer, tasks: Sequence[str], *,
                      max_length: int | None = None) -> list[TokenizedExample]:
    """Tokenise each prompt (with the tokenizer's special tokens) and target (without) and join them.

    Raises HeadscoreError for a target that tokenises to nothing or a sequence longer than
    ``max_length`` (the model's context).
    """
    task_of = {t: i for i, t in enumerate(tasks)}
    out = []
    for i, ex in enumerate(examples):
        prompt = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        target = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        where = f"{ex.describe(i)} ({printable(ex.task)})"
        if not target:
            raise HeadscoreError(f"{where}: target {ex.target!r} has no tokens")
        if not prompt:
            raise HeadscoreError(f"{where}: empty prompt (the target needs a context token)")
        ids = tuple(prompt) + tuple(target)
        if max_length is not None and len(ids) > max_length:
            raise HeadscoreError(f"{where} has {len(ids)} tokens; the model allows {max_length}")
        out.append(TokenizedExample(ids, len(target), task_of[ex.task], i))
    return out


def collate(items: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-pad tokenised examples into a :class:`Batch`."""
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    tmask = torch.zeros((len(items), width), dtype=torch.bool)
    for r, it in enumerate(items):
        n = len(it.ids)
        ids[r, :n] = torch.tensor(it.ids)
        attn[r, :n] = 1
        tmask[r, n - it.num_target:n] = True
    return Batch(ids, attn, tmask, torch.tensor([it.task_index for it in items]),
                 torch.tensor([it.index for it in items]))


def make_batches(items: Sequence[TokenizedExample], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Batches of at most ``batch_size`` rows, grouped by length to keep padding small."""
    if batch_size < 1:
        raise HeadscoreError(f"batch size must be at least 1, got {batch_size}")
    ordered = sorted(items, key=lambda it: (len(it.ids), it.index))
    for start in range(0, len(ordered), batch_size):
        yield collate(ordered[start:start + batch_size], pad_id)


def num_batches(num_items: int, batch_size: int) -> int:
    """How many batches :func:`make_batches` yields."""
    return -(-num_items // batch_size)
