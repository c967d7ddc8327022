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


def example_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean target NLL of each row of ``batch`` [B] (float32, or float64 for a float64 model).

    Only the logits of the positions that predict target tokens are computed when the
    model supports ``logits_to_keep``. Raises HeadscoreError on a non-finite loss.
    """
    positions = batch.target_mask.any(0).nonzero().flatten()
    start, end = int(positions[0]) - 1, int(positions[-1])  # logits at p predict token p + 1
    keep = torch.arange(start, end, device=batch.input_ids.device)
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                   **kwargs).logits
    if not kwargs:
        logits = logits[:, start:end]
    labels = batch.input_ids[:, start + 1:end + 1]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    mask = batch.target_mask[:, start + 1:end + 1].to(dtype)
    logp = torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss = -(logp * mask).sum(1) / mask.sum(1)
    if not torch.isfinite(loss).all():
        raise NonFiniteLoss(batch.example_index[~torch.isfinite(loss)].tolist(), logits.dtype)
    return loss


def run_forward(model: torch.nn.Module, batch: Batch) -> None:
    """A forward pass for its side effects (observers), computing as few logits as the model allows."""
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs)
