"""Learnable head gates with a hard-concrete L0 penalty (Louizos et al. 2018; Voita et al. 2019).

Every head (l, h) gets a parameter ``log_alpha[l, h]``; its gate is a hard-concrete random
variable: with u ~ U(0, 1),

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),   z = clamp(s * (r - l) + l, 0, 1)

with temperature beta = 2/3 and stretch (l, r) = (-0.1, 1.1), so z is exactly 0 or 1 with
non-zero probability. The expected number of open heads, sum P(z != 0) =
sum sigmoid(log_alpha - beta * log(-l / r)), is differentiable, and training minimises

    mean target NLL (gates sampled per example row)  +  sparsity * E[L0] / (number of heads)

over ``log_alpha`` only (model weights frozen), the sum and the count over the model's real heads:
a head a layer does not have (a hybrid model's layers without attention, a layer with fewer heads
than the widest; :meth:`~headscore.patch.HeadLayout.absent_heads`) gets no gate, and the penalty is
the expected fraction of the real heads left open. At the end the deterministic gate
clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1) gives a head mask (gate > ``threshold``);
applying the mask (``HeadGates`` gates = mask as float) turns the other heads off.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .data.examples import Example
from .errors import HeadscoreError
from .loss import example_losses
from .patch import HeadGates, head_layout, patch
from .prepared import prepare
from .results import whole_at_least

__all__ = ["HardConcrete", "LearnedGates", "learn_gates", "apply_mask", "mask_losses"]


class HardConcrete(torch.nn.Module):
    """A hard-concrete gate per entry of ``shape`` with learnable ``log_alpha``."""

    def __init__(self, shape: Sequence[int], *, init: float = 3.0, beta: float = 2 / 3,
                 stretch: tuple[float, float] = (-0.1, 1.1)):
        super().__init__()
        lo, hi = stretch
        if not (lo < 0 and hi > 1 and beta > 0):
            raise ValueError("hard concrete needs stretch (l < 0, r > 1) and beta > 0")
        self.log_alpha = torch.nn.Parameter(torch.full(tuple(shape), float(init)))
        self.beta, self.lo, self.hi = float(beta), float(lo), float(hi)

    def sample(self, rows: int | None = None, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random gates in [0, 1] ([rows, *shape], or ``shape`` for ``rows=None``), differentiable in log_alpha."""
        shape = self.log_alpha.shape if rows is None else (rows, *self.log_alpha.shape)
        eps = 1e-6
        # drawn where the generator lives (a CPU generator cannot draw on a GPU), then moved to the gates
        where = self.log_alpha.device if generator is None else generator.device
        u = torch.rand(shape, generator=generator, device=where).to(self.log_alpha.device).clamp(eps, 1 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.hi - self.lo) + self.lo).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The test-time gates clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)."""
        return (torch.sigmoid(self.log_alpha) * (self.hi - self.lo) + self.lo).clamp(0.0, 1.0)

    def prob_open(self) -> torch.Tensor:
        """P(z != 0) per gate: sigmoid(log_alpha - beta * log(-l / r))."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.lo / self.hi))

    def prob_closed(self) -> torch.Tensor:
        """P(z == 0) per gate."""
        return 1.0 - self.prob_open()

    def prob_one(self) -> torch.Tensor:
        """P(z == 1) per gate: sigmoid(log_alpha - beta * log((1 - l) / (r - 1)))."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log((1 - self.lo) / (self.hi - 1)))

    def expected_l0(self) -> torch.Tensor:
        """Expected number of open gates (differentiable)."""
        return self.prob_open().sum()


@dataclass
class LearnedGates:
    """The result of :func:`learn_gates`.

    Attributes:
        log_alpha: [L, H] learned parameters (NaN where the layer has no such head, as in the maps).
        gates: [L, H] deterministic gates in [0, 1] (NaN where the layer has no such head).
        mask: bool [L, H], True = head kept (gate > threshold; False where the layer has no such head).
        loss_full: mean per-example target NLL of the unmodified model on the examples.
        loss_masked: the same with the mask applied (heads off where mask is False).
        history: per logged step: step, task loss, expected L0.
        seconds: training time.
    """

    log_alpha: torch.Tensor
    gates: torch.Tensor
    mask: torch.Tensor
    loss_full: float
    loss_masked: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kept(self) -> int:
        """Number of heads the mask keeps."""
        return int(self.mask.sum())

    @property
    def num_heads(self) -> int:
        """Number of heads the model has (those with a gate: not the absent ones of a hybrid model's layers
        without attention or of a layer with fewer heads than the widest)."""
        return int((~self.gates.isnan()).sum())

    @property
    def loss_change(self) -> float:
        """loss_masked - loss_full."""
        return self.loss_masked - self.loss_full


@contextlib.contextmanager
def apply_mask(heads: HeadGates, mask: torch.Tensor) -> Iterator[None]:
    """Turn off the heads where ``mask`` [L, H] is False for the forward passes in the block."""
    layout = heads.layout
    if tuple(mask.shape) != (layout.num_layers, layout.num_heads):
        raise HeadscoreError(f"mask must be [L, H] = {(layout.num_layers, layout.num_heads)}, got {tuple(mask.shape)}")
    with heads.using(mask.to(torch.float32)[None]):
        yield


def _prepared(model, examples, max_examples):
    return prepare(model, examples, max_examples=max_examples)


def mask_losses(model, examples: Sequence[Example] | None, mask: torch.Tensor, *, batch_size: int = 8,
                max_examples: int | None = None) -> tuple[float, float]:
    """(mean loss without, mean loss with the mask) over the examples (per-example mean target NLL)."""
    prep = _prepared(model, examples, max_examples)
    return _mask_losses(prep, mask, batch_size)


def _mask_losses(prep, mask: torch.Tensor, batch_size: int) -> tuple[float, float]:
    full = masked = 0.0
    n = 0
    with patch(prep.lm.model) as heads, torch.no_grad():
        for batch in prep.batches(batch_size, progress=False):
            full += float(example_losses(prep.lm.model, batch).double().sum())
            with apply_mask(heads, mask):
                masked += float(example_losses(prep.lm.model, batch).double().sum())
            n += batch.size
    return full / n, masked / n


def learn_gates(model, examples: Sequence[Example] | None = None, *, steps: int = 200, batch_size: int = 8,
                lr: float = 0.1, sparsity: float = 1.0, init: float = 2.0, threshold: float = 0.5,
                max_examples: int | None = None, seed: int = 0, log_every: int = 10,
                progress: bool = True) -> LearnedGates:
    """Train one hard-concrete gate per head with an L0 penalty, the model's weights frozen.

    Args:
        model: a :class:`LoadedModel` or a model name.
        examples: training examples (default: the built-in suite); the losses reported are
            on the same examples.
        steps: optimiser steps (Adam on log_alpha); batches cycle through the examples in a
            seeded random order.
        sparsity: weight of the expected fraction of open heads, E[L0] / (number of heads), against
            the mean target NLL; larger = fewer heads. Both count the model's real heads only: a head
            a layer does not have (hybrid models' layers without attention, per-layer head counts)
            has no gate (NaN in ``gates`` and ``log_alpha``, never kept).
        init: initial log_alpha (2.0: every head open with probability ~0.97).
        threshold: a head is kept when its deterministic gate exceeds this.
        log_every: record the history every this many steps (a whole number >= 1; the last step always).

    Returns:
        :class:`LearnedGates` with the mask and the loss with and without it.
    """
    if steps < 0 or batch_size < 1:
        raise HeadscoreError("steps must be >= 0 and batch_size >= 1")
    whole_at_least(log_every, 1, "learn_gates needs log_every")
    prep = _prepared(model, examples, max_examples)
    lm = prep.lm
    layout = head_layout(lm.model)  # after prepare: a hybrid model's layers without attention have 0 heads
    real = ~layout.absent_heads()
    total_heads = int(real.sum())
    if total_heads == 0:
        raise HeadscoreError(f"{type(lm.model).__name__} has no attention heads to gate")
    real_on_device = real.to(lm.device)
    gen = torch.Generator().manual_seed(seed)  # the only randomness: the global generator is left alone
    hc = HardConcrete((layout.num_layers, layout.num_heads), init=init).to(lm.device)
    opt = torch.optim.Adam(hc.parameters(), lr=lr)
    batches = list(prep.batches(batch_size, progress=False))
    history = []
    start = time.perf_counter()
    with patch(lm.model) as heads:  # freezes the weights
        order: list[int] = []
        for step in tqdm(range(steps), desc="learn gates", disable=not progress, leave=False):
            if not order:
                order = torch.randperm(len(batches), generator=gen).tolist()
            batch = batches[order.pop()]
            gates = hc.sample(batch.size, generator=gen)
            with heads.using(gates):
                task = example_losses(lm.model, batch).mean()
            l0 = hc.prob_open()[real_on_device].sum()  # E[L0] over the real heads
            loss = task + sparsity * l0 / total_heads
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % log_every == 0 or step == steps - 1:
                history.append({"step": step, "loss": float(task.detach()), "expected_l0": float(l0.detach())})
    seconds = time.perf_counter() - start
    with torch.no_grad():
        det = hc.deterministic().detach().cpu().masked_fill(~real, float("nan"))
        log_alpha = hc.log_alpha.detach().cpu().masked_fill(~real, float("nan"))
    mask = (det > threshold) & real
    full, masked = _mask_losses(prep, mask, batch_size)
    return LearnedGates(log_alpha, det, mask, full, masked, history, seconds)
