"""Gradient scorers: per-example gate gradients dL/dg from one forward and one backward pass.

- ``taylor``: -dL/dg, the first-order estimate of the loss increase when the head is zeroed;
- ``abs``: |dL/dg| (Michel et al. 2019);
- ``fisher``: (dL/dg)^2 (Kwon et al. 2022);
- ``atp-mean``: -dL/dg with the head's mean output as the baseline (attribution patching
  against mean ablation);
- ``ig``: integrated gradients along the gate path, -mean of dL/dg over ``steps`` midpoints of
  the path from every gate at 1 to every gate at 1 - ``fraction`` (``fraction`` = 1: the whole path
  to the baseline; the mean slope estimates a full change of one head either way);
- ``curvature``: taylor plus a second-order term, -dL/dg + 1/2 d2L/dg2, the Hessian's diagonal
  estimated from one more gradient (Hutchinson: a random +-1 probe per example, a finite difference
  of the gradient along it).

With the heads' outputs on a corrupted prompt as the baseline (per example and position), -dL/dg
is attribution patching (AtP) against activation patching. L is the per-example loss of a metric
(:mod:`headscore.loss`); with ``per_position`` the gradient keeps each token's term.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data.batching import Batch
from ..errors import HeadscoreError
from ..gate import gate_dtype
from ..loss import NLL, PADDING_NAN, Metric, example_losses
from ..patch import HeadGates

TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "taylor": lambda g: -g,
    "abs": torch.abs,
    "fisher": torch.square,
    "atp-mean": lambda g: -g,
}
PATH_METHODS = ("ig", "curvature")
"""Estimators that evaluate the gate gradient at more than one point (more than one backward pass)."""
GRADIENT_METHODS = (*TRANSFORMS, *PATH_METHODS)
NEEDS_MEAN_BASELINE = frozenset({"atp-mean"})
DEFAULT_IG_STEPS = 2
DEFAULT_IG_FRACTION = 0.2
CURVATURE_STEP = 0.1
"""The finite-difference step of ``curvature``'s Hessian-vector product (gates moved by +-0.1)."""


def gradient_passes(method: str, steps: int = DEFAULT_IG_STEPS) -> int:
    """Forward + backward passes per batch a method takes (the corrupted run's forward pass not counted)."""
    return {"ig": steps, "curvature": 2}.get(method, 1)


def gate_gradients(model: torch.nn.Module, heads: HeadGates, batch: Batch,
                   baseline: torch.Tensor | None = None, *, metric: Metric = NLL,
                   per_position: bool = False, at: torch.Tensor | float | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loss [B] and gate gradient dL_b/dg[b, l, h] [B, L, H] for one batch (with
    ``per_position``, each token's term: [B, L, T, H], which sums over T to the former).

    ``at``: where the gradient is taken: None = every gate at 1 (the unmodified model), a number
    (every gate at it), or gate values shaped like the gradient.

    ``baseline`` is [L, H, D] or per example and position [L, B, T, H, D]. The model must be patched
    (``heads`` from :func:`headscore.patch`); the backward pass reaches only the gates, so no
    weight gradients are computed.
    """
    # float32 gates (float64 for a float64 model): the gradient is reduced in that precision.
    dtype = gate_dtype(model)
    positions = batch.input_ids.shape[1] if per_position else None
    gates = heads.ones(batch.size, device=batch.input_ids.device, requires_grad=at is None, dtype=dtype,
                       positions=positions)
    if at is not None:
        gates = (gates * (at.to(gates) if isinstance(at, torch.Tensor) else at)).requires_grad_(True)
    with heads.using(gates, baseline):
        loss = example_losses(model, batch, metric)
    (grad,) = torch.autograd.grad(loss.sum(), gates)
    refuse_non_finite(grad, batch)
    return loss.detach(), grad


def refuse_non_finite(grad: torch.Tensor, batch: Batch, what: str = "gate gradients") -> None:
    """HeadscoreError naming the examples whose ``grad`` [B, ...] (gate gradients, edge scores) is not finite
    although their loss is (``finite_losses`` refused the others before)."""
    bad = ~torch.isfinite(grad.flatten(1)).all(1)
    if bad.any():
        rows = batch.example_index[bad.cpu()].tolist()
        raise HeadscoreError(
            f"non-finite {what} for example(s) {rows[:5]} although their loss is finite, which its backward pass "
            f"spreads from padded positions: {PADDING_NAN}")


def score_values(method: str, grad: torch.Tensor) -> torch.Tensor:
    """Turn gate gradients into the per-example values a method averages (``ig``: its mean gradient's)."""
    return -grad if method == "ig" else TRANSFORMS[method](grad)


def integrated_gradients(model: torch.nn.Module, heads: HeadGates, batch: Batch,
                         baseline: torch.Tensor | None = None, *, metric: Metric = NLL, per_position: bool = False,
                         steps: int = DEFAULT_IG_STEPS, fraction: float = DEFAULT_IG_FRACTION
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss [B] at the path's first point and the mean gate gradient along the path from every gate at 1 to
    every gate at 1 - ``fraction`` (the midpoints of ``steps`` equal pieces), shaped like
    :func:`gate_gradients`' one.

    With ``fraction`` = 1 this is integrated gradients with the baseline as the path's end:
    ``-fraction * mean`` summed over heads is the loss change when every head moves together
    (completeness). ``ig``'s value is ``-mean``: the path's mean slope, an estimate of one head's change.
    """
    if steps < 1:
        raise HeadscoreError(f"ig needs at least 1 step, got {steps}")
    if not 0 < fraction <= 1:
        raise HeadscoreError(f"the path fraction must be in (0, 1], got {fraction}")
    loss, total = None, None
    for k in range(steps):
        point = 1.0 - fraction * (k + 0.5) / steps
        step_loss, grad = gate_gradients(model, heads, batch, baseline, metric=metric, per_position=per_position,
                                         at=point)
        loss, total = (step_loss, grad) if total is None else (loss, total + grad)
    return loss, total / steps


def probe_signs(example_index: torch.Tensor, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """One Rademacher (+-1) probe per example, [B, *shape], fixed by the example's index and ``seed`` (the same
    probe whatever batch the example lands in)."""
    rows = []
    for index in example_index.tolist():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(index))
        rows.append(torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1)
    return torch.stack(rows)


def curvature_estimates(model: torch.nn.Module, heads: HeadGates, batch: Batch,
                        baseline: torch.Tensor | None = None, *, metric: Metric = NLL, seed: int = 0,
                        step: float = CURVATURE_STEP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean loss [B], gate gradient at 1 [B, L, H] and the second-order estimate of each head's loss change
    when it is set to its baseline, -dL/dg + 1/2 d2L/dg2 [B, L, H].

    The Hessian's diagonal comes from one Hessian-vector product per example with a random +-1 probe v
    (Hutchinson: E[v * Hv] = diag H), Hv taken as the finite difference of the gradient between the gates at
    1 and at 1 - ``step`` * v. Unbiased over probes, but every other head's curvature with this one adds noise.
    """
    loss, grad = gate_gradients(model, heads, batch, baseline, metric=metric)
    v = probe_signs(batch.example_index, tuple(grad.shape[1:]), seed).to(grad)
    _, moved = gate_gradients(model, heads, batch, baseline, metric=metric, at=1.0 - step * v)
    diag = v * (grad - moved) / step
    return loss, grad, -grad + 0.5 * diag
