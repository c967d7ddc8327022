"""Per-example loss under a metric: target NLL (default), logit difference, probability, or a callable.

Every metric is used as a loss, oriented so that larger = worse for the model; a head's score (and
its ablation or patching effect) is the metric's loss with the head changed minus the clean one, so
larger = the head matters more for the metric:

- ``nll``: mean negative log-likelihood of the target tokens; a score is an increase in NLL (nats).
- ``logit-diff``: ``-(logit[target] - logit[foil])`` for the first tokens of target and foil at the
  answer position (the last prompt token); a score is the drop in logit difference.
- ``prob``: ``-p(target)`` of the target's first token at the answer position; a score is the drop
  in probability.
- a callable ``metric(logits, batch) -> [B]`` on the full logits [B, T, V] (positions of the padded
  batch; ``batch.target_mask`` marks target tokens): taken as a loss (larger = worse); wrap a
  higher-is-better metric as ``Metric("name", fn, higher_is_better=True)``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .data.batching import Batch
from .errors import HeadscoreError

PADDING_NAN = ("the model's attention gives NaN on padded positions (eager attention whose sliding window holds "
               "only padding, as ModernBERT's, Mistral's or Gemma 2's on prompts of very different lengths); use "
               "attn_implementation='sdpa' or batch_size=1")
"""What a NaN that only batches with padding get comes from, and what to do."""


def refuse_non_finite_mean(what: str, *tensors: torch.Tensor) -> None:
    """HeadscoreError where a mean over real tokens (``what``: "head outputs", ...) is not finite: padding is left
    out of such means, so a NaN there came into real tokens through the attention."""
    if not all(bool(torch.isfinite(x).all()) for x in tensors):
        raise HeadscoreError(f"the mean {what} are not finite (inf or NaN); if batch_size=1 gives finite ones, "
                             f"{PADDING_NAN}")


class NonFiniteLoss(HeadscoreError):
    """The loss of some examples is inf or NaN; ``indices`` are their positions in the run's examples;
    ``padded``: their batch had padding (the message then says what NaN on padding comes from)."""

    def __init__(self, indices: list[int], dtype: torch.dtype, names: list[str] | None = None, *,
                 padded: bool = False):
        self.indices, self.dtype, self.padded = indices, dtype, padded
        shown = names or [f"example {i}" for i in indices]
        hint = ("; a half-precision model overflows more easily: try float32 (--dtype float32)"
                if dtype in (torch.float16, torch.bfloat16) else "")
        if padded:
            hint += f"; their batch had padding: if batch_size=1 gives finite losses, {PADDING_NAN}"
        super().__init__(f"non-finite loss (inf or NaN) for {', '.join(shown[:5])}"
                         f"{f' and {len(shown) - 5} more' if len(shown) > 5 else ''}{hint}")

    def named(self, examples: Sequence) -> NonFiniteLoss:
        """The same error, naming the examples by their source (``Example.describe``)."""
        return NonFiniteLoss(self.indices, self.dtype, [examples[i].describe(i) for i in self.indices],
                             padded=self.padded)


METRICS = ("nll", "logit-diff", "prob")
"""Built-in metric names."""

MetricFn = Callable[[torch.Tensor, Batch], torch.Tensor]
"""A user's metric: ``fn(logits [B, T, V], batch) -> [B]``."""


@dataclass(frozen=True)
class Metric:
    """What a run measures per example.

    Attributes:
        name: a built-in name (:data:`METRICS`) or the user's name for ``fn``.
        fn: for a user's metric, ``fn(logits [B, T, V], batch) -> [B]`` (None for a built-in).
        higher_is_better: ``fn`` grows when the model does better (it is then negated into a loss).
    """

    name: str
    fn: MetricFn | None = None
    higher_is_better: bool = False

    @property
    def needs_foil(self) -> bool:
        """Whether every example must have a foil."""
        return self.fn is None and self.name == "logit-diff"

    def describe(self) -> str:
        """What a positive score means under this metric (for docs, reports and help)."""
        return {"nll": "increase in target NLL (nats/token)",
                "logit-diff": "drop in logit difference (target - foil, first tokens) at the answer position",
                "prob": "drop in the probability of the target's first token at the answer position"}.get(
            self.name, f"{'drop' if self.higher_is_better else 'increase'} in {self.name}")


NLL = Metric("nll")


def resolve_metric(metric: str | Metric | MetricFn | None) -> Metric:
    """A :class:`Metric` from a built-in name, a Metric, or a callable (a loss); None = ``nll``."""
    if metric is None:
        return NLL
    if isinstance(metric, Metric):
        if metric.fn is None and metric.name not in METRICS:
            raise HeadscoreError(f"unknown metric {metric.name!r}; choose one of {', '.join(METRICS)} or pass a "
                                 "callable")
        return metric
    if isinstance(metric, str):
        if metric not in METRICS:
            raise HeadscoreError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)} or pass a callable")
        return Metric(metric)
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric)
    raise HeadscoreError(f"metric must be a name ({', '.join(METRICS)}), a Metric or a callable, got "
                         f"{type(metric).__name__}")


def _builtin_loss(metric: Metric, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                  batch: Batch, vocabulary: torch.Tensor | None = None) -> torch.Tensor:
    """A built-in metric's loss [B] from the logits at each row's target-predicting positions [B, P, V]
    (column 0 is the answer position), their labels and mask [B, P]; with ``vocabulary`` (sorted token
    ids, :func:`read_vocabulary`) the logits are those tokens' only [B, P, len(vocabulary)]."""
    if metric.name == "nll":
        return target_nll(logits, labels, mask)
    answer = logits[:, 0].to(torch.promote_types(logits.dtype, torch.float32))
    target = labels[:, 0].to(answer.device)
    if metric.name == "prob":
        return -torch.softmax(answer, -1).gather(1, target[:, None]).squeeze(1)
    if batch.foil_ids is None:
        raise HeadscoreError("the logit-diff metric needs a foil for every example")
    foil = batch.foil_ids.to(answer.device)
    if vocabulary is not None:
        vocabulary = vocabulary.to(answer.device)
        target, foil = torch.searchsorted(vocabulary, target.contiguous()), torch.searchsorted(vocabulary, foil)
    rows = torch.arange(answer.shape[0], device=answer.device)
    return -(answer[rows, target] - answer[rows, foil])


def read_vocabulary(metric: Metric, batch: Batch) -> torch.Tensor | None:
    """The sorted token ids whose logits ``metric`` reads on ``batch`` (``logit-diff``: each row's target and
    foil), or None where it reads them all (``nll`` and ``prob`` normalise over the vocabulary; a user's
    metric sees everything)."""
    if metric.fn is not None or metric.name != "logit-diff" or batch.foil_ids is None or batch.target_mask is None:
        return None
    labels = target_positions(batch)[1][:, 0]
    return torch.unique(torch.cat([labels.cpu(), batch.foil_ids.cpu()]))


def _plain_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output embedding when it is a plain ``nn.Linear`` that runs its own forward (no wrapper
    of accelerate's or anyone's on the instance, no forward hooks, weights in memory), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or "forward" in head.__dict__ or head._forward_hooks:
        return None
    return None if head.weight.device.type == "meta" else head


@contextlib.contextmanager
def vocabulary_only(model: torch.nn.Module, vocabulary: torch.Tensor | None) -> Iterator[bool]:
    """Inside the block the model's output embedding computes the logits of the ``vocabulary`` tokens only
    (their rows of its weight: the same dot products, two columns of logits instead of 49,152 for
    ``logit-diff`` on SmolLM2); yields whether it does (False, changing nothing, for None or a head that is not
    a plain linear layer). Whatever the family applies to the logits afterwards (soft-capping, scaling) must
    be elementwise: :func:`trusted_vocabulary` checks that once per model before anything relies on it."""
    head = _plain_head(model) if vocabulary is not None else None
    if head is None:
        yield False
        return
    ids = vocabulary.to(head.weight.device)
    weight = head.weight.index_select(0, ids)
    bias = None if head.bias is None else head.bias.index_select(0, ids)
    head.forward = lambda hidden: torch.nn.functional.linear(hidden, weight, bias)
    try:
        yield True
    finally:
        del head.forward


def _custom_loss(metric: Metric, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    value = metric.fn(logits, batch)
    if not isinstance(value, torch.Tensor) or value.shape != (batch.size,) or not value.is_floating_point():
        got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise HeadscoreError(f"metric {metric.name!r} must return a float tensor [B] = [{batch.size}], got {got}")
    return -value if metric.higher_is_better else value


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (remembered on the model)."""
    cached = getattr(model, "_headscore_logits_to_keep", None)
    if cached is None:
        cached = "logits_to_keep" in inspect.signature(model.forward).parameters
        model._headscore_logits_to_keep = cached
    return cached


def target_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``labels`` [B, P] under ``logits`` [B, P, V] over the positions where ``mask`` [B, P]
    is set: [B], in float32 (float64 for a float64 model). The one loss every method measures."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    mask = mask.to(dtype)
    logp = torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum(1) / mask.sum(1)


def finite_losses(loss: torch.Tensor, example_index: torch.Tensor, dtype: torch.dtype,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``loss`` [B] itself, or NonFiniteLoss naming (once each) the examples of its inf/NaN rows.

    ``example_index`` [B] is each row's example; ``dtype`` the logits' (for the half-precision hint);
    ``attention_mask`` the batch's (for the hint on NaN from padding)."""
    bad = ~torch.isfinite(loss)
    if bad.any():
        padded = attention_mask is not None and bool((attention_mask == 0).any())
        raise NonFiniteLoss(list(dict.fromkeys(example_index[bad.to(example_index.device)].tolist())), dtype,
                            padded=padded)
    return loss


def _target_span(batch: Batch) -> tuple[int, int]:
    """Logit positions [start, end) that predict the batch's target tokens (logits at p predict p + 1)."""
    positions = batch.target_mask.any(0).nonzero().flatten()
    return int(positions[0]) - 1, int(positions[-1])


def losses_from_logits(logits: torch.Tensor, batch: Batch, *, span_only: bool = False) -> torch.Tensor:
    """Mean target NLL of each row of ``batch`` [B] from its logits: all positions [B, T, V], or with
    ``span_only`` just the positions that predict target tokens. Raises NonFiniteLoss on inf/NaN."""
    start, end = _target_span(batch)
    if not span_only:
        logits = logits[:, start:end]
    labels = batch.input_ids[:, start + 1:end + 1]
    loss = target_nll(logits, labels, batch.target_mask[:, start + 1:end + 1])
    return finite_losses(loss, batch.example_index, logits.dtype, batch.attention_mask)


def target_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's target tokens, packed to the left: (positions predicting them, labels, mask), each [B, P].

    P is the most target tokens of any row; entries past a row's own count repeat its first position
    and are masked out.
    """
    tm = batch.target_mask
    counts = tm.sum(1)
    width = int(counts.max())
    tokens = torch.argsort((~tm).to(torch.int8), dim=1, stable=True)[:, :width]  # target positions first, in order
    mask = torch.arange(width, device=tm.device)[None] < counts[:, None]
    tokens = torch.where(mask, tokens, tokens[:, :1])
    return tokens - 1, batch.input_ids.gather(1, tokens), mask


def _at_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T, C] at each row's positions ``index`` [B, P]: [B, P, C]."""
    index = index.to(x.device)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def classifier_losses(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """Each row's share of a sequence classifier's own loss [B], as its ``forward(labels=...)`` defines it:
    squared error for a regression head (one output, or ``problem_type="regression"``), else cross-entropy
    (float32, float64 for a float64 model). Multi-label heads are refused."""
    problem = getattr(config, "problem_type", None)
    labels = labels.to(logits.device)
    if problem == "multi_label_classification":
        raise HeadscoreError("multi-label classifiers are not supported (one label per example); set the model's "
                             "problem_type to single_label_classification or regression")
    dtype = torch.promote_types(torch.float32, logits.dtype)
    if problem == "regression" or logits.shape[-1] == 1:
        return (logits.to(dtype).squeeze(-1) - labels.to(dtype)).square().view(len(labels), -1).mean(1)
    if labels.is_floating_point():
        raise HeadscoreError(f"a classifier with {logits.shape[-1]} classes needs integer labels, got floats")
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]:
        raise HeadscoreError(f"labels must be class indices 0..{logits.shape[-1] - 1}; got {int(labels.min())}.."
                             f"{int(labels.max())}")
    return torch.nn.functional.cross_entropy(logits.to(dtype), labels, reduction="none")


def _in_model_dtype(logits: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Logits in a float64 model's dtype: some families return ``logits.float()``, and the loss of a float64
    model is float64 (the cast back changes no value; it keeps the softmax and its gradient exact)."""
    dtype = next(model.parameters()).dtype
    return logits.to(dtype) if dtype == torch.float64 and logits.dtype != dtype else logits


def example_losses(model: torch.nn.Module, batch: Batch, metric: Metric = NLL) -> torch.Tensor:
    """Each row's loss under ``metric`` [B] (default: mean target NLL; float32, or float64 for a float64
    model); see the module docstring for the metrics.

    For a built-in metric only the logits of the positions that predict target tokens are computed: the hidden states
    that reach the model's output embedding are gathered to each row's own target positions (a
    forward pre-hook on ``get_output_embeddings()``; anything the family applies to the logits
    afterwards, such as soft-capping, works on any shape). A family whose head does not take them
    that way gets the logits of the span of target positions instead (``logits_to_keep``) and is
    remembered. Without gradients, ``logit-diff`` gets the target's and the foil's logits only, on a model
    that passed :func:`trusted_vocabulary`'s check. A user's metric gets the logits of every position. A
    batch with labels (a sequence classifier's examples) gets :func:`classifier_losses`. Raises
    HeadscoreError on a non-finite loss.
    """
    if batch.labels is not None:
        logits = _in_model_dtype(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, model)
        return finite_losses(classifier_losses(logits, batch.labels, model.config), batch.example_index,
                             logits.dtype, batch.attention_mask)
    if metric.fn is not None:
        logits = _in_model_dtype(
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits, model)
        return finite_losses(_custom_loss(metric, logits, batch), batch.example_index, logits.dtype,
                             batch.attention_mask)
    vocabulary = None
    if not torch.is_grad_enabled() and _vocabulary_checked(model) and _plain_head(model):
        vocabulary = read_vocabulary(metric, batch)
    losses = _builtin_losses(model, batch, metric, vocabulary)
    if losses is None:  # the head gave other logits than those asked for: all of them from now on
        _remember_vocabulary_check(model, False)
        losses = _builtin_losses(model, batch, metric, None)
    return losses


def _logits_path(model: torch.nn.Module) -> tuple:
    """What decides how the logits come out of the output embedding: the model's forward (its class's, or a
    wrapper on the instance), the model's forward hooks and the head itself. A change of any of these after
    :func:`trusted_vocabulary`'s check calls for a new check."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (type(model).forward, model.__dict__.get("forward"), tuple(model._forward_hooks.values()), id(head))


def _vocabulary_checked(model: torch.nn.Module) -> bool | None:
    """The check's answer for the model as it is now: True (two logits are enough), False, or None (never
    checked, or the model's way to its logits changed since)."""
    record = getattr(model, "_headscore_vocabulary_only", None)
    return record[1] if record is not None and record[0] == _logits_path(model) else None


def _remember_vocabulary_check(model: torch.nn.Module, trusted: bool) -> None:
    model._headscore_vocabulary_only = (_logits_path(model), trusted)


def trusted_vocabulary(model: torch.nn.Module, metric: Metric, batch: Batch) -> torch.Tensor | None:
    """The tokens whose logits are enough for ``metric`` on ``batch`` (:func:`read_vocabulary`), where the
    model gives the same losses from them alone, else None. The first call on a model compares the two
    ways on ``batch`` (one forward pass each, with the model as it is; a two-logit pass that fails counts as
    a difference) and remembers the answer until the model's forward, its forward hooks or its head change
    (:func:`_logits_path`); from then on
    :func:`example_losses` computes only those logits in its passes without gradients (exact ablation and
    patching), never where a gradient flows (so the gradient scores do not change by a bit)."""
    vocabulary = read_vocabulary(metric, batch)
    if vocabulary is None or _plain_head(model) is None:  # (a head may have been wrapped since the check)
        return None
    if _vocabulary_checked(model) is None:
        with torch.no_grad():
            full = _builtin_losses(model, batch, metric, None)
            try:
                losses = _builtin_losses(model, batch, metric, vocabulary)
            except Exception:  # noqa: BLE001 - e.g. a family that masks logits by token id after its head
                losses = None
        # the two differ by the head's round-off alone (each logit the same dot product, summed in another order):
        # far below these bounds, which any change of the logits beyond the head (a mask, a renormalisation) exceeds
        dtype = next(model.parameters()).dtype
        scale = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
        _remember_vocabulary_check(model, losses is not None and bool(
            ((losses - full).abs() <= scale * (1 + full.abs())).all()))
    return vocabulary if _vocabulary_checked(model) else None


def _builtin_losses(model: torch.nn.Module, batch: Batch, metric: Metric,
                    vocabulary: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`example_losses` for a built-in metric, from the logits of ``vocabulary`` only when given (None
    if the model's head would not give those alone)."""
    start, end = _target_span(batch)
    keep = torch.arange(start, end, device=batch.input_ids.device)
    kwargs = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    width = len(vocabulary) if vocabulary is not None else None

    def forward() -> torch.Tensor | None:
        with vocabulary_only(model, vocabulary) as subset:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                           **kwargs).logits
        if width is not None and (not subset or logits.shape[-1] != width):
            return None
        return _in_model_dtype(logits, model)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(model, "_headscore_gather_head", True):
        positions, labels, mask = target_positions(batch)
        offset = start if kwargs else 0
        span = end - start if kwargs else batch.input_ids.shape[1]

        def gather(module, args):
            if not args or args[0].dim() != 3 or args[0].shape[1] != span:
                return None  # not the hidden states we expect: leave them, and the check below falls back
            return (_at_positions(args[0], positions - offset), *args[1:])

        handle = head.register_forward_pre_hook(gather)
        try:
            logits = forward()
        finally:
            handle.remove()
        if logits is None:
            return None
        if tuple(logits.shape[:2]) == tuple(positions.shape):
            return finite_losses(_builtin_loss(metric, logits, labels.to(logits.device), mask.to(logits.device),
                                               batch, vocabulary), batch.example_index, logits.dtype,
                                 batch.attention_mask)
        model._headscore_gather_head = False  # the head saw other inputs: use the span from now on
    logits = forward()
    if logits is None:
        return None
    if metric.name == "nll":
        return losses_from_logits(logits, batch, span_only=bool(kwargs))
    positions, labels, mask = target_positions(batch)
    logits = _at_positions(logits, positions - (start if kwargs else 0))
    return finite_losses(_builtin_loss(metric, logits, labels.to(logits.device), mask.to(logits.device), batch,
                                       vocabulary), batch.example_index, logits.dtype, batch.attention_mask)


def run_forward(model: torch.nn.Module, batch: Batch) -> None:
    """A forward pass for its side effects (observers), computing as few logits as the model allows."""
    kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs)
