"""Each head's mean output (the baseline of mean ablation), from one forward-only pass."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..data.batching import Batch
from ..loss import run_forward
from ..patch import HeadGates


@torch.no_grad()
def mean_head_outputs(model: torch.nn.Module, heads: HeadGates, batches: Iterable[Batch]) -> torch.Tensor:
    """Mean of every head's output over all real (non-padding) tokens: float32 [L, H, D].

    The sums are kept in float64; memory is O(L * H * D) whatever the data size.
    """
    layout = heads.layout
    sums = torch.zeros(layout.num_layers, layout.num_heads, layout.head_dim, dtype=torch.float64)
    tokens = 0
    mask: torch.Tensor | None = None

    def observe(layer: int, out: torch.Tensor) -> None:
        sums[layer] += torch.einsum("bt,bthd->hd", mask.to(torch.float64), out.to(torch.float64)).cpu()

    with heads.observing(observe), heads.using(None, None):
        for batch in batches:
            mask = batch.attention_mask
            tokens += int(mask.sum())
            run_forward(model, batch)
    return (sums / max(tokens, 1)).to(torch.float32)
