"""Per-example loss: mean negative log-likelihood of the target tokens."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from .data.batching import Batch
from .errors import HeadscoreError


class NonFiniteLoss(HeadscoreError):
    """The loss of some examples is inf or NaN; ``indices`` are their positions in the run's examples."""

    def __init__(self, indices: list[int], dtype: torch.dtype, names: list[str] | None = None):
        self.indices, self.dtype = indices, dtype
        shown = names or [f"example {i}" for i in indices]
        hint = ("; a half-precision model overflows more easily: try float32 (--dtype float32)"
                if dtype in (torch.float16, torch.bfloat16) else "")
        super().__init__(f"non-finite loss (inf or NaN) for {', '.join(shown[:5])}"
                         f"{f' and {len(shown) - 5} more' if len(shown) > 5 else ''}{hint}")

    def named(self, examples: Sequence) -> NonFiniteLoss:
        """The same error, naming the examples by their source (``Example.describe``)."""
        return NonFiniteLoss(self.indices, self.dtype, [examples[i].describe(i) for i in self.indices])


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
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


def finite_losses(loss: torch.Tensor, example_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``loss`` [B] itself, or NonFiniteLoss naming (once each) the examples of its inf/NaN rows.

    ``example_index`` [B] is each row's example; ``dtype`` the logits' (for the half-precision hint)."""
    bad = ~torch.isfinite(loss)
    if bad.any():
        raise NonFiniteLoss(list(dict.fromkeys(example_index[bad.to(example_index.device)].tolist())), dtype)
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
    return finite_losses(loss, batch.example_index, logits.dtype)


def example_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean target NLL of each row of ``batch`` [B] (float32, or float64 for a float64 model).

    Only the logits of the positions that predict target tokens are computed when the
    model supports ``logits_to_keep``. Raises HeadscoreError on a non-finite loss.
    """
    start, end = _target_span(batch)
    keep = torch.arange(start, end, device=batch.input_ids.device)
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                   **kwargs).logits
    return losses_from_logits(logits, batch, span_only=bool(kwargs))


def run_forward(model: torch.nn.Module, batch: Batch) -> None:
    """A forward pass for its side effects (observers), computing as few logits as the model allows."""
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs)
