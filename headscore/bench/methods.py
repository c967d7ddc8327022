"""The bench's own timed methods, what every method gets (:class:`Context`) and returns (:class:`Output`), and
the pieces the peers share with them: the loss from full logits, gradient x activation per head, the head
sample and the one timed sampled-ablation sweep.

- ``floor``: a plain forward + backward pass with input gradients only (the embeddings' output requires
  grad, no weight gradients): the least any gradient method can cost;
- ``taylor``: :func:`headscore.score` (one forward + one backward pass per batch);
- ``ablate-prefix`` / ``ablate-batched`` / ``ablate-sequential``: :func:`headscore.ablate` in its three modes,
  the ground truth; the sequential
  (naive, one forward pass per head) sweep may be timed on a sample of heads and extrapolated to all
  L*H heads (marked ``extrapolated``);
- ``hooks-attribution``: gradient x activation at each ``o_proj`` input, collected with plain torch
  hooks, the way activation-caching libraries are used (no dependency; equals taylor).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..accumulate import TaskAccumulator
from ..api import ablate, score
from ..data.batching import Batch
from ..errors import HeadscoreError
from ..loss import NLL, Metric, example_losses, losses_from_logits
from ..methods.ablation import clean_losses, gated_losses, single_head_gates
from ..models import LoadedModel
from ..patch import head_layout, patch
from ..prepared import Prepared, prepare
from ..results import HeadScores


def head_sample(total: int, k: int | None) -> list[int] | None:
    """Flat indices l*H + h of ``k`` evenly spaced heads out of ``total`` (None: all heads).

    The one head-sampling formula of every sampled sweep (headscore's and TransformerLens' ablation)."""
    if k is None or k >= total:
        return None
    k = max(1, k)
    return sorted({int(round(i * (total - 1) / max(1, k - 1))) for i in range(k)}) if k > 1 else [0]


@dataclass
class Context:
    """What every method gets: the model, the examples and the run's settings."""

    lm: LoadedModel
    examples: list
    batch_size: int = 8
    max_examples: int | None = None
    rows_per_pass: int = 64
    sample_heads: int | None = 16
    full_ablation: bool = True  # False: batched ablation also timed on the head sample (no Spearman)
    _prep: Prepared | None = field(default=None, repr=False)

    @property
    def prep(self) -> Prepared:
        """The tokenised examples (cached: tokenising is not what is being measured)."""
        if self._prep is None:
            self._prep = prepare(self.lm, self.examples, max_examples=self.max_examples)
        return self._prep

    @property
    def num_heads_total(self) -> int:
        layout = head_layout(self.lm.model)
        return layout.num_layers * layout.num_heads

    def head_sample(self) -> list[int] | None:
        """Flat indices l*H + h of the heads a sampled sweep measures (None: all heads)."""
        return head_sample(self.num_heads_total, self.sample_heads)


@dataclass
class Output:
    """What one run of a method returns: its scores (None for the floor or a partial sweep) and,
    for a sampled sweep, the extrapolated seconds for all heads."""

    scores: HeadScores | None = None
    seconds: float | None = None
    note: str = ""
    partial: dict | None = None  # {flat head index: [T] per-task mean delta} for a sampled sweep


Method = Callable[[Context], Output]


# ----------------------------------------------------------------------------- shared pieces

def attribution_from_acts(acts: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], num_heads: int) -> torch.Tensor:
    """Per-example -sum_t <act, grad> per head: [B, L, H] from per-layer [B, T, H*D] tensors."""
    out = []
    for a, g in zip(acts, grads, strict=True):
        b, t, _ = a.shape
        out.append(-(a.double() * g.double()).view(b, t, num_heads, -1).sum((1, 3)))
    return torch.stack(out, 1)


def timed_head_sweep(ctx: Context, sample: list[int], clean: Callable[[Batch], torch.Tensor],
                     ablated: Callable[[Batch], torch.Tensor]) -> Output:
    """Time a per-head ablation sweep over the heads ``sample`` and extrapolate it to all heads.

    ``clean(batch)`` gives the losses [B] with every head on, ``ablated(batch)`` the losses [K, B] with
    each sampled head ablated in turn. Seconds: clean passes + (time of the sampled heads) * (L*H / K);
    ``partial``: the per-task mean loss increase of each sampled head.
    """
    prep = ctx.prep
    acc = TaskAccumulator(prep.tasks, 1, len(sample))
    t_clean = t_heads = 0.0
    with torch.no_grad():
        for batch in prep.batches(ctx.batch_size, progress=False):
            t0 = time.perf_counter()
            base = clean(batch)
            t1 = time.perf_counter()
            losses = ablated(batch)
            t_heads += time.perf_counter() - t1
            t_clean += t1 - t0
            acc.add(batch.task_index, (losses - base[None]).T.unsqueeze(1))
    n = ctx.num_heads_total
    note = "measured on all heads" if len(sample) == n else f"extrapolated from {len(sample)} of {n} heads"
    return Output(seconds=t_clean + t_heads * n / len(sample), note=note,
                  partial=dict(zip(sample, acc.mean[:, 0].T.tolist(), strict=True)))


# ----------------------------------------------------------------------------- built-in methods

def run_floor(ctx: Context) -> Output:
    """Forward + backward to the embeddings' output only (weights frozen): the cost floor."""
    floor_pass(ctx.lm.model, ctx.prep.batches(ctx.batch_size, progress=False))
    return Output()


def floor_pass(model: torch.nn.Module, batches: Iterable[Batch], metric: Metric = NLL) -> None:
    """The cost floor: forward and backward of ``metric``'s loss to the input embeddings' output only, no
    gates, weights frozen (their ``requires_grad`` restored after)."""
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for batch in batches:
            example_losses(model, batch, metric).sum().backward()
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def run_taylor(ctx: Context) -> Output:
    """headscore.score(method='taylor') over all heads."""
    return Output(score(ctx.lm, ctx.examples, method="taylor", batch_size=ctx.batch_size,
                        max_examples=ctx.max_examples, progress=False))


def full_ablation(ctx: Context, mode: str) -> Output:
    """headscore.ablate over every head in ``mode`` (batched: on the head sample when ``ctx.full_ablation`` is
    off). Prefix reuse always runs every head: its passes run each head's layers from its own up, packed with
    the heads of its layer, after one recording pass per batch, so a sample's time does not scale to all heads
    (extrapolated, it came out 1.1-2.4x too high)."""
    if not ctx.full_ablation and mode != "prefix":
        return sampled_ablation(ctx, mode)
    return Output(ablate(ctx.lm, ctx.examples, mode=mode, batch_size=ctx.batch_size,
                         rows_per_pass=ctx.rows_per_pass, max_examples=ctx.max_examples, progress=False))


def run_ablate_prefix(ctx: Context) -> Output:
    """headscore.ablate(mode='prefix'): batched, and layers below each ablated head run once per batch."""
    return full_ablation(ctx, "prefix")


def run_ablate_batched(ctx: Context) -> Output:
    """headscore.ablate(mode='batched'): every head, rows of one pass carry different gates."""
    return full_ablation(ctx, "batched")


def sampled_ablation(ctx: Context, mode: str) -> Output:
    """headscore's ablation of the head sample (one forward pass per head when sequential), timed and
    extrapolated to all heads by :func:`timed_head_sweep`; all heads through :func:`headscore.ablate`
    when the sample is all of them."""
    sample = ctx.head_sample()
    if sample is None:
        return Output(ablate(ctx.lm, ctx.examples, mode=mode, batch_size=ctx.batch_size,
                             rows_per_pass=ctx.rows_per_pass, max_examples=ctx.max_examples, progress=False))
    model = ctx.lm.model
    layout = head_layout(model)
    rows = single_head_gates(layout.num_layers, layout.num_heads)[sample]
    with patch(model) as heads:
        return timed_head_sweep(
            ctx, sample, lambda batch: clean_losses(model, heads, batch),
            lambda batch: gated_losses(model, heads, batch, rows, None, mode=mode, max_rows=ctx.rows_per_pass))


def run_ablate_sequential(ctx: Context) -> Output:
    """headscore's sequential (naive) ablation: one forward pass per head (sampled + extrapolated)."""
    return sampled_ablation(ctx, "sequential")


def o_proj_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The output projection of every attention layer, in layer order (o_proj / out_proj / c_proj / dense)."""
    layers = []
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            continue
        for name in ("o_proj", "out_proj", "c_proj", "dense"):
            proj = getattr(module, name, None)
            if isinstance(proj, torch.nn.Module):
                layers.append((idx, proj))
                break
    if not layers:
        raise HeadscoreError("no attention output projection (o_proj) found")
    return [proj for _, proj in sorted(layers, key=lambda x: x[0])]


def run_hooks_attribution(ctx: Context) -> Output:
    """Gradient x activation at each o_proj input, with plain torch forward pre-hooks and
    ``retain_grad`` (how hook-based libraries cache activations); weights keep their
    ``requires_grad`` as loaded, as a user of those libraries has them. The loss comes from the
    full logits, as those libraries compute them."""
    model, prep = ctx.lm.model, ctx.prep
    num_heads = head_layout(model).num_heads
    projs = o_proj_modules(model)
    acc = prep.accumulator()
    for batch in prep.batches(ctx.batch_size, progress=False):
        acts: list[torch.Tensor] = []

        def save(_m, args, acts=acts):
            x = args[0]
            if not x.requires_grad:
                x.requires_grad_(True)
            x.retain_grad()
            acts.append(x)

        handles = [p.register_forward_pre_hook(save) for p in projs]
        try:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            losses_from_logits(logits, batch).sum().backward()
        finally:
            for h in handles:
                h.remove()
        acc.add(batch.task_index, attribution_from_acts([a.detach() for a in acts], [a.grad for a in acts],
                                                       num_heads))
    model.zero_grad(set_to_none=True)
    return Output(prep.result(acc, "hooks-attribution"))


BUILTIN: dict[str, Method] = {
    "floor": run_floor,
    "taylor": run_taylor,
    "ablate-prefix": run_ablate_prefix,
    "ablate-batched": run_ablate_batched,
    "ablate-sequential": run_ablate_sequential,
    "hooks-attribution": run_hooks_attribution,
}
