"""Gradient scorers: per-example gate gradients dL/dg from one forward and one backward pass.

- ``taylor``: -dL/dg, the first-order estimate of the loss increase when the head is zeroed;
- ``abs``: |dL/dg| (Michel et al. 2019);
- ``fisher``: (dL/dg)^2 (Kwon et al. 2022);
- ``atp-mean``: -dL/dg with the head's mean output as the baseline (attribution patching
  against mean ablation).

With the heads' outputs on a corrupted prompt as the baseline (per example and position), -dL/dg
is attribution patching (AtP) against activation patching. L is the per-example loss of a metric
(:mod:`headscore.loss`); with ``per_position`` the gradient keeps each token's term.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data.batching import Batch
from ..errors import HeadscoreError
from ..loss import NLL, Metric, example_losses
from ..patch import HeadGates

TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "taylor": lambda g: -g,
    "abs": torch.abs,
    "fisher": torch.square,
    "atp-mean": lambda g: -g,
}
GRADIENT_METHODS = tuple(TRANSFORMS)
NEEDS_MEAN_BASELINE = frozenset({"atp-mean"})


def gate_gradients(model: torch.nn.Module, heads: HeadGates, batch: Batch,
                   baseline: torch.Tensor | None = None, *, metric: Metric = NLL,
                   per_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loss [B] and gate gradient dL_b/dg[b, l, h] [B, L, H] for one batch (with
    ``per_position``, each token's term: [B, L, T, H], which sums over T to the former).

    ``baseline`` is [L, H, D] or per example and position [L, B, T, H, D]. The model must be patched
    (``heads`` from :func:`headscore.patch`); the backward pass reaches only the gates, so no
    weight gradients are computed.
    """
    # float32 gates (float64 for a float64 model): the gradient is reduced in that precision.
    dtype = torch.promote_types(torch.float32, next(model.parameters()).dtype)
    positions = batch.input_ids.shape[1] if per_position else None
    gates = heads.ones(batch.size, device=batch.input_ids.device, requires_grad=True, dtype=dtype,
                       positions=positions)
    with heads.using(gates, baseline):
        loss = example_losses(model, batch, metric)
    (grad,) = torch.autograd.grad(loss.sum(), gates)
    bad = ~torch.isfinite(grad.flatten(1)).all(1)
    if bad.any():
        rows = batch.example_index[bad.cpu()].tolist()
        raise HeadscoreError(
            f"non-finite gate gradients for example(s) {rows[:5]} although their loss is finite: the model's "
            "attention gives NaN on padded positions, which its backward pass spreads (eager attention whose "
            "sliding window holds only padding, as ModernBERT's); use attn_implementation='sdpa' or batch_size=1")
    return loss.detach(), grad


def score_values(method: str, grad: torch.Tensor) -> torch.Tensor:
    """Turn gate gradients into the per-example values a method averages."""
    return TRANSFORMS[method](grad)
