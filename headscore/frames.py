"""``HeadScores`` as pandas DataFrames in long form (one row per task, layer and head; per position; per example)
and back: the work of :meth:`HeadScores.to_pandas` and :meth:`HeadScores.from_pandas`.

pandas is optional (the ``notebook`` extra): without it these raise a one-line HeadscoreError saying what to
install. This module knows tensors and frames, not ``HeadScores`` (which imports it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import HeadscoreError

KINDS = ("heads", "positions", "examples")
"""The frames :meth:`HeadScores.to_pandas` makes."""
INSTALL_HINT = "pip install 'headscore[notebook]'"


def require_pandas(what: str) -> Any:
    """The pandas module; HeadscoreError ``"<what> needs pandas: pip install 'headscore[notebook]'"`` without it."""
    try:
        import pandas
    except ImportError:
        raise HeadscoreError(f"{what} needs pandas: {INSTALL_HINT}") from None
    return pandas


def rank_order(values: torch.Tensor) -> torch.Tensor:
    """The indices that order ``values`` along its last axis from the largest down: ties in index order, NaN (a
    head its layer does not have) last, after -inf. The one order of :meth:`HeadScores.top_k`, the frames'
    ``rank`` and top-k overlaps."""
    return torch.argsort(torch.nan_to_num(values.double(), nan=-torch.inf), dim=-1, descending=True, stable=True)


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last axis of ``values`` (int64, 1 = largest), ties in index order and NaN
    last: the order of :meth:`HeadScores.top_k` and the report (``rank == 1`` is ``top_k(1, task)``)."""
    order = rank_order(values)
    out = torch.empty_like(order)
    out.scatter_(-1, order, torch.arange(1, values.shape[-1] + 1).expand_as(order).contiguous())
    return out


def _grid_columns(tasks: Sequence[str], num_layers: int, num_heads: int, repeat: int = 1) -> dict[str, np.ndarray]:
    """task, layer, head of every cell of [T, L, H] in row-major order, each cell ``repeat`` times in a row."""
    cells = num_layers * num_heads
    return {"task": np.repeat(np.asarray(list(tasks), dtype=object), cells * repeat),
            "layer": np.tile(np.repeat(np.arange(num_layers, dtype=np.int64), num_heads * repeat), len(tasks)),
            "head": np.tile(np.repeat(np.arange(num_heads, dtype=np.int64), repeat), len(tasks) * num_layers)}


def heads_frame(values: torch.Tensor, stderr: torch.Tensor, counts: torch.Tensor, tasks: Sequence[str],
                exact: torch.Tensor | None) -> Any:
    """One row per (task, layer, head): task, layer, head, score, stderr, count, rank (within the task, 1 =
    largest), and exact (bool) when a mask is given."""
    pd = require_pandas("to_pandas")
    t, num_layers, num_heads = values.shape
    cols: dict[str, Any] = _grid_columns(tasks, num_layers, num_heads)
    cols["score"] = values.double().reshape(-1).numpy()
    cols["stderr"] = stderr.double().reshape(-1).numpy()
    cols["count"] = np.repeat(counts.numpy().astype(np.int64), num_layers * num_heads)
    cols["rank"] = ranks(values.reshape(t, -1)).reshape(-1).numpy()
    if exact is not None:
        cols["exact"] = exact.reshape(-1).numpy()
    return pd.DataFrame(cols)


def positions_frame(values: torch.Tensor, stderr: torch.Tensor, counts: torch.Tensor, tasks: Sequence[str],
                    positions: Sequence[str]) -> Any:
    """One row per (task, layer, head, position) of [T, L, H, P] maps: task, layer, head, position, score,
    stderr, count (the task's examples with a token there), rank (within the task and position, 1 = largest)."""
    pd = require_pandas("to_pandas")
    t, num_layers, num_heads, p = values.shape
    cols: dict[str, Any] = _grid_columns(tasks, num_layers, num_heads, repeat=p)
    cols["position"] = np.tile(np.asarray(list(positions), dtype=object), t * num_layers * num_heads)
    cols["score"] = values.double().reshape(-1).numpy()
    cols["stderr"] = stderr.double().reshape(-1).numpy()
    cols["count"] = counts.to(torch.int64)[:, None, None, :].expand(t, num_layers, num_heads, p).reshape(-1).numpy()
    by_position = values.permute(0, 3, 1, 2).reshape(t, p, -1)  # rank the heads at each position
    cols["rank"] = ranks(by_position).reshape(t, p, num_layers, num_heads).permute(0, 2, 3, 1).reshape(-1).numpy()
    return pd.DataFrame(cols)


def examples_frame(values: torch.Tensor, example_tasks: torch.Tensor, tasks: Sequence[str]) -> Any:
    """One row per (kept example, layer, head) of [N, L, H] values: example (its index among the kept
    examples), task, layer, head, score, rank (within the example, 1 = largest)."""
    pd = require_pandas("to_pandas")
    n, num_layers, num_heads = values.shape
    cells = num_layers * num_heads
    names = np.asarray(list(tasks), dtype=object)[example_tasks.numpy().astype(np.int64)] if n else \
        np.asarray([], dtype=object)
    return pd.DataFrame({
        "example": np.repeat(np.arange(n, dtype=np.int64), cells),
        "task": np.repeat(names, cells),
        "layer": np.tile(np.repeat(np.arange(num_layers, dtype=np.int64), num_heads), n),
        "head": np.tile(np.arange(num_heads, dtype=np.int64), n * num_layers),
        "score": values.double().reshape(-1).numpy(),
        "rank": ranks(values.reshape(n, -1)).reshape(-1).numpy()})


def heads_from_frame(df: Any) -> dict[str, Any]:
    """The fields of a HeadScores (values, stderr, counts, tasks, exact) from a frame of :func:`heads_frame`'s
    form: columns task, layer, head, score; optionally stderr (else NaN), count (one per task; else 0) and exact.
    Tasks keep their order of first appearance; every (task, layer, head) needs exactly one row."""
    pd = require_pandas("from_pandas")
    if not isinstance(df, pd.DataFrame):
        raise HeadscoreError(f"from_pandas needs a pandas DataFrame, got {type(df).__name__}")
    for other, kind in (("position", "positions"), ("example", "examples")):
        if other in df.columns:
            raise HeadscoreError(f"from_pandas reads a frame of to_pandas('heads'); this one has a column "
                                 f"{other!r} (a frame of to_pandas({kind!r}))")
    missing = [c for c in ("task", "layer", "head", "score") if c not in df.columns]
    if missing:
        raise HeadscoreError(f"from_pandas: the frame has no column {', '.join(map(repr, missing))}; its columns "
                             f"are {', '.join(map(str, df.columns))}")
    task_cells = df["task"].tolist()
    bad = next((x for x in task_cells if not isinstance(x, str)), None)
    if bad is not None or not task_cells:
        raise HeadscoreError("from_pandas: the frame has no rows" if not task_cells else
                             f"from_pandas: column 'task' must hold strings, got {type(bad).__name__} {bad!r:.40}")
    tasks = list(dict.fromkeys(task_cells))
    row_of = {name: i for i, name in enumerate(tasks)}
    task_idx = np.fromiter((row_of[x] for x in task_cells), dtype=np.int64, count=len(task_cells))
    layer, head = (_index_column(df, c) for c in ("layer", "head"))
    t, num_layers, num_heads = len(tasks), int(layer.max()) + 1, int(head.max()) + 1
    flat = (task_idx * num_layers + layer) * num_heads + head
    seen = np.bincount(flat, minlength=t * num_layers * num_heads)
    if (seen != 1).any():
        i = int(np.argmax(seen != 1))
        what = "no row" if seen[i] == 0 else f"{seen[i]} rows"
        raise HeadscoreError(f"from_pandas: task {tasks[i // (num_layers * num_heads)]!r} has {what} for layer "
                             f"{i // num_heads % num_layers}, head {i % num_heads}; every head needs one row")
    order = np.argsort(flat, kind="stable")
    shape = (t, num_layers, num_heads)
    values = torch.from_numpy(_float_column(df, "score")[order].copy()).reshape(shape)
    stderr = torch.from_numpy(_float_column(df, "stderr")[order].copy()).reshape(shape) if "stderr" in df.columns \
        else torch.full(shape, float("nan"), dtype=torch.float64)
    counts = torch.zeros(t, dtype=torch.int64)
    if "count" in df.columns:
        count = _index_column(df, "count")
        for row, name in enumerate(tasks):
            found = np.unique(count[task_idx == row])
            if len(found) != 1:
                raise HeadscoreError(f"from_pandas: task {name!r} has counts {', '.join(map(str, found))}; "
                                     "column 'count' holds one number per task")
            counts[row] = int(found[0])
    exact = None
    if "exact" in df.columns:
        col = df["exact"]
        if col.isna().any() or not pd.api.types.is_bool_dtype(col):
            raise HeadscoreError(f"from_pandas: column 'exact' must hold True or False in every row, got {col.dtype}")
        exact = torch.from_numpy(col.to_numpy(dtype=bool)[order].copy()).reshape(shape)
    return {"values": values, "stderr": stderr, "counts": counts, "tasks": tasks, "exact": exact}


def _index_column(df: Any, name: str) -> np.ndarray:
    """A column of whole numbers >= 0 as int64; HeadscoreError naming the column otherwise."""
    pd = require_pandas("from_pandas")
    col = df[name]
    if col.isna().any() or not pd.api.types.is_integer_dtype(col) or (len(col) and int(col.min()) < 0):
        raise HeadscoreError(f"from_pandas: column {name!r} must hold whole numbers >= 0 in every row, got "
                             f"{col.dtype}")
    return col.to_numpy(dtype=np.int64)


def _float_column(df: Any, name: str) -> np.ndarray:
    pd = require_pandas("from_pandas")
    col = df[name]
    if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        raise HeadscoreError(f"from_pandas: column {name!r} must hold numbers, got {col.dtype}")
    return col.to_numpy(dtype=np.float64, na_value=np.nan)
