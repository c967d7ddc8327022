"""Reading what the report draws: values, standard errors, counts and an ablation map from duck-typed inputs."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_array(x: Any, name: str) -> np.ndarray:
    """A float64 numpy copy of a tensor / array-like."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be [tasks, layers, heads], got shape {tuple(arr.shape)}")
    return arr


def task_values(scores: Any) -> np.ndarray:
    vals = as_array(scores.values, "scores.values")
    if vals.shape[0] == 0:
        raise ValueError("scores has no tasks to report")
    if len(scores.tasks) != vals.shape[0]:
        raise ValueError(f"scores has {len(scores.tasks)} task names but {vals.shape[0]} rows of values")
    return vals


def stderr_values(scores: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    se = getattr(scores, "stderr", None)
    if se is None:
        return None
    se = as_array(se, "scores.stderr")
    if se.shape != shape:
        raise ValueError(f"scores.stderr has shape {se.shape} but values have shape {shape}")
    return se


def exact_mask(scores: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The scores' ``exact`` mask as a bool [T, L, H] array (True: an exact value, not an estimate); None when
    they have none (files made before the mask, ordinary runs, look-alikes without the attribute)."""
    mask = getattr(scores, "exact", None)
    if mask is None:
        return None
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.shape != shape or mask.dtype != np.bool_:
        raise ValueError(f"scores.exact must be a bool mask of shape {shape}, got {mask.dtype} {mask.shape}")
    return mask


def task_counts(scores: Any) -> list[int] | None:
    counts = getattr(scores, "counts", None)
    if counts is None:
        return None
    if hasattr(counts, "tolist"):
        counts = counts.tolist()
    return [int(c) for c in counts]


def ablation_values(scores: Any, ablation: Any) -> np.ndarray:
    """The ablation map as [T, L, H] in the task order of ``scores``; ValueError when they do not match."""
    vals = task_values(scores)
    abl_tasks = getattr(ablation, "tasks", None)
    attr = getattr(ablation, "values", None)  # a HeadScores; torch.Tensor.values is a method, not data
    abl = as_array(ablation if attr is None or callable(attr) else attr, "ablation values")
    if abl.shape[1:] != vals.shape[1:]:
        raise ValueError(f"ablation is {abl.shape[1]} layers x {abl.shape[2]} heads but scores are "
                         f"{vals.shape[1]} layers x {vals.shape[2]} heads")
    if abl_tasks is not None:
        abl_tasks = list(abl_tasks)
        if len(abl_tasks) != abl.shape[0]:
            raise ValueError(f"ablation has {len(abl_tasks)} task names but {abl.shape[0]} rows of values")
        tasks = list(scores.tasks)
        if abl_tasks != tasks:
            if sorted(abl_tasks) != sorted(tasks) or len(set(tasks)) != len(tasks):
                raise ValueError(f"scores and ablation have different tasks: {tasks} vs {abl_tasks}")
            abl = abl[[abl_tasks.index(t) for t in tasks]]  # same tasks in another order
    elif abl.shape[0] != vals.shape[0]:
        raise ValueError(f"ablation has {abl.shape[0]} tasks but scores have {vals.shape[0]}")
    return abl


def head_order(values: np.ndarray) -> np.ndarray:
    """Flat head indices of each task's map, most important first: along the last axis of ``values``
    ([..., L*H]), descending, NaN last, ties in index order. The one ranking the summary and the page use."""
    return np.argsort(-np.nan_to_num(values, nan=-np.inf), axis=-1, kind="stable")


def head_map_note(scores: Any, vals: np.ndarray, *, circuits: bool = False) -> str:
    """Why the report draws no head map (heatmap grid, scatter, top-k tables, the page's grid), as one line; ''
    when some head of some task has a value. A file of exact edge patching (``ablate --edges``) has edge values
    only: no head was measured, and a head's effect is no sum of its edges' separately patched effects, so no
    head map is derived from them. ``circuits``: the report draws the file's circuits (the note points to them)."""
    if np.isfinite(vals).any():
        return ""
    if getattr(scores, "edge_maps", None) is None:
        return "No head heatmap: no head of any task has a value in this file."
    return ("No head heatmap: this file holds edge values only (exact edge patching measures edges, not heads, and "
            "a head's effect is no sum of its edges' separately patched effects)"
            + ("; the circuits below are drawn from its edges." if circuits else "."))
