"""The library's entry points: ``score``, ``ablate``, ``ablate_heads``, ``mean_baseline``, ``load_model``."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import TYPE_CHECKING, TypeAlias

import torch
from tqdm.auto import tqdm

from .accumulate import TaskAccumulator
from .checkpoint import ScoringRun, callable_identity, fingerprint, model_identity, repr_hash, tensor_hash
from .compare import compare
from .data.batching import batch_cells, num_batches
from .data.examples import Example
from .edges.ablation import edges_by_name, exact_edge_scores, top_edges
from .edges.circuit import SELECTIONS
from .edges.faithfulness import Circuit, find_circuits
from .edges.residual import residual_model
from .edges.scoring import edge_baseline, score_edges
from .errors import HeadscoreError, UnsupportedModelError
from .loss import METRICS, Metric, MetricFn, resolve_metric
from .methods.ablation import (
    check_mode,
    clean_losses,
    gated_losses,
    head_set_gates,
    prefix_reuse_works,
    single_head_gates,
)
from .methods.baseline import corrupt_head_outputs, mean_head_outputs
from .methods.gradient import (
    DEFAULT_IG_FRACTION,
    DEFAULT_IG_STEPS,
    GRADIENT_METHODS,
    NEEDS_MEAN_BASELINE,
    curvature_estimates,
    gate_gradients,
    gradient_passes,
    integrated_gradients,
    score_values,
)
from .methods.position_patching import position_deltas, position_patching_works
from .methods.verify import (
    KeptBaselines,
    MassCollector,
    check_verify,
    choose_heads,
    exact_changes,
    first_order_mass,
    verify_count,
    with_exact,
)
from .models import DEFAULT_MODEL, load_model
from .patch import HeadGates, head_layout, patch
from .positions import PositionMaps
from .prepared import ModelLike, Prepared, mixed_head_layers, prepare
from .results import HeadScores
from .text import printable

if TYPE_CHECKING:  # optional dependencies: a table of examples is one of these
    import datasets
    import pandas

ExamplesLike: TypeAlias = "Sequence[Example] | pandas.DataFrame | datasets.Dataset | None"
"""What the entry points take as examples: Examples, a table with one example per row (see ``columns``), or
None for the built-in suite."""

__all__ = ["score", "ablate", "ablate_heads", "mean_baseline", "compare", "load_model", "Prepared",
           "prepare", "METHODS", "BASELINES"]

METHODS = GRADIENT_METHODS
BASELINES = ("zero", "mean", "corrupt")
"""Baselines by name: zero ablation, the head's mean output, its output on the corrupted prompt."""

MetricLike = str | Metric | MetricFn | None


def _begin(model: ModelLike, examples: ExamplesLike, *, max_examples: int | None, batch_size: int,
           metric: MetricLike, baseline: str | torch.Tensor | None,
           columns: Mapping[str, str] | None = None, rows_per_pass: int | None = None) -> tuple[Prepared, Metric]:
    """Every entry point's prologue: refuse an unknown baseline name or a batch size (or ``rows_per_pass``,
    where the entry point takes one) below 1, resolve the metric, prepare the model and examples (which
    refuses unseparable heads) and refuse a metric or baseline the examples cannot serve, all before any
    scoring work."""
    if isinstance(baseline, str) and baseline not in BASELINES:
        raise HeadscoreError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    for name, value in (("batch size", batch_size), ("rows_per_pass", rows_per_pass)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 1):
            raise HeadscoreError(f"{name} must be a whole number of at least 1, got {value!r}")
    metric = resolve_metric(metric)
    prep = prepare(model, examples, max_examples=max_examples, columns=columns)
    _check_inputs(prep, metric, baseline)
    return prep, metric


def _check_inputs(prep: Prepared, metric: Metric, baseline: str | torch.Tensor | None) -> None:
    """Refuse a metric or baseline the examples (or the model) cannot serve, naming the first example that lacks
    it."""
    name = _baseline_name(baseline)
    if name != "zero":
        mixed = mixed_head_layers(prep.lm.model)
        if mixed:
            shown = ", ".join(map(str, mixed[:8])) + (", ..." if len(mixed) > 8 else "")
            raise UnsupportedModelError(
                f"{type(prep.lm.model).__name__} mixes the head outputs of layer(s) {shown} before the output "
                f"projection (a transform linear in them, not one scale per head); baseline {name!r} cannot "
                "replace one head's part of what the projection sees there: use the zero baseline (the gradients "
                "and zero ablation are exact on this model)")
    if prep.labelled:
        if metric.name != "nll" or metric.fn is not None:
            raise HeadscoreError(f"a sequence classifier is scored on its own loss from the labels; metric "
                                 f"{metric.name!r} is for a causal LM's target tokens")
        if isinstance(baseline, str) and baseline == "corrupt":
            raise HeadscoreError("baseline 'corrupt' needs prompt/target examples with a corrupted prompt; "
                                 "labelled examples have none")
    _warn_blank_first_tokens(prep, metric)
    needs = [("foil", "the logit-diff metric")] if metric.needs_foil else []
    if isinstance(baseline, str) and baseline == "corrupt":
        needs.append(("corrupt", "baseline 'corrupt'"))
    for name, what in needs:
        for i, ex in enumerate(prep.examples):
            if getattr(ex, name) is None:
                raise HeadscoreError(f"{what} needs a {name!r} field in every example; {ex.describe(i)} has none")


def _warn_blank_first_tokens(prep: Prepared, metric: Metric) -> None:
    """Warn, per task, where a metric that reads only the target's first token (prob, logit-diff) reads a token
    that is whitespace alone (SmolLM2 splits ' 4' into ' ' + '4': prob then measures p(' '), alike for every
    number)."""
    decode = getattr(prep.lm.tokenizer, "decode", None)
    if metric.fn is not None or metric.name not in ("prob", "logit-diff") or prep.labelled or decode is None:
        return
    blank: dict[int, list[int]] = {}
    for item in prep.tokenized:
        first = item.ids[item.prompt_length]
        if not decode([first]).strip():
            blank.setdefault(item.task_index, []).append(item.index)
    totals = Counter(item.task_index for item in prep.tokenized)
    for task, rows in blank.items():
        example = prep.examples[rows[0]]
        warnings.warn(f"metric {metric.name} reads the target's first token only, and it is whitespace alone for "
                      f"{len(rows)} of {totals[task]} example(s) of task {printable(prep.tasks[task])!r} (such as "
                      f"{example.describe(rows[0])}: target {printable(example.target)!r}); end the prompt with the "
                      "space and start the target without it, or use the nll metric", stacklevel=5)


LABEL_LOSS_MEANING = "increase in the classifier's own loss on the label (cross-entropy in nats; squared error " \
    "for a regression head)"


def _meaning(prep: Prepared, metric: Metric) -> str:
    """What a positive score means: the metric's meaning, or the classifier's loss for labelled examples."""
    return LABEL_LOSS_MEANING if prep.labelled else metric.describe()


def _baseline_name(baseline: str | torch.Tensor | None) -> str:
    return "zero" if baseline is None else baseline if isinstance(baseline, str) else "custom"


def _batch_baseline(model: torch.nn.Module, heads: HeadGates, batch, static: torch.Tensor | None,
                    corrupt: bool) -> torch.Tensor | None:
    """The baseline for one batch: the heads' outputs on its corrupted prompts, or the run's fixed one."""
    return corrupt_head_outputs(model, heads, batch) if corrupt else static


def _baseline_tensor(prep: Prepared, heads: HeadGates, baseline: str | torch.Tensor | None, batch_size: int,
                     progress: bool) -> torch.Tensor | None:
    """The run's fixed [L, H, D] baseline (None for zero, and for ``corrupt``, which is made per batch)."""
    if baseline is None or (isinstance(baseline, str) and baseline in ("zero", "corrupt")):
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


def mean_baseline(model: ModelLike = DEFAULT_MODEL, examples: ExamplesLike = None, *,
                  batch_size: int = 8, max_examples: int | None = None, progress: bool = True,
                  columns: Mapping[str, str] | None = None) -> torch.Tensor:
    """Each head's mean output over the examples' real tokens (all tasks together, each token weighted alike):
    [L, H, D], float32 (float64 for a float64 model; one forward-only pass); ``examples`` and ``columns`` as
    in :func:`score`."""
    prep, _ = _begin(model, examples, max_examples=max_examples, batch_size=batch_size, metric="nll",
                     baseline="mean", columns=columns)
    with patch(prep.lm.model) as heads:
        return _baseline_tensor(prep, heads, "mean", batch_size, progress).cpu()


def _gradient_method_name(method: str, baseline: str | torch.Tensor | None) -> str:
    """What a gradient score is called: ``taylor`` against zero, ``atp-mean``/``atp-corrupt`` for taylor
    against the mean or the corrupted run, ``abs-corrupt`` etc. for the others."""
    name = "mean" if method in NEEDS_MEAN_BASELINE and baseline is None else _baseline_name(baseline)
    if name == "zero":
        return method
    return f"atp-{name}" if method in ("taylor", "atp-mean") else f"{method}-{name}"


def _position_maps(prep: Prepared, metric: Metric) -> PositionMaps:
    """The run's per-position maps; the last token is a position under a user's metric (it may read its logits)."""
    if prep.labelled:
        raise HeadscoreError("per-position scores are for a causal LM's prompts; a sequence classifier's labelled "
                             "examples have no answer position")
    return PositionMaps(prep.tokenized, prep.tasks, head_layout(prep.lm.model), last=metric.fn is not None)


def score(model: ModelLike = DEFAULT_MODEL, examples: ExamplesLike = None, *,
          method: str = "taylor", batch_size: int = 8, max_examples: int | None = None,
          baseline: str | torch.Tensor | None = None, metric: MetricLike = "nll", per_position: bool = False,
          progress: bool = True, kernel: bool | None = None,
          checkpoint: str | None = None, checkpoint_every: int = 0, resume: bool = False,
          distributed: bool | None = None, steps: int = DEFAULT_IG_STEPS, path_fraction: float | None = None,
          verify: int | bool | None = None, rows_per_pass: int = 64,
          columns: Mapping[str, str] | None = None, edges: bool = False) -> HeadScores:
    """Score every head for every task from one forward and one backward pass per batch.

    Args:
        model: a :class:`LoadedModel` or a name for :func:`load_model`.
        examples: (prompt, target, task) examples; a batch may mix tasks. Default: built-in suite. Or a table,
            a pandas DataFrame or a ``datasets.Dataset`` with one example per row (see ``columns``).
        method: ``taylor`` (default), ``abs``, ``fisher``, ``atp-mean``, ``ig`` (integrated gradients along
            the gate path, ``steps`` passes) or ``curvature`` (taylor plus a Hutchinson estimate of the
            second-order term, 2 passes); docs/fidelity.md says which to pick.
        batch_size: examples per forward/backward pass.
        max_examples: at most this many examples per task.
        baseline: the value a head is compared against: ``zero`` (default; ``mean`` for
            ``atp-mean``), ``mean`` (its mean output, one extra forward-only pass), ``corrupt``
            (its output on each example's corrupted prompt, per position, one extra forward-only
            pass per batch: with ``taylor`` this is attribution patching, AtP), or a precomputed
            [L, H, D] tensor. The result's method says which (``atp-mean``, ``atp-corrupt``, ...).
        metric: what the loss is (:mod:`headscore.loss`): ``nll`` (default), ``logit-diff`` (needs a
            foil per example), ``prob``, or a callable ``metric(logits [B, T, V], batch) -> [B]``
            taken as a loss (or a :class:`headscore.loss.Metric`). For every metric larger = the head
            matters more (taylor estimates the metric's loss increase when the head is changed).
        per_position: also keep each token's term of the gate gradient: ``positions`` and
            ``position_values`` [T, L, H, P] in the result, positions aligned from the end of each
            prompt (:mod:`headscore.positions`). Not with ``checkpoint``, nor distributed.
        progress: show progress bars.
        kernel: use the fused Triton attention kernel (see :func:`headscore.patch`); None = on CUDA.
        checkpoint: file for resumable runs (see :mod:`headscore.checkpoint`); written every
            ``checkpoint_every`` batches (0 = only at the end), when the run stops early (an exception,
            Ctrl-C: the batches finished before it), and kept, marked complete.
        resume: continue from ``checkpoint`` if it exists (a different run's checkpoint is refused).
        distributed: score this rank's shard and all-reduce (see :mod:`headscore.distributed`; every rank
            passes all the examples, in the same order: headscore shards them by batch);
            None = when a torch.distributed process group with 2+ ranks is initialised.
        steps: ``ig``'s points along the path (forward + backward passes per batch).
        path_fraction: ``ig``'s path runs from every gate at 1 to every gate at 1 - ``path_fraction``
            (1 = the whole way to the baseline; default 0.2, the best measured). With ``edges``, the input
            moves from the clean prompt's embeddings the share ``path_fraction`` of the way to the corrupted
            one's (default 1: EAP-IG-inputs as published).
        verify: after scoring, measure exactly (ablation, or activation patching with ``corrupt``) the
            ``verify`` heads per task with the largest |estimate| and as many flagged ones (see
            :mod:`headscore.methods.verify`); ``True`` = 5% of the heads. Their values replace the estimates
            and the result's ``exact`` mask marks them. Not with ``abs``/``fisher`` (no exact counterpart),
            checkpoints or distributed runs.
        rows_per_pass: with ``verify``, gate rows per forward pass of the exact measurements.
        edges: also score every edge between nodes of the residual stream (embeddings, heads, MLPs -> each
            query head, key/value head, MLP, the logits) from the same pass: ``scores.edges(task)``,
            ``scores.edge_nodes`` (:mod:`headscore.edges`). Method taylor (or atp-mean), baseline zero, mean
            or corrupt; or method ig with baseline corrupt: EAP-IG-inputs, the gradients averaged over
            ``steps`` inputs between the corrupted and the clean prompt (``path_fraction``). Not per position,
            verified, checkpointed or distributed.
        columns: for a table: its columns of fields named otherwise, e.g. ``{"prompt": "question", "target":
            "answer", "task": "category"}`` (:func:`headscore.data.tables.examples_from_table`).

    Returns:
        HeadScores [tasks, layers, heads]: the mean over each task's examples of the method's
        per-example value, with standard errors.
    """
    if method not in GRADIENT_METHODS:
        raise HeadscoreError(f"unknown method {method!r}; choose one of {', '.join(GRADIENT_METHODS)}")
    if method in NEEDS_MEAN_BASELINE and isinstance(baseline, str) and baseline != "mean":
        raise HeadscoreError(f"method {method} uses the mean baseline; for baseline {baseline!r} use taylor")
    _check_estimator(method, steps, path_fraction, per_position, verify, checkpoint, distributed)
    if path_fraction is None:  # the gate path's best measured share; the input path's published whole segment
        path_fraction = 1.0 if edges else DEFAULT_IG_FRACTION
    if edges:
        _check_edges(method, per_position, verify, checkpoint, distributed)
        writers = edge_baseline(baseline, method)
        if method == "ig" and writers != "corrupt":
            raise HeadscoreError("edges with method ig interpolate the input between the corrupted and the clean "
                                 "prompt (EAP-IG-inputs): use baseline corrupt")
    implied = "mean" if baseline is None and method in NEEDS_MEAN_BASELINE else baseline  # atp-mean's own
    prep, metric = _begin(model, examples, max_examples=max_examples, batch_size=batch_size, metric=metric,
                          baseline=implied, columns=columns, rows_per_pass=rows_per_pass)
    layout = head_layout(prep.lm.model)
    top = None if verify is None or verify is False else verify_count(verify, layout.real_heads)
    if per_position and checkpoint is not None:
        raise HeadscoreError("per-position scores are not checkpointed; drop the checkpoint or per_position")
    name = _gradient_method_name(method, baseline)
    if edges:
        return score_edges(prep, name="ig-inputs-corrupt" if method == "ig" else name, baseline=writers,
                           metric=metric, meaning=_meaning(prep, metric), batch_size=batch_size, progress=progress,
                           steps=steps if method == "ig" else None, fraction=path_fraction)
    acc = prep.accumulator()
    ident = {}
    if checkpoint is not None:  # what the model is (not its name), how it runs, and what the run computes
        from .kernels.dispatch import kernel_available  # imports triton, as patch() does below

        ident = _run_identity(prep, layout, batch_size, implied, metric, method=method,
                              kernel=bool(kernel) if kernel is not None else kernel_available(prep.lm.device),
                              **({"steps": steps, "path_fraction": path_fraction} if method == "ig" else {}))
    run = ScoringRun(acc, num_batches(len(prep.tokenized), batch_size), ident, checkpoint=checkpoint,
                     every=checkpoint_every, resume=resume, distributed=distributed,
                     data=f"{prep.data_hash}|{batch_size}")
    if per_position and run.world > 1:
        raise HeadscoreError("per-position scores are not reduced across processes; run them in one process")
    if top is not None and run.world > 1:  # each rank would pick its own heads from its own share of the data
        raise HeadscoreError(f"verify runs in one process, but a process group of {run.world} ranks is "
                             "initialised; pass distributed=False (every rank scores all the examples) or drop verify")
    maps = _position_maps(prep, metric) if per_position else None
    mass = None if top is None else TaskAccumulator(prep.tasks, layout.num_layers, layout.num_heads)
    kept = KeptBaselines() if mass is not None else None  # the corrupted runs, for verify's exact passes
    start = time.perf_counter()
    with patch(prep.lm.model, kernel=kernel) as heads, prep.naming_examples():
        static = None
        if run.done < run.total:
            wanted = "mean" if baseline is None and method in NEEDS_MEAN_BASELINE else baseline
            static = _baseline_tensor(prep, heads, wanted, batch_size, progress)
        # taylor's own backward pass gives the first-order mass (gates at 1); other estimators need a pass of it
        same_pass = mass is not None and method in ("taylor", "atp-mean")
        with run.saving_on_exit():  # an interrupt or error keeps the batches done in the checkpoint
            for batch in run.batches(prep.batches(batch_size, desc=f"score ({name})", progress=progress)):
                base = _batch_baseline(prep.lm.model, heads, batch, static, baseline == "corrupt")
                if kept is not None:
                    kept.keep(batch, base)
                collector = MassCollector(batch.size, layout.num_layers, layout.num_heads) if same_pass else None
                with contextlib.nullcontext() if collector is None else heads.observing_gradients(collector):
                    values, position_values = _estimate(prep.lm.model, heads, batch, base, method, metric,
                                                        per_position, steps, path_fraction)
                if maps is not None:
                    maps.add(batch, position_values)
                if collector is not None:
                    mass.add(batch.task_index, collector.values)
                elif mass is not None:
                    _, position_values = gate_gradients(prep.lm.model, heads, batch, base, metric=metric,
                                                        per_position=True)
                    mass.add(batch.task_index, first_order_mass(position_values))
                acc.add(batch.task_index, values, batch.example_index)
        run.finish()
        seconds = time.perf_counter() - start
        extra = dict(run.extra, passes_per_batch=gradient_passes(method, steps) + (mass is not None and not same_pass))
        if method == "ig":
            extra.update(steps=steps, path_fraction=path_fraction)
        result = prep.result(acc, name, seconds=seconds, batch_size=batch_size,
                             metric=metric.name, metric_meaning=_meaning(prep, metric),
                             baseline=_baseline_name(baseline if name != "atp-mean" else "mean"), **extra)
        if mass is not None:
            result = _verified(prep, heads, result, mass, top, static, baseline == "corrupt", metric,
                               batch_size, rows_per_pass, progress, kept)
    return result if maps is None else maps.attach(result)


def _run_identity(prep: Prepared, layout, batch_size: int, baseline: str | torch.Tensor | None, metric: Metric,
                  **fields) -> dict[str, str]:
    """A checkpoint's fingerprint of a run: what the model is (not its name), its head layout, the data and
    tokens, the batches, the baseline (by name, ``zero`` for none; a tensor by its hash), the metric (a callable
    by :func:`headscore.checkpoint.callable_identity`) and ``fields`` (the method, its settings)."""
    return fingerprint(
        data_hash=prep.data_hash, tasks=prep.tasks, batch_size=batch_size,
        tokens=repr_hash((prep.lm.pad_id, prep.tokenized)), **model_identity(prep.lm.model),
        heads_per_layer=[layout.heads_of(i) for i in range(layout.num_layers)],
        baseline=tensor_hash(baseline) if isinstance(baseline, torch.Tensor) else _baseline_name(baseline),
        metric=metric.name if metric.fn is None else [metric.name, callable_identity(metric.fn),
                                                      metric.higher_is_better], **fields)


def _check_estimator(method: str, steps: int, path_fraction: float | None, per_position: bool,
                     verify: int | bool | None, checkpoint: str | None, distributed: bool | None) -> None:
    """Refuse settings an estimator cannot take, before any model work."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise HeadscoreError(f"steps must be a whole number of at least 1, got {steps!r}")
    if path_fraction is not None and not (isinstance(path_fraction, (int, float)) and 0 < path_fraction <= 1):
        raise HeadscoreError(f"path_fraction must be in (0, 1], got {path_fraction!r}")
    if method == "curvature" and per_position:
        raise HeadscoreError("curvature estimates a whole head's second-order term; it has no per-position maps "
                             "(use taylor or ig for per_position)")
    if method in ("abs", "fisher") and per_position:  # |sum_t g_t| is no sum of per-token |g_t|
        raise HeadscoreError(f"{method} of a head is not the sum of its tokens' terms, so it has no per-position "
                             "maps (use taylor or ig for per_position)")
    if verify is None or verify is False:
        return
    check_verify(verify)
    if per_position:
        raise HeadscoreError("verify replaces heads' values by exact ones, whose per-position maps would stay "
                             "estimates: drop verify or per_position (ablate --per-position patches each position "
                             "exactly)")
    if method in ("abs", "fisher"):
        raise HeadscoreError(f"verify replaces estimates by exact ablation values; {method} scores have no exact "
                             "counterpart (use taylor, ig, curvature or atp-mean)")
    if checkpoint is not None or distributed:
        raise HeadscoreError("verify runs in one process without checkpoints; drop --checkpoint/--distributed")


def _check_edges(method: str, per_position: bool, verify: int | bool | None, checkpoint: str | None,
                 distributed: bool | None) -> None:
    """Refuse what an edge run cannot take, before any model work."""
    if method not in ("taylor", "atp-mean", "ig"):
        raise HeadscoreError(f"edges are scored with taylor (attribution patching), atp-mean or ig (EAP-IG-inputs), "
                             f"not {method}")
    refused = [what for what, on in (("per_position", per_position), ("verify", verify not in (None, False)),
                                     ("checkpoint", checkpoint is not None), ("distributed", bool(distributed)))
               if on]
    if refused:
        raise HeadscoreError(f"edges are scored in one process, whole heads, estimated: drop {', '.join(refused)}")


def _estimate(model: torch.nn.Module, heads: HeadGates, batch, base: torch.Tensor | None, method: str,
              metric: Metric, per_position: bool, steps: int, fraction: float
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch's per-example values [B, L, H] under ``method`` (and per position [B, L, T, H] if asked)."""
    if method == "curvature":
        return curvature_estimates(model, heads, batch, base, metric=metric)[2], None
    if method == "ig":
        _, grad = integrated_gradients(model, heads, batch, base, metric=metric, per_position=per_position,
                                       steps=steps, fraction=fraction)
    else:
        _, grad = gate_gradients(model, heads, batch, base, metric=metric, per_position=per_position)
    if not per_position:
        return score_values(method, grad), None
    return score_values(method, grad.sum(2)), score_values(method, grad)


def _verified(prep: Prepared, heads: HeadGates, result: HeadScores, mass: TaskAccumulator,
              k: int, static: torch.Tensor | None, corrupt: bool, metric: Metric, batch_size: int,
              rows_per_pass: int, progress: bool, kept: KeptBaselines) -> HeadScores:
    """``result`` with each task's top ``k`` and as many flagged heads measured exactly (see
    :mod:`headscore.methods.verify`); ``kept`` has the scoring pass's corrupted runs."""
    chosen, flagged = {}, {}
    for t in range(len(prep.tasks)):
        if int(result.counts[t]) == 0:
            continue
        top, flag = choose_heads(result.values[t], mass.mean[t], k, k)
        chosen[t] = (top | flag).flatten().nonzero().flatten()
        flagged[t] = int(flag.sum())
    total = sum(int(result.counts[t]) * len(idx) for t, idx in chosen.items())
    start = time.perf_counter()
    bar = tqdm(total=total, desc="verify (exact)", unit="ablation", disable=not progress, leave=False)
    with bar:
        exact = exact_changes(prep.lm.model, heads, prep.tokenized, chosen, prep.tasks, pad_id=prep.lm.pad_id,
                              device=prep.lm.device, batch_size=batch_size, rows_per_pass=rows_per_pass,
                              metric=metric, on_pass=bar.update,
                              baseline_for=lambda b: kept.get(
                                  b, lambda b: _batch_baseline(prep.lm.model, heads, b, static, corrupt)))
    out = with_exact(result, exact)
    out.extra.update(verify_top=k, verify_flagged={prep.tasks[t]: n for t, n in flagged.items()},
                     verify_mode=exact.mode, verify_seconds=time.perf_counter() - start,
                     estimate_seconds=result.extra.get("seconds"))
    out.extra["seconds"] = out.extra["verify_seconds"] + (result.extra.get("seconds") or 0.0)
    return out


def ablate(model: ModelLike = DEFAULT_MODEL, examples: ExamplesLike = None, *,
           baseline: str | torch.Tensor = "zero", mode: str = "prefix", batch_size: int = 8,
           rows_per_pass: int = 64, max_examples: int | None = None, metric: MetricLike = "nll",
           per_position: bool = False, progress: bool = True, columns: Mapping[str, str] | None = None,
           checkpoint: str | None = None, checkpoint_every: int = 0, resume: bool = False) -> HeadScores:
    """Ablate (or patch) every head, one at a time, and measure each task's mean change in the metric.

    Args:
        examples, columns: as in :func:`score` (Examples, or a table with one example per row).
        baseline: ``zero`` (gate 0), ``mean`` (the head's mean output; one extra forward-only
            pass), ``corrupt`` (activation patching: the head's output on the example's corrupted
            prompt, at every position, replaces its clean output; one extra forward-only pass per
            batch) or an explicit [L, H, D] tensor.
        mode: ``prefix`` (default: like ``batched``, and the layers below each ablated head run
            once per batch instead of once per head, about half the cost; checked against a full
            pass on the first batch, ``batched`` where that fails), ``batched`` (rows of one
            forward pass carry different gate vectors, up to ``rows_per_pass`` rows) or ``naive``
            (alias ``sequential``: one forward pass per head). All give the same numbers.
        metric: as in :func:`score` (``nll``, ``logit-diff``, ``prob`` or a callable).
        per_position: also patch each (head, position) on its own into ``position_values``
            [T, L, H, P], positions named as in :func:`score`. Each (layer, head, token) cell runs
            only the tokens from its own to the last the metric reads and (mode ``prefix``) the layers
            from its own up, on the clean run's keys and values of the tokens before it
            (:mod:`headscore.methods.position_patching`); checked against full passes on the first
            batch, one full pass per cell where that fails (and in mode ``naive``). Not with ``checkpoint``.
        checkpoint, checkpoint_every, resume: a resumable run, as in :func:`score` (the checkpoint holds the
            batches done; a stop by an exception or Ctrl-C writes it too); the fingerprint names the mode asked
            for, the baseline and the metric; a resumed run goes on in the mode the first batch's check chose.

    Returns:
        HeadScores whose value at (task, l, h) is the mean over the task's examples of
        loss(head l, h changed) - loss(clean) under the metric (larger = matters more); method
        ``ablation-zero``, ``ablation-mean`` or ``ablation-corrupt`` (activation patching);
        ``extra["mode"]`` is the mode that ran; ``example_values`` each example's own changes.
    """
    try:
        mode = check_mode(mode)
    except ValueError as exc:
        raise HeadscoreError(str(exc)) from None
    if per_position and checkpoint is not None:
        raise HeadscoreError("per-position ablation is not checkpointed; drop the checkpoint or per_position")
    prep, metric = _begin(model, examples, max_examples=max_examples, batch_size=batch_size, metric=metric,
                          baseline=baseline, columns=columns, rows_per_pass=rows_per_pass)
    acc = prep.accumulator()
    layout = head_layout(prep.lm.model)
    ident = {} if checkpoint is None else _run_identity(prep, layout, batch_size, baseline, metric,
                                                        method="ablation", mode=mode)
    run = ScoringRun(acc, num_batches(len(prep.tokenized), batch_size), ident, checkpoint=checkpoint,
                     every=checkpoint_every, resume=resume, distributed=False)
    present = ~layout.absent_heads().flatten()  # a head a layer does not have is NaN without a pass
    rows = single_head_gates(layout.num_layers, layout.num_heads)[present]
    maps = _position_maps(prep, metric) if per_position else None
    total = len(prep.examples) * rows.shape[0]
    start = time.perf_counter()
    # one forward pass covers a few heads: count (example, head) ablations, not batches
    bar = tqdm(total=total, desc=f"ablate ({mode})", unit="ablation", disable=not progress, leave=False)
    # per position: count (example, layer, head, token) cells, padding included
    cells = tqdm(total=batch_cells(prep.tokenized, batch_size) * rows.shape[0] if maps is not None else 0,
                 desc="patch positions", unit="cell", disable=not progress or maps is None, leave=False)
    # a resumed run goes on in the mode its first batches ran in (the prefix check is not asked again)
    mode = run.notes.get("mode", mode)
    fast_positions, checked = None, "mode" in run.notes
    bar.update(min(run.done * batch_size, len(prep.tokenized)) * rows.shape[0])  # a resumed run's done part
    with patch(prep.lm.model) as heads, bar, cells, prep.naming_examples():
        static = _baseline_tensor(prep, heads, baseline, batch_size, progress) if run.done < run.total else None
        model = prep.lm.model
        with run.saving_on_exit():  # an interrupt or error keeps the batches done in the checkpoint
            for batch in run.batches(prep.batches(batch_size, progress=False)):
                base = _batch_baseline(model, heads, batch, static, baseline == "corrupt")
                if not checked and mode == "prefix" and not prefix_reuse_works(model, heads, batch, base, metric):
                    mode = "batched"
                checked, run.notes["mode"] = True, mode
                clean = clean_losses(model, heads, batch, metric)

                def changed(gate_rows: torch.Tensor, batch=batch, base=base, mode=mode, clean=clean) -> torch.Tensor:
                    """Each gate row's change of every example's loss: [K, B]."""
                    return gated_losses(model, heads, batch, gate_rows, base, mode=mode, max_rows=rows_per_pass,
                                        metric=metric, on_pass=lambda n: bar.update(n * batch.size)) - clean[None]

                delta = torch.zeros(batch.size, present.numel(), dtype=torch.float64)
                delta[:, present] = changed(rows).T.to(delta)
                if maps is not None:  # only the tokens and layers each cell can change, checked on the first batch
                    if fast_positions is None:
                        fast_positions = mode != "naive" and position_patching_works(model, heads, batch, base,
                                                                                     metric=metric, mode=mode)
                    maps.add(batch, position_deltas(model, heads, batch, clean, base, metric=metric, mode=mode,
                                                    max_rows=rows_per_pass, fast=fast_positions,
                                                    on_cells=cells.update))  # [B, L, T, H]
                acc.add(batch.task_index, delta.view(batch.size, layout.num_layers, layout.num_heads),
                        batch.example_index)
        run.finish()
    result = prep.result(acc, f"ablation-{_baseline_name(baseline)}", seconds=time.perf_counter() - start,
                         mode=mode, batch_size=batch_size, metric=metric.name, metric_meaning=_meaning(prep, metric),
                         **run.extra)
    return result if maps is None else maps.attach(result)


def ablate_edges(model: ModelLike = DEFAULT_MODEL, examples: ExamplesLike = None, edges: Sequence[tuple[str, str]] |
                 None = None, *, scores: HeadScores | None = None, top: int | None = None,
                 baseline: str = "zero", metric: MetricLike = "nll", batch_size: int = 8, rows_per_pass: int = 64,
                 max_examples: int | None = None, progress: bool = True, columns: Mapping[str, str] | None = None
                 ) -> HeadScores:
    """Exact edge patching: each edge patched alone (its reader's input gets the writer's baseline output in
    place of its clean one, nothing else changes) on every example; the ground truth of edge scores.

    Args:
        edges: (upstream, downstream) node names, e.g. ``[("L0.H3", "L2.H1.q")]``; or None with ``scores`` and
            ``top``: each task's ``top`` edges by |score| in ``scores`` (their union is measured); or None
            alone: every edge of the model (small models only: one patched row per edge and example).
        baseline: ``zero``, ``mean`` or ``corrupt`` (the writers' output on the corrupted prompt).
        rows_per_pass: patched rows per forward pass; the layers below each pass's first reader are replayed.

    Returns:
        HeadScores whose ``edges(task)`` hold the mean change of the metric's loss per measured edge (NaN
        elsewhere; ``edge_maps.exact`` marks them); head values are NaN.
    """
    writers = edge_baseline(baseline, "taylor")
    if (scores is None) != (top is None):
        raise HeadscoreError("scores= and top= come together (the top edges of those scores)")
    if edges is not None and scores is not None:
        raise HeadscoreError("give edges= or scores= with top=, not both")
    prep, metric = _begin(model, examples, max_examples=max_examples, batch_size=batch_size, metric=metric,
                          baseline=writers, columns=columns, rows_per_pass=rows_per_pass)
    graph = residual_model(prep.lm.model).graph
    if scores is not None:
        if scores.edge_maps is not None and scores.edge_nodes != (graph.upstream, graph.downstream):
            raise HeadscoreError("the scores' edge nodes are not this model's")
        chosen = top_edges(scores, top)
    elif edges is not None:
        chosen = edges_by_name(graph, edges)
    else:
        chosen = [tuple(e) for e in graph.allowed.nonzero().tolist()]
    return exact_edge_scores(prep, chosen, baseline=writers, metric=metric, meaning=_meaning(prep, metric),
                             batch_size=batch_size, rows_per_pass=rows_per_pass, progress=progress)


def circuit(model: ModelLike, examples: ExamplesLike, scores: HeadScores, *, edges: int | None = None,
            target_faithfulness: float | None = None, sizes: Sequence[int] | None = None, select: str = "abs",
            batch_size: int = 8, rows_per_pass: int = 64, max_examples: int | None = None, progress: bool = True,
            columns: Mapping[str, str] | None = None) -> list[Circuit]:
    """Each task's circuit from edge scores (``score(..., edges=True)``): the top edges by |score|, pruned to
    those on a path from the input to the logits, with the faithfulness of circuits of growing size on the
    task's examples (the metric with only the circuit's edges clean, every other edge patched to the scores'
    baseline; clean = 1, no edge = 0; :mod:`headscore.edges.circuit`).

    Args:
        edges: the circuit's size in top edges (before pruning); or ``target_faithfulness``: the smallest size
            tried that reaches it (else the largest); neither: the largest size tried (every edge with the
            default ``sizes``).
        sizes: the sizes to try for the curve (default 10, 20, 50, 100, ... up to every edge).
        select: rank edges by ``abs`` (|score|, default) or ``signed`` (score, largest first).
    """
    if select not in SELECTIONS:
        raise HeadscoreError(f"select must be {' or '.join(SELECTIONS)}, not {select!r}")
    if edges is not None and target_faithfulness is not None:
        raise HeadscoreError("give edges= or target_faithfulness=, not both")
    if edges is not None and (isinstance(edges, bool) or not isinstance(edges, int) or edges < 1):
        raise HeadscoreError(f"edges must be a whole number of at least 1, got {edges!r}")
    if target_faithfulness is not None and not 0 < target_faithfulness <= 1:
        raise HeadscoreError(f"target_faithfulness must be in (0, 1], got {target_faithfulness!r}")
    if sizes is not None and (isinstance(sizes, (str, bytes)) or not len(sizes) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes)):
        raise HeadscoreError(f"sizes must be whole numbers of at least 1, got {sizes!r}")
    metric = str(scores.extra.get("metric", "nll"))
    if metric not in METRICS:
        raise HeadscoreError(f"the scores were made with metric {metric!r}, which a circuit run cannot repeat")
    baseline = str(scores.extra.get("baseline", "zero"))  # _begin refuses one a circuit run cannot repeat
    prep, resolved = _begin(model, examples, max_examples=max_examples, batch_size=batch_size, metric=metric,
                            baseline=baseline, columns=columns, rows_per_pass=rows_per_pass)
    return find_circuits(prep, scores, resolved, baseline, edges=edges, target=target_faithfulness, sizes=sizes,
                         by=select, batch_size=batch_size, rows_per_pass=rows_per_pass, progress=progress)


@dataclass(frozen=True)
class SetEffect:
    """Effect of changing a set of heads on one task: mean loss change and its standard error."""

    delta: float
    stderr: float
    clean_loss: float
    count: int


def ablate_heads(model: ModelLike, examples: ExamplesLike, heads_to_change: Sequence[tuple[int, int]],
                 *, baseline: str | torch.Tensor = "zero", gate: float = 0.0, batch_size: int = 8,
                 max_examples: int | None = None, metric: MetricLike = "nll",
                 progress: bool = True, columns: Mapping[str, str] | None = None) -> dict[str, SetEffect]:
    """Set all listed (layer, head) gates to ``gate`` at once (0 = ablate, >1 = amplify); ``baseline`` and
    ``metric`` as in :func:`ablate`, ``examples`` and ``columns`` as in :func:`score`.

    Returns, per task, the mean change of the metric's loss over its examples against the unmodified model.
    """
    prep, metric = _begin(model, examples, max_examples=max_examples, batch_size=batch_size, metric=metric,
                          baseline=baseline, columns=columns)
    layout = head_layout(prep.lm.model)
    try:
        row = head_set_gates(list(heads_to_change), layout.num_layers, layout.num_heads, gate)
    except ValueError as exc:
        raise HeadscoreError(str(exc)) from None
    absent = layout.absent_heads()
    missing = [(layer, head) for layer, head in heads_to_change if bool(absent[layer, head])]
    if missing:
        layer, head = missing[0]
        raise HeadscoreError(f"head ({layer}, {head}) is one layer {layer} does not have (it has "
                             f"{layout.heads_of(layer)} heads{': no attention' if not layout.heads_of(layer) else ''})")
    delta_acc = TaskAccumulator(prep.tasks, 1, 1)
    clean_acc = TaskAccumulator(prep.tasks, 1, 1)
    with patch(prep.lm.model) as heads, prep.naming_examples():
        static = _baseline_tensor(prep, heads, baseline, batch_size, progress)
        for batch in prep.batches(batch_size, desc="ablate set", progress=progress):
            base = _batch_baseline(prep.lm.model, heads, batch, static, baseline == "corrupt")
            clean = clean_losses(prep.lm.model, heads, batch, metric)
            changed = gated_losses(prep.lm.model, heads, batch, row, base, mode="naive", metric=metric)[0]
            delta_acc.add(batch.task_index, (changed - clean).view(-1, 1, 1))
            clean_acc.add(batch.task_index, clean.view(-1, 1, 1))
    return {t: SetEffect(float(delta_acc.mean[i]), float(delta_acc.stderr[i]), float(clean_acc.mean[i]),
                         int(delta_acc.count[i])) for i, t in enumerate(prep.tasks)}
