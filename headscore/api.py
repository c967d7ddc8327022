"""The library's entry points: ``score``, ``ablate``, ``ablate_heads``, ``mean_baseline``, ``load_model``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .accumulate import TaskAccumulator
from .checkpoint import ScoringRun, fingerprint, tensor_hash
from .compare import compare
from .data.batching import num_batches
from .data.examples import Example
from .errors import HeadscoreError
from .methods.ablation import (
    check_mode,
    clean_losses,
    gated_losses,
    head_set_gates,
    prefix_reuse_works,
    single_head_gates,
)
from .methods.baseline import mean_head_outputs
from .methods.gradient import GRADIENT_METHODS, NEEDS_MEAN_BASELINE, gate_gradients, score_values
from .models import DEFAULT_MODEL, load_model
from .patch import HeadGates, head_layout, patch
from .prepared import ModelLike, Prepared, prepare
from .results import HeadScores

__all__ = ["score", "ablate", "ablate_heads", "mean_baseline", "compare", "load_model", "Prepared",
           "prepare", "METHODS", "BASELINES"]

METHODS = GRADIENT_METHODS
BASELINES = ("zero", "mean")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise HeadscoreError(f"batch size must be at least 1, got {batch_size}")


def _baseline_tensor(prep: Prepared, heads: HeadGates, baseline: str | torch.Tensor | None, batch_size: int,
                     progress: bool) -> torch.Tensor | None:
    if baseline is None or (isinstance(baseline, str) and baseline == "zero"):
        return None
    if isinstance(baseline, torch.Tensor):
        layout = heads.layout
        want = (layout.num_layers, layout.num_heads, layout.head_dim)
        if tuple(baseline.shape) != want:
            raise HeadscoreError(f"baseline must be [L, H, D] = {want}, got {tuple(baseline.shape)}")
        return baseline.to(prep.lm.device)
    if baseline == "mean":
        return mean_head_outputs(prep.lm.model, heads, prep.batches(batch_size, desc="mean outputs",
                                                                    progress=progress)).to(prep.lm.device)
    raise HeadscoreError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")


def mean_baseline(model: ModelLike = DEFAULT_MODEL, examples: Sequence[Example] | None = None, *,
                  batch_size: int = 8, max_examples: int | None = None, progress: bool = True) -> torch.Tensor:
    """Each head's mean output over the examples' tokens: [L, H, D] float32 (one forward-only pass)."""
    prep = prepare(model, examples, max_examples=max_examples)
    with patch(prep.lm.model) as heads:
        return _baseline_tensor(prep, heads, "mean", batch_size, progress).cpu()


def score(model: ModelLike = DEFAULT_MODEL, examples: Sequence[Example] | None = None, *,
          method: str = "taylor", batch_size: int = 8, max_examples: int | None = None,
          baseline: torch.Tensor | None = None, progress: bool = True, kernel: bool | None = None,
          checkpoint: str | None = None, checkpoint_every: int = 0, resume: bool = False,
          distributed: bool | None = None) -> HeadScores:
    """Score every head for every task from one forward and one backward pass per batch.

    Args:
        model: a :class:`LoadedModel` or a name for :func:`load_model`.
        examples: (prompt, target, task) examples; a batch may mix tasks. Default: built-in suite.
        method: ``taylor`` (default), ``abs``, ``fisher`` or ``atp-mean``.
        batch_size: examples per forward/backward pass.
        max_examples: at most this many examples per task.
        baseline: for ``atp-mean``, a precomputed [L, H, D] mean baseline (else one extra
            forward-only pass computes it from the same examples).
        progress: show progress bars.
        kernel: use the fused Triton attention kernel (see :func:`headscore.patch`); None = on CUDA.
        checkpoint: file for resumable runs (see :mod:`headscore.checkpoint`); written every
            ``checkpoint_every`` batches (0 = only at the end) and kept, marked complete.
        resume: continue from ``checkpoint`` if it exists (a different run's checkpoint is refused).
        distributed: score this rank's shard and all-reduce (see :mod:`headscore.distributed`);
            None = when a torch.distributed process group with 2+ ranks is initialised.

    Returns:
        HeadScores [tasks, layers, heads]: the mean over each task's examples of the method's
        per-example value, with standard errors.
    """
    if method not in GRADIENT_METHODS:
        raise HeadscoreError(f"unknown method {method!r}; choose one of {', '.join(GRADIENT_METHODS)}")
    _check_batch_size(batch_size)
    prep = prepare(model, examples, max_examples=max_examples)
    acc = prep.accumulator()
    ident = fingerprint(model=prep.lm.name, method=method, data_hash=prep.data_hash, tasks=prep.tasks,
                        batch_size=batch_size, baseline=None if baseline is None else tensor_hash(baseline))
    run = ScoringRun(acc, num_batches(len(prep.tokenized), batch_size), ident, checkpoint=checkpoint,
                     every=checkpoint_every, resume=resume, distributed=distributed)
    start = time.perf_counter()
    with patch(prep.lm.model, kernel=kernel) as heads, prep.naming_examples():
        base = None
        if method in NEEDS_MEAN_BASELINE and run.done < run.total:
            base = _baseline_tensor(prep, heads, "mean" if baseline is None else baseline, batch_size, progress)
        for batch in run.batches(prep.batches(batch_size, desc=f"score ({method})", progress=progress)):
            _, grad = gate_gradients(prep.lm.model, heads, batch, base)
            acc.add(batch.task_index, score_values(method, grad), batch.example_index)
        run.finish()
    return prep.result(acc, method, seconds=time.perf_counter() - start, batch_size=batch_size, **run.extra)


def ablate(model: ModelLike = DEFAULT_MODEL, examples: Sequence[Example] | None = None, *,
           baseline: str | torch.Tensor = "zero", mode: str = "prefix", batch_size: int = 8,
           rows_per_pass: int = 64, max_examples: int | None = None, progress: bool = True) -> HeadScores:
    """Ablate every head, one at a time, and measure each task's mean loss increase.

    Args:
        baseline: ``zero`` (gate 0), ``mean`` (the head's mean output; one extra forward-only
            pass) or an explicit [L, H, D] tensor.
        mode: ``prefix`` (default: like ``batched``, and the layers below each ablated head run
            once per batch instead of once per head, about half the cost; checked against a full
            pass on the first batch, ``batched`` where that fails), ``batched`` (rows of one
            forward pass carry different gate vectors, up to ``rows_per_pass`` rows) or ``naive``
            (alias ``sequential``: one forward pass per head). All give the same numbers.

    Returns:
        HeadScores whose value at (task, l, h) is the mean over the task's examples of
        loss(head l, h ablated) - loss(clean); method ``ablation-zero`` or ``ablation-mean``;
        ``extra["mode"]`` is the mode that ran; ``example_values`` each example's own changes.
    """
    try:
        mode = check_mode(mode)
    except ValueError as exc:
        raise HeadscoreError(str(exc)) from None
    _check_batch_size(batch_size)
    prep = prepare(model, examples, max_examples=max_examples)
    acc = prep.accumulator()
    layout = head_layout(prep.lm.model)
    rows = single_head_gates(layout.num_layers, layout.num_heads)
    start = time.perf_counter()
    # one forward pass covers a few heads: count (example, head) ablations, not batches
    bar = tqdm(total=len(prep.examples) * rows.shape[0], desc=f"ablate ({mode})", unit="ablation",
               disable=not progress, leave=False)
    with patch(prep.lm.model) as heads, bar, prep.naming_examples():
        base = _baseline_tensor(prep, heads, baseline, batch_size, progress)
        for i, batch in enumerate(prep.batches(batch_size, progress=False)):
            if i == 0 and mode == "prefix" and not prefix_reuse_works(prep.lm.model, heads, batch, base):
                mode = "batched"
            clean = clean_losses(prep.lm.model, heads, batch)
            ablated = gated_losses(prep.lm.model, heads, batch, rows, base, mode=mode, max_rows=rows_per_pass,
                                   on_pass=lambda n, size=batch.size: bar.update(n * size))
            delta = (ablated - clean[None]).T.reshape(batch.size, layout.num_layers, layout.num_heads)
            acc.add(batch.task_index, delta, batch.example_index)
    name = baseline if isinstance(baseline, str) else "custom"
    return prep.result(acc, f"ablation-{name}", seconds=time.perf_counter() - start, mode=mode,
                       batch_size=batch_size)


@dataclass(frozen=True)
class SetEffect:
    """Effect of changing a set of heads on one task: mean loss change and its standard error."""

    delta: float
    stderr: float
    clean_loss: float
    count: int


def ablate_heads(model: ModelLike, examples: Sequence[Example] | None, heads_to_change: Sequence[tuple[int, int]],
                 *, baseline: str | torch.Tensor = "zero", gate: float = 0.0, batch_size: int = 8,
                 max_examples: int | None = None, progress: bool = True) -> dict[str, SetEffect]:
    """Set all listed (layer, head) gates to ``gate`` at once (0 = ablate, >1 = amplify).

    Returns, per task, the mean loss change over its examples against the unmodified model.
    """
    _check_batch_size(batch_size)
    prep = prepare(model, examples, max_examples=max_examples)
    layout = head_layout(prep.lm.model)
    try:
        row = head_set_gates(list(heads_to_change), layout.num_layers, layout.num_heads, gate)
    except ValueError as exc:
        raise HeadscoreError(str(exc)) from None
    delta_acc = TaskAccumulator(prep.tasks, 1, 1)
    clean_acc = TaskAccumulator(prep.tasks, 1, 1)
    with patch(prep.lm.model) as heads, prep.naming_examples():
        base = _baseline_tensor(prep, heads, baseline, batch_size, progress)
        for batch in prep.batches(batch_size, desc="ablate set", progress=progress):
            clean = clean_losses(prep.lm.model, heads, batch)
            changed = gated_losses(prep.lm.model, heads, batch, row, base, mode="naive")[0]
            delta_acc.add(batch.task_index, (changed - clean).view(-1, 1, 1))
            clean_acc.add(batch.task_index, clean.view(-1, 1, 1))
    return {t: SetEffect(float(delta_acc.mean[i]), float(delta_acc.stderr[i]), float(clean_acc.mean[i]),
                         int(delta_acc.count[i])) for i, t in enumerate(prep.tasks)}
