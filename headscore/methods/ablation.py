"""Ablation ground truth: the real loss change when heads are set to their baseline.

Batched mode gives each row of one forward pass its own gate vector (the batch tiled
once per ablated head); sequential mode runs one forward pass per head, the naive
baseline that batched mode must equal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data.batching import Batch
from ..loss import example_losses
from ..patch import HeadGates

ABLATION_MODES = ("batched", "sequential")


def single_head_gates(num_layers: int, num_heads: int, value: float = 0.0) -> torch.Tensor:
    """Gate rows [L*H, L, H]: row l*H + h is all ones except ``value`` at head (l, h)."""
    n = num_layers * num_heads
    rows = torch.ones(n, n, dtype=torch.float64)
    rows.fill_diagonal_(value)
    return rows.view(n, num_layers, num_heads)


def head_set_gates(heads_to_change: list[tuple[int, int]], num_layers: int, num_heads: int,
                   value: float = 0.0) -> torch.Tensor:
    """One gate row [1, L, H]: ``value`` at every listed (layer, head), ones elsewhere."""
    row = torch.ones(1, num_layers, num_heads, dtype=torch.float64)
    for layer, head in heads_to_change:
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise ValueError(f"head ({layer}, {head}) is outside the model's {num_layers} x {num_heads} heads")
        row[0, layer, head] = value
    return row


@torch.no_grad()
def gated_losses(model: torch.nn.Module, heads: HeadGates, batch: Batch, gate_rows: torch.Tensor,
                 baseline: torch.Tensor | None = None, *, mode: str = "batched",
                 max_rows: int = 64, on_pass: Callable[[int], None] | None = None) -> torch.Tensor:
    """Loss of every example under every gate row: [K, B] for ``gate_rows`` [K, L, H].

    ``batched`` packs as many (gate row, example) pairs into one forward pass as ``max_rows``
    allows; ``sequential`` runs one forward pass of the batch per gate row. ``on_pass(n)`` is
    called after each forward pass with the number of gate rows it covered (for progress bars).
    """
    if mode not in ABLATION_MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; choose {' or '.join(ABLATION_MODES)}")
    k, b = gate_rows.shape[0], batch.size
    dtype = torch.promote_types(torch.float32, next(model.parameters()).dtype)
    gate_rows = gate_rows.to(batch.input_ids.device, dtype)
    per_pass = 1 if mode == "sequential" else max(1, max_rows // b)
    out = torch.empty(k, b, dtype=torch.float64)
    for start in range(0, k, per_pass):
        chunk = gate_rows[start:start + per_pass]
        n = chunk.shape[0]
        rows = batch.tile(n) if n > 1 else batch
        with heads.using(chunk.repeat_interleave(b, 0), baseline):
            out[start:start + n] = example_losses(model, rows).view(n, b).cpu()
        if on_pass is not None:
            on_pass(n)
    return out


@torch.no_grad()
def clean_losses(model: torch.nn.Module, heads: HeadGates, batch: Batch) -> torch.Tensor:
    """Loss of every example with all heads on: [B]."""
    with heads.using(None, None):
        return example_losses(model, batch).cpu().double()
