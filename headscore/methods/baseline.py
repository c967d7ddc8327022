"""Baselines a head takes at gate 0: its mean output (mean ablation), or its output on the corrupted
prompt (activation patching), each from one forward-only pass."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..data.batching import Batch, weighted_tokens_only
from ..gate import gate_dtype
from ..loss import refuse_non_finite_mean, run_forward
from ..patch import HeadGates, HeadLayout


def _stacked(per_layer: list[torch.Tensor | None], layout: HeadLayout, where: str) -> torch.Tensor:
    """One tensor per layer, stacked (fewer or narrower heads zero-padded to the largest layer's, as a
    per-layer-config model's layout says; zeros for a layer without heads); ValueError naming the layers with
    heads whose attention output never came."""
    missing = [i for i, x in enumerate(per_layer) if x is None and layout.heads_of(i) > 0]
    if missing or all(x is None for x in per_layer):
        raise ValueError(f"no attention output seen for layer(s) {(missing or list(range(len(per_layer))))[:5]}"
                         f"{where}")
    some = next(x for x in per_layer if x is not None)
    per_layer = [torch.zeros_like(some) if x is None else x for x in per_layer]
    heads, width = max(x.shape[-2] for x in per_layer), max(x.shape[-1] for x in per_layer)
    return torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[-1], 0, heads - x.shape[-2]))
                        for x in per_layer])


@torch.no_grad()
def mean_head_outputs(model: torch.nn.Module, heads: HeadGates, batches: Iterable[Batch]) -> torch.Tensor:
    """Mean of every head's output over all real (non-padding) tokens of every example (each token weighted
    alike, the BOS and target tokens included): [L, H, D], float32 (float64 for a float64 model).

    The sums are kept in float64; memory is O(L * H * D) whatever the data size.
    """
    layout = heads.layout
    sums: list[torch.Tensor | None] = [None] * layout.num_layers  # shaped by what each layer outputs
    tokens = 0
    mask: torch.Tensor | None = None

    def observe(layer: int, out: torch.Tensor) -> None:
        total = torch.einsum("bt,bthd->hd", mask.to(out.device, torch.float64),
                             weighted_tokens_only(mask, out.to(torch.float64))).cpu()
        sums[layer] = total if sums[layer] is None else sums[layer] + total

    with heads.observing(observe), heads.using(None, None):
        for batch in batches:
            mask = batch.attention_mask
            tokens += int(mask.sum())
            run_forward(model, batch)
    dtype = gate_dtype(model)  # a float64 run stays float64
    mean = (_stacked(sums, layout, "") / max(tokens, 1)).to(dtype)
    refuse_non_finite_mean("head outputs", mean)
    return mean


@torch.no_grad()
def corrupt_head_outputs(model: torch.nn.Module, heads: HeadGates, batch: Batch) -> torch.Tensor:
    """Every head's output on the batch's corrupted prompts, per example and position: [L, B, T, H, D]
    in the model's dtype (the per-token baseline of ``baseline="corrupt"``; one forward-only pass).

    The corrupted sequences have the clean ones' lengths, so position t of row b lines up with the
    clean run's. Raises ValueError for a batch without corrupted prompts.
    """
    corrupted = batch.corrupted()
    outputs: list[torch.Tensor | None] = [None] * heads.layout.num_layers

    def observe(layer: int, out: torch.Tensor) -> None:
        outputs[layer] = out.detach().clone()

    with heads.observing(observe), heads.using(None, None):
        run_forward(model, corrupted)
    return _stacked(outputs, heads.layout, " on the corrupted run")
