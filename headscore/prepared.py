"""``prepare``: a model and tokenised examples, ready for any scorer (the object every run starts from)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .accumulate import TaskAccumulator
from .data.batching import Batch, collate, make_batches, num_batches, tokenize_examples
from .data.builtin import builtin_suite
from .data.examples import Example, limit_per_task, task_names, validate_examples
from .data.tables import as_examples
from .errors import HeadscoreError, UnsupportedModelError
from .loss import NonFiniteLoss
from .models import DEFAULT_MODEL, LoadedModel, check_classifier_padding, is_sequence_classifier, load_model
from .patch import gate_at_projections, head_layout, mark_absent_heads, mark_attention_layers
from .results import HeadScores, data_hash
from .separability import separability_report

ModelLike = LoadedModel | str


@dataclass
class Prepared:
    """A model and tokenised examples, ready for any scorer."""

    lm: LoadedModel
    examples: list[Example]
    tasks: list[str]
    tokenized: list

    @property
    def labelled(self) -> bool:
        """Whether the examples are a sequence classifier's (text, label) rather than prompt/target."""
        return self.examples[0].label is not None

    @property
    def data_hash(self) -> str:
        """Hash of the examples."""
        return data_hash(ex.hash_row() for ex in self.examples)

    def batches(self, batch_size: int, *, desc: str = "", progress: bool = True) -> Iterator[Batch]:
        """Tokenised batches on the model's device, with a progress bar."""
        check_classifier_padding(self.lm, batch_size, len(self.tokenized))
        device = self.lm.device
        bar = tqdm(make_batches(self.tokenized, batch_size, self.lm.pad_id), total=num_batches(
            len(self.tokenized), batch_size), desc=desc, unit="batch", disable=not progress, leave=False)
        for batch in bar:
            yield batch.to(device)

    def result(self, acc: TaskAccumulator, method: str, **extra) -> HeadScores:
        """Wrap accumulated values as HeadScores with this run's provenance (and the per-example values
        when the accumulator kept them); heads a layer does not have (per-layer head counts) are NaN."""
        kept = acc.examples
        if getattr(acc, "dropped", False):
            extra = {**extra, "example_values_dropped": True}
        layout = head_layout(self.lm.model)
        return HeadScores(mark_absent_heads(acc.mean, layout), mark_absent_heads(acc.stderr, layout),
                          acc.count.clone(), list(self.tasks), method, self.lm.name, self.data_hash, extra=extra,
                          example_values=None if kept is None else mark_absent_heads(kept[0], layout),
                          example_tasks=None if kept is None else kept[1])

    @contextlib.contextmanager
    def naming_examples(self) -> Iterator[None]:
        """Inside the block, a non-finite loss names its examples by source (``tasks.jsonl:12``)."""
        try:
            yield
        except NonFiniteLoss as exc:
            raise exc.named(self.examples) from None

    def accumulator(self, *, keep_examples: bool = True) -> TaskAccumulator:
        """An empty per-task accumulator over this model's heads (keeping per-example values unless told)."""
        layout = head_layout(self.lm.model)
        return TaskAccumulator(self.tasks, layout.num_layers, layout.num_heads, keep_examples=keep_examples)


def prepare(model: ModelLike = DEFAULT_MODEL, examples: Sequence[Example] | Any | None = None, *,
            max_examples: int | None = None, columns: Mapping[str, str] | None = None) -> Prepared:
    """Load the model (if given by name) and tokenise the examples (default: the built-in suite).

    ``examples`` may be a table, a pandas DataFrame or a ``datasets.Dataset`` with one example per row
    (:func:`headscore.data.tables.examples_from_table`; ``columns`` maps fields to its columns of other names,
    ``{"prompt": "question"}``). ``max_examples`` keeps at most that many examples per task.
    """
    examples = as_examples(examples, columns)
    lm = load_model(model) if isinstance(model, str) else model
    examples = builtin_suite() if examples is None else validate_examples(examples)
    examples = limit_per_task(examples, max_examples)
    labelled = examples[0].label is not None
    if labelled != is_sequence_classifier(lm.model):
        kind = type(lm.model).__name__
        raise HeadscoreError(
            f"{kind} is a sequence classifier: its examples are {{text, label, task}}" if not labelled else
            f"labelled examples (text, label) need a sequence classifier (...ForSequenceClassification); {kind} "
            "is not one")
    tasks = task_names(examples)
    tokenized = tokenize_examples(examples, lm.tokenizer, tasks, max_length=lm.max_length)
    check_separable(lm.model, collate(tokenized[:1], lm.pad_id).to(lm.device))
    return Prepared(lm, examples, tasks, tokenized)


def check_separable(model: torch.nn.Module, batch: Batch) -> None:
    """Raise UnsupportedModelError when ``model``'s heads cannot be gated one by one (head outputs mixed
    before the output projection, a layer's attention run twice per pass, no attention through the
    registry); one forward pass on ``batch``, once per model and dtype (the answer is remembered on it). Layers with an
    output gate of their own are gated at their output projection's input from then on
    (:func:`~headscore.patch.gate_at_projections`), and a hybrid model's layers without attention have no
    heads (:func:`~headscore.patch.mark_attention_layers`)."""
    dtype = next(model.parameters()).dtype
    cached = model.__dict__.get(_SEPARABLE_ATTR)
    report = cached[1] if cached is not None and cached[0] == dtype else None  # asked again after a cast
    if report is None:
        gate_at_projections(model, {})  # observed as the model is, not as an earlier report placed the gates
        mark_attention_layers(model, ())
        report = separability_report(model, batch)
        model.__dict__[_SEPARABLE_ATTR] = (dtype, report)
        if report.problem is None:
            gate_at_projections(model, report.output_gated)
            mark_attention_layers(model, report.attention_layers)
    if report.problem is not None:
        raise UnsupportedModelError(f"{type(model).__name__}: {report.problem}")


def output_gated_layers(model: torch.nn.Module) -> list[int]:
    """The layers of a prepared ``model`` whose head outputs reach the output projection scaled by the model's
    own output gate, and so are gated at the projection's input (see
    :class:`~headscore.separability.Separation`; empty before ``prepare``)."""
    cached = model.__dict__.get(_SEPARABLE_ATTR)
    return [] if cached is None else sorted(cached[1].output_gated)


def mixed_head_layers(model: torch.nn.Module) -> list[int]:
    """The layers of a prepared ``model`` whose head outputs reach the output projection through a linear
    transform that mixes them (no baseline can replace one head there; see
    :class:`~headscore.separability.Separation`; empty before ``prepare``)."""
    cached = model.__dict__.get(_SEPARABLE_ATTR)
    return [] if cached is None else list(cached[1].mixed)


_SEPARABLE_ATTR = "_headscore_separability"
