"""Tokenisation and batching: prompt and target tokenised and joined, a mask on target tokens."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch

from ..errors import HeadscoreError
from ..text import printable
from .examples import Example


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + target; the last ``num_target`` ids are the target.

    ``corrupt_ids`` (when the example has a corrupted prompt) are the corrupted prompt's ids + the same
    target ids, as long as ``ids``; ``foil_id`` is the first token of the example's foil (else None).
    """

    ids: tuple[int, ...]
    num_target: int
    task_index: int
    index: int
    corrupt_ids: tuple[int, ...] | None = None
    foil_id: int | None = None
    label: int | float | None = None

    @property
    def prompt_length(self) -> int:
        """Number of prompt tokens."""
        return len(self.ids) - self.num_target


@dataclass(frozen=True)
class Batch:
    """A right-padded batch.

    Attributes:
        input_ids: [B, T] token ids (padding after each row's tokens).
        attention_mask: [B, T] 1 on real tokens.
        target_mask: [B, T] True where the token is a target token (predicted from position t-1).
        task_index: [B] index of each row's task in the run's task list.
        example_index: [B] position of each row's example in the input list.
        corrupt_ids: [B, T] the corrupted prompts + targets, padded like ``input_ids`` (None unless
            every example of the batch has a corrupted prompt).
        foil_ids: [B] first token of each row's foil (None unless every example has a foil).
        labels: [B] labels of a sequence classifier's examples (long: classes; float: regression), else None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    task_index: torch.Tensor
    example_index: torch.Tensor
    corrupt_ids: torch.Tensor | None = None
    foil_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of rows."""
        return int(self.input_ids.shape[0])

    def _map(self, fn) -> Batch:
        """The batch with ``fn`` applied to each of its tensors."""
        changed = {}
        for f in fields(self):
            t = getattr(self, f.name)
            changed[f.name] = None if t is None else fn(t)
        return replace(self, **changed)

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``."""
        return self._map(lambda t: t.to(device))

    def tile(self, copies: int) -> Batch:
        """The batch repeated ``copies`` times: row ``c * B + b`` is row ``b`` of copy ``c``."""
        return self._map(lambda t: t.repeat(copies, *([1] * (t.dim() - 1))))

    def select(self, rows: torch.Tensor) -> Batch:
        """The batch's rows ``rows`` [N] (indices, repeats allowed): row i is row ``rows[i]``."""
        return self._map(lambda t: t.index_select(0, rows.to(t.device)))

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """[B] number of prompt tokens of each row (the tokens before its first target token)."""
        return self.target_mask.int().argmax(1)

    def corrupted(self) -> Batch:
        """The same batch with the corrupted prompts as its input (ValueError if it has none)."""
        if self.corrupt_ids is None:
            raise ValueError("the batch has no corrupted prompts")
        return replace(self, input_ids=self.corrupt_ids)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """A prompt's token ids with the special tokens the tokenizer puts before a text (a BOS) and none of
    those it puts after one (an EOS: the target follows the prompt); no second BOS when the text starts
    with it already (a chat template rendered as text writes it). Also the text's own ids, without any
    special token added.

    A tokenizer that changes the text's own tokens when it adds its special ones keeps its own ids.
    """
    plain, full = _ids(tokenizer, text, False), _ids(tokenizer, text, True)
    if not plain:  # an empty prompt: the special tokens before a text, found from a text of one letter
        probe = _ids(tokenizer, "a", False)
        lead = _leading(_ids(tokenizer, "a", True), probe) if probe else None
        return (full if lead is None else lead), plain
    lead = _leading(full, plain)
    if lead is None:
        return full, plain
    if plain[:len(lead)] == lead:
        lead = []
    return lead + plain, plain


def _leading(full: list[int], plain: list[int]) -> list[int] | None:
    """The ids ``full`` (a text with special tokens) has before ``plain`` (the same text without), or None where
    ``plain`` is not in ``full``."""
    n = len(plain)
    start = next((k for k in range(len(full) - n + 1) if full[k:k + n] == plain), None)
    return None if start is None else full[:start]


def continuation_ids(tokenizer, prompt: str, prompt_plain: Sequence[int], text: str) -> list[int]:
    """The ids of ``text`` as they follow ``prompt`` (whose own ids are ``prompt_plain``): the joined text's ids
    after the prompt's when the prompt's ids begin the joined text's, else ``text`` tokenised alone.

    Tokenised alone, a target can get a token it would not have after its prompt: a SentencePiece
    tokenizer that prepends a word boundary to every text turns " Paris" into a lone boundary token and
    "Paris".
    """
    return _continuation(tokenizer, prompt, prompt_plain, text)[0]


def _continuation(tokenizer, prompt: str, prompt_plain: Sequence[int], text: str) -> tuple[list[int], bool]:
    """:func:`continuation_ids`, and whether the prompt's ids begin the joined text's."""
    joined = _ids(tokenizer, prompt + text, False)
    n = len(prompt_plain)
    if n and len(joined) > n and joined[:n] == list(prompt_plain):
        return joined[n:], True
    return _ids(tokenizer, text, False), False


def tokenize_examples(examples: Sequence[Example], tokenizer, tasks: Sequence[str], *,
                      max_length: int | None = None) -> list[TokenizedExample]:
    """Tokenise each prompt (with the special tokens the tokenizer puts before a text: :func:`prompt_ids`)
    and its target (as it follows the prompt: :func:`continuation_ids`) and join them; likewise an
    example's corrupted prompt (with the same target), and the first token of its foil.

    Raises HeadscoreError for a target that tokenises to nothing, a sequence longer than
    ``max_length`` (the model's context), a corrupted prompt of another token length than the
    prompt, or a foil whose first token is the target's.
    """
    task_of = {t: i for i, t in enumerate(tasks)}
    out = []
    apart: list[int] = []  # examples whose prompt does not tokenise as the joined text begins
    for i, ex in enumerate(examples):
        where = f"{ex.describe(i)} ({printable(ex.task)})"
        if ex.label is not None:  # an encoder's input keeps every special token (a classifier reads them)
            prompt = _ids(tokenizer, ex.prompt, True)
            if max_length is not None and len(prompt) > max_length:
                raise HeadscoreError(f"{where} has {len(prompt)} tokens; the model allows {max_length}")
            out.append(TokenizedExample(tuple(prompt), 0, task_of[ex.task], i, label=ex.label))
            continue
        prompt, plain = prompt_ids(tokenizer, ex.prompt)
        target, joined = _continuation(tokenizer, ex.prompt, plain, ex.target)
        if not joined and plain:
            apart.append(i)
        if not target:
            raise HeadscoreError(f"{where}: target {ex.target!r} has no tokens")
        if not prompt:
            raise HeadscoreError(f"{where}: empty prompt (the target needs a context token)")
        ids = tuple(prompt) + tuple(target)
        if max_length is not None and len(ids) > max_length:
            raise HeadscoreError(f"{where} has {len(ids)} tokens; the model allows {max_length}")
        corrupt = foil = None
        if ex.corrupt is not None:
            corrupt_prompt, _ = prompt_ids(tokenizer, ex.corrupt)
            if len(corrupt_prompt) != len(prompt):
                raise HeadscoreError(f"{where}: the corrupted prompt has {len(corrupt_prompt)} tokens, the prompt "
                                     f"{len(prompt)}; they must have the same length")
            corrupt = tuple(corrupt_prompt) + tuple(target)
        if ex.foil is not None:
            foil_tokens = continuation_ids(tokenizer, ex.prompt, plain, ex.foil)
            if not foil_tokens:
                raise HeadscoreError(f"{where}: foil {ex.foil!r} has no tokens")
            if foil_tokens[0] == target[0]:
                raise HeadscoreError(f"{where}: foil {ex.foil!r} starts with the same token as the target "
                                     f"{ex.target!r}; a logit difference between them is always 0")
            foil = foil_tokens[0]
        out.append(TokenizedExample(ids, len(target), task_of[ex.task], i, corrupt, foil))
    if apart:
        first = examples[apart[0]]
        warnings.warn(f"{len(apart)} example(s), the first {first.describe(apart[0])} (prompt ending "
                      f"{printable(first.prompt[-12:])!r}, target {printable(first.target)!r}), tokenise otherwise "
                      "apart than as one text (a prompt ending in a space, a target without its leading space, or "
                      "a tokenizer that merges the prompt's last word with the target?): the target is scored as "
                      "tokenised alone (a SentencePiece tokenizer then adds a word boundary before it), which the "
                      "model seldom sees", stacklevel=3)
    return out


def collate(items: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-pad tokenised examples into a :class:`Batch`."""
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    tmask = torch.zeros((len(items), width), dtype=torch.bool)
    corrupt = ids.clone() if all(it.corrupt_ids is not None for it in items) else None
    for r, it in enumerate(items):
        n = len(it.ids)
        ids[r, :n] = torch.tensor(it.ids)
        attn[r, :n] = 1
        if it.num_target:
            tmask[r, n - it.num_target:n] = True
        if corrupt is not None:
            corrupt[r, :n] = torch.tensor(it.corrupt_ids)
    foils = torch.tensor([it.foil_id for it in items]) if all(it.foil_id is not None for it in items) else None
    labels = torch.tensor([it.label for it in items]) if all(it.label is not None for it in items) else None
    return Batch(ids, attn, tmask, torch.tensor([it.task_index for it in items]),
                 torch.tensor([it.index for it in items]), corrupt, foils, labels)


def _grouped(items: Sequence[TokenizedExample], batch_size: int) -> Iterator[Sequence[TokenizedExample]]:
    """The examples of each batch: at most ``batch_size``, grouped by length to keep padding small."""
    if batch_size < 1:
        raise HeadscoreError(f"batch size must be at least 1, got {batch_size}")
    ordered = sorted(items, key=lambda it: (len(it.ids), it.index))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start:start + batch_size]


def make_batches(items: Sequence[TokenizedExample], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Batches of at most ``batch_size`` rows, grouped by length to keep padding small."""
    for group in _grouped(items, batch_size):
        yield collate(group, pad_id)


def batch_cells(items: Sequence[TokenizedExample], batch_size: int) -> int:
    """Rows x width summed over the batches :func:`make_batches` makes (token slots, padding included)."""
    return sum(len(group) * max(len(it.ids) for it in group) for group in _grouped(items, batch_size))


def num_batches(num_items: int, batch_size: int) -> int:
    """How many batches :func:`make_batches` yields."""
    return -(-num_items // batch_size)


def weighted_tokens_only(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T, ...] with every token of weight 0 in ``weights`` [B, T] (padding; a probe's unread tokens) set
    to 0, for a weighted sum over tokens: ``weights * x`` lets a NaN there through (0 * NaN is NaN), and eager
    sliding-window attention gives NaN at a padded position whose window holds only padding."""
    keep = (weights != 0).to(x.device).reshape(*weights.shape, *([1] * (x.dim() - weights.dim())))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
