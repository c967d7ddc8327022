"""Interventions: ablate (gate 0) or amplify (gate > 1) each function's top-k heads and measure every function.

For each function f, the k heads with the largest scores for f (from any HeadScores) are
changed together, and on every function's (held-out) examples we measure the mean loss change
against the unmodified model and the exact-match accuracy of greedy answers (greedy-decode as
many tokens as the target has; the decoded text, stripped, must equal the target, stripped).
The control is k random heads drawn from all L * H heads (seeded; one set per seed, shared by
all functions, so it may overlap a function's top-k).

Cost: per example, every gate setting is one row of a single batch (the example tiled once
per setting). The prompt runs once and its KV cache (the model's own kind) serves both the teacher-forced
target tokens (for the loss, :func:`headscore.loss.target_nll`, the loss every headscore method measures)
and greedy decoding, one token at a time. That path is checked once per run against full passes without a
cache (:func:`cached_decoding_works`, on the example with the longest target); where it differs (hybrid
families whose recurrent layers continue a cached state wrongly), every example decodes with full passes.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import stats
from ..errors import HeadscoreError
from ..gate import gate_dtype
from ..loss import accepts_logits_to_keep, finite_losses, target_nll
from ..methods.ablation import head_set_gates
from ..methods.position_patching import cache_keyword, returned_cache
from ..methods.prefix import replay_tolerance
from ..output_files import atomic_write
from ..patch import HeadGates, head_layout, patch
from ..prepared import prepare
from ..results import HeadScores, json_bytes
from ..text import markdown_text


def check_set_size(k: int, heads: int) -> None:
    """HeadscoreError unless ``k`` heads per set can be drawn from the model's ``heads`` (absent ones not
    counted)."""
    if not 1 <= k <= heads:
        raise HeadscoreError(f"k must be between 1 and {heads} (the model's heads), got {k}")


def random_head_sets(num_layers: int, num_heads: int, k: int, seeds: Sequence[int],
                     absent: torch.Tensor | None = None) -> list[list[tuple[int, int]]]:
    """One set of ``k`` distinct heads per seed, drawn uniformly from the model's heads (not those ``absent``
    [L, H] marks: a hybrid model's layers without attention, a layer's missing heads, whose removal changes
    nothing and would bias the random control toward 0)."""
    flat = range(num_layers * num_heads)
    pool = list(flat) if absent is None else [i for i in flat if not bool(absent.flatten()[i])]
    check_set_size(k, len(pool))
    return [[(i // num_heads, i % num_heads) for i in random.Random(s).sample(pool, k)] for s in seeds]


def _decode(tokenizer, ids: list[int]) -> str | None:
    decode = getattr(tokenizer, "decode", None)
    return None if decode is None else decode(ids, skip_special_tokens=True)


def _keep(model: torch.nn.Module, n: int) -> dict:
    """``logits_to_keep=n`` where the model takes it (the vocabulary projection of the last n positions only)."""
    return {"logits_to_keep": n} if accepts_logits_to_keep(model) else {}


def _cached_decoding(model: torch.nn.Module, prompt: torch.Tensor,
                     target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced logits of the target tokens [K, n, V], the logits each greedy step chose from [K, n, V]
    and the greedy tokens [K, n]: one pass of the prompt, whose cache (the model's own, of the layer kinds
    its config names: a hybrid's recurrent layers keep states, not keys and values) serves the target tokens
    (on a copy) and the greedy steps."""
    n = target.shape[1]
    out = model(input_ids=prompt, use_cache=True, **_keep(model, 1))
    cache, key = returned_cache(out), cache_keyword(model)
    if cache is None or key is None:
        raise RuntimeError("the model neither returns nor takes a KV cache")
    first = out.logits[:, -1]
    forced = first[:, None]
    if n > 1:
        more = model(input_ids=target[:, :-1], use_cache=True, **{key: copy.deepcopy(cache)}).logits
        forced = torch.cat([forced, more], dim=1)
    steps, tokens = [first], [first.argmax(-1)]
    for _ in range(n - 1):
        step = model(input_ids=tokens[-1][:, None], use_cache=True, **{key: cache}).logits[:, -1]
        steps.append(step)
        tokens.append(step.argmax(-1))
    return forced, torch.stack(steps, 1), torch.stack(tokens, 1)


def _uncached_decoding(model: torch.nn.Module, prompt: torch.Tensor,
                       target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`_cached_decoding` returns, from full passes without a cache: one of the prompt and the target
    tokens, then one per further greedy token."""
    n = target.shape[1]
    forced = _forced_logits(model, prompt, target)
    steps, tokens = [forced[:, 0]], [forced[:, 0].argmax(-1)]
    for _ in range(n - 1):
        ids = torch.cat([prompt, torch.stack(tokens, 1)], 1)
        step = model(input_ids=ids, use_cache=False, **_keep(model, 1)).logits[:, -1]
        steps.append(step)
        tokens.append(step.argmax(-1))
    return forced, torch.stack(steps, 1), torch.stack(tokens, 1)


def _forced_logits(model: torch.nn.Module, prompt: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The teacher-forced logits of the target tokens [K, n, V]: one pass of the prompt and the target, no cache."""
    n = target.shape[1]
    return model(input_ids=torch.cat([prompt, target[:, :-1]], 1), use_cache=False, **_keep(model, n)).logits[:, -n:]


def _target_losses(logits: torch.Tensor, target: torch.Tensor, index: int) -> torch.Tensor:
    """Each row's target loss [K] (float64, on the CPU); non-finite ones name example ``index``."""
    loss = finite_losses(target_nll(logits, target, torch.ones_like(target)), torch.full((len(target),), index),
                         logits.dtype)
    return loss.double().cpu()


def _setting_tensors(model: torch.nn.Module, prompt_ids: Sequence[int], target_ids: Sequence[int], k: int):
    """The prompt and target as [K, ...] rows on the model's device."""
    device = next(model.parameters()).device
    prompt = torch.tensor([list(prompt_ids)], device=device).expand(k, -1)
    return prompt, torch.tensor([list(target_ids)], device=device).expand(k, -1)


@torch.no_grad()
def evaluate_settings(model: torch.nn.Module, heads: HeadGates, prompt_ids: Sequence[int],
                      target_ids: Sequence[int], gate_rows: torch.Tensor, *,
                      index: int = 0, cached: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One example under K gate settings: target loss [K] (float64) and greedy tokens [K, n].

    The model must be patched (``heads`` from :func:`headscore.patch`). Row r of ``gate_rows``
    [K, L, H] gates row r of one batch that holds the example K times. ``index`` is the example's
    position in the run, which a :class:`headscore.loss.NonFiniteLoss` reports. ``cached``: the prompt's KV
    cache serves the target and the greedy steps (check the model with :func:`cached_decoding_works`); False:
    full passes without a cache (one per greedy token after the first).
    """
    prompt, target = _setting_tensors(model, prompt_ids, target_ids, gate_rows.shape[0])
    with heads.using(gate_rows.to(prompt.device, gate_dtype(model)), None):
        logits, _, tokens = (_cached_decoding if cached else _uncached_decoding)(model, prompt, target)
    return _target_losses(logits, target, index), tokens.cpu()


@torch.no_grad()
def cached_decoding_works(model: torch.nn.Module, heads: HeadGates, prompt_ids: Sequence[int],
                          target_ids: Sequence[int], gate_rows: torch.Tensor) -> bool:
    """Whether decoding with the model's cache gives the logits of full passes without one, for one example
    under ``gate_rows``: the teacher-forced target logits and each greedy step's. False, with a warning saying
    why, where the cached pass fails or differs beyond rounding (a hybrid family's recurrent layers that
    continue a cached state wrongly: Jamba and Bamba in transformers 5.24); :func:`intervene` then decodes with
    full passes. The tolerance is float32's at least: transformers computes RoPE angles in float32 in every
    model, and a pass over fewer tokens rounds them differently."""
    name = type(model).__name__
    prompt, target = _setting_tensors(model, prompt_ids, target_ids, gate_rows.shape[0])
    with heads.using(gate_rows.to(prompt.device, gate_dtype(model)), None):
        try:
            forced, steps, tokens = _cached_decoding(model, prompt, target)
        except Exception as exc:  # noqa: BLE001 - any failure of the cached path means: do not use it
            warnings.warn(f"{name}: decoding with the model's cache failed ({exc}); interventions decode with "
                          "full passes (one per target token)", stacklevel=3)
            return False
        n = target.shape[1]
        full_forced = _forced_logits(model, prompt, target)
        full_steps = model(input_ids=torch.cat([prompt, tokens[:, :-1]], 1), use_cache=False,
                           **_keep(model, n)).logits[:, -n:]
    dtype = next(model.parameters()).dtype
    tol = replay_tolerance(torch.float32 if dtype == torch.float64 else dtype)
    for got, want in ((forced, full_forced), (steps, full_steps)):
        got, want = got.double(), want.double()
        error = (got - want).abs()
        if not bool((error <= tol * (1 + want.abs().max())).all()):
            warnings.warn(f"{name}: decoding with the model's cache does not reproduce full passes (a logit "
                          f"{float(error.max()):.3g} off, of up to {float(want.abs().max()):.3g}); interventions "
                          "decode with full passes (one per target token)", stacklevel=3)
            return False
    return True


@torch.no_grad()
def setting_losses(model: torch.nn.Module, heads: HeadGates, prompt_ids: Sequence[int], target_ids: Sequence[int],
                   gate_rows: torch.Tensor, *, index: int = 0) -> torch.Tensor:
    """The target loss [K] of :func:`evaluate_settings` without greedy decoding: one forward pass of the
    prompt and the target (no cache), for settings whose accuracy is not needed."""
    prompt, target = _setting_tensors(model, prompt_ids, target_ids, gate_rows.shape[0])
    with heads.using(gate_rows.to(prompt.device, gate_dtype(model)), None):
        return _target_losses(_forced_logits(model, prompt, target), target, index)


@dataclass
class InterventionResult:
    """Loss changes and greedy exact-match accuracies of every head set on every function.

    ``delta[s][g]`` is the mean loss change on function g's examples when the set ``s`` is
    changed (NaN where the set was not measured on g); ``accuracy[s][g]`` the exact-match accuracy
    there (``"clean"`` is the unmodified model; NaN where greedy answers were not decoded: with
    ``others_per_function`` a function's sets are decoded on its own examples only). Sets are
    ``ablate:<f>`` (f's top-k at gate 0), ``scale:<f>`` (f's top-k at gate ``scale``) and
    ``random:<seed>`` (k random heads at gate 0); with several score sources the first two are
    ``ablate:<source>:<f>`` and ``scale:<source>:<f>``.
    ``rows`` is the table: one row per (function, source) with bootstrap intervals over examples
    (``*_ci``: [low, high] at ``level``) and a sign-flip permutation p-value of own-set vs
    random-set damage (``p_own_vs_random``).
    """

    functions: list[str]
    k: int
    scale: float
    seeds: list[int]
    source: str
    head_sets: dict[str, list[tuple[int, int]]]
    counts: dict[str, int]
    delta: dict[str, dict[str, float]]
    accuracy: dict[str, dict[str, float]]
    rows: list[dict] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    level: float = stats.LEVEL
    resamples: int = stats.RESAMPLES
    seed: int = stats.SEED
    others_per_function: int | None = None
    change: torch.Tensor | None = None  # [1 + sets, N] per-example loss change (row 0: clean); NaN: not measured
    example_tasks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain data (JSON-serialisable)."""
        out = {"functions": self.functions, "k": self.k, "scale": self.scale, "seeds": self.seeds,
               "source": self.source, "sources": self.sources or [self.source],
               "head_sets": {s: [list(h) for h in v] for s, v in self.head_sets.items()},
               "counts": self.counts, "delta": self.delta, "accuracy": self.accuracy,
               "confidence_level": self.level, "bootstrap_resamples": self.resamples, "bootstrap_seed": self.seed,
               "others_per_function": self.others_per_function, "table": self.rows}
        if self.change is not None:
            out["per_example"] = {"sets": ["clean", *self.head_sets], "tasks": self.example_tasks,
                                  "loss_change": [[None if not math.isfinite(x) else x for x in row]
                                                  for row in self.change.tolist()]}
        return out

    def source_summary(self, *, seed: int | None = None) -> dict:
        """Per score source, and per pair of sources, the mean over functions of own-function damage,
        damage to the other functions and selectivity (own - others), with bootstrap intervals that
        resample examples within each function (the same draws for every source, so differences
        between sources are paired); ``seed`` of the resampling, default the result's own."""
        seed = self.seed if seed is None else seed
        if self.change is None:
            raise ValueError("no per-example changes kept")
        sources = self.sources or [self.source]
        multi = len(sources) > 1
        groups = [torch.tensor([i for i, t in enumerate(self.example_tasks) if t == f], dtype=torch.long)
                  for f in self.functions]
        names = ["clean", *self.head_sets]
        n_fn, n_ex = len(self.functions), self.change.shape[1]
        member = torch.zeros(n_fn, n_ex, dtype=torch.float64)  # [function, example]: one-hot membership
        for g, idx in enumerate(groups):
            member[g, idx] = 1.0
        rows = {src: self.change[[names.index(_set_name("ablate", src, f, multi)) for f in self.functions]]
                for src in sources}  # [set owner f, example]: NaN where not measured
        off_diagonal = ~torch.eye(n_fn, dtype=torch.bool)

        def figures(src: str, picks) -> tuple[float, float]:
            weight = torch.zeros(n_ex, dtype=torch.float64)  # how often each example was drawn
            for g, pick in enumerate(picks):
                weight.index_add_(0, groups[g][pick], torch.ones(len(pick), dtype=torch.float64))
            m = rows[src]
            seen = torch.isfinite(m).double() * weight
            total = torch.nan_to_num(m) * seen @ member.T  # [f, g]: weighted sum of set f's changes on g
            count = seen @ member.T
            means = torch.where(count > 0, total / count.clamp_min(1e-300), torch.nan)  # [f, g]
            own = means.diagonal()
            others = torch.where(off_diagonal, means, torch.nan).nanmean(1)
            return _nanmean(own), _nanmean(others)

        def stat(src: str, what: str, other: str | None = None):
            def f(*picks):
                own, oth = figures(src, picks)
                value = {"own": own, "others": oth, "selectivity": own - oth}[what]
                if other is None:
                    return value
                own_b, oth_b = figures(other, picks)
                return value - {"own": own_b, "others": oth_b, "selectivity": own_b - oth_b}[what]
            return f

        sizes = [len(g) for g in groups]
        opts = {"resamples": self.resamples, "level": self.level, "seed": seed}
        out: dict = {"sources": {}, "differences": {}}
        for src in sources:
            out["sources"][src] = {w: stats.bootstrap(stat(src, w), sizes, **opts).as_dict()
                                   for w in ("own", "others", "selectivity")}
            out["sources"][src]["significant_functions"] = sum(
                1 for r in self.rows if r["source"] == src and r["p_own_vs_random"] < 0.05)
        for i, a in enumerate(sources):
            for b in sources[i + 1:]:
                out["differences"][f"{a} - {b}"] = {w: stats.bootstrap(stat(a, w, b), sizes, **opts).as_dict()
                                                    for w in ("own", "others", "selectivity")}
        return out

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`as_dict` as JSON (atomically)."""
        return atomic_write(path, json_bytes(self.as_dict()))

    def to_markdown(self) -> str:
        """The study-style table: one row per function (and source), own vs other functions vs random heads."""
        multi = len(self.sources) > 1
        pct = f"{self.level:.0%}"
        others = ("all their examples" if self.others_per_function is None
                  else f"{self.others_per_function} example(s) of each other function")
        lines = [f"Top-{self.k} heads by {', '.join(self.sources or [self.source])}; random: {len(self.seeds)} "
                 f"sets of {self.k} heads from all heads. dloss = mean loss change (nats/token) vs the unmodified "
                 f"model, with {pct} bootstrap intervals over examples ({self.resamples} resamples, seed {self.seed}); "
                 f"others = the set's change on the other functions ({others}); selectivity = own - others; "
                 "p = one-sided sign-flip permutation p-value that the own set hurts more than the random sets "
                 f"(paired by example); * = the {pct} interval excludes 0 (a dloss or selectivity), or p < 0.05; "
                 "a figure without brackets has no interval (too few examples, or almost every resample on one side "
                 "of it); acc = greedy exact match.", ""]
        head = ["function", *(["heads by"] if multi else []), "n", "clean acc", "own dloss", "others dloss",
                "selectivity", "random dloss", "own/random", "p", "own acc", "random acc"]
        if math.isfinite(self.scale):
            head += [f"x{self.scale:g} own dloss"]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
        for r in self.rows:
            cells = [markdown_text(r["function"]), *([r["source"]] if multi else []), str(r["n"]),
                     f"{r['clean_acc']:.2f}", _ci_cell(r, "own_dloss"), _ci_cell(r, "others_dloss"),
                     _ci_cell(r, "selectivity"), _ci_cell(r, "random_dloss"), _ci_cell(r, "own_over_random", ".2f"),
                     _p_cell(r["p_own_vs_random"]), f"{r['own_acc']:.2f}", f"{r['random_acc']:.2f}"]
            if math.isfinite(self.scale):
                cells.append(_ci_cell(r, "scale_own_dloss") if "scale_own_dloss_ci" in r else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_markdown_file(self, path: str | Path) -> Path:
        """Write :meth:`to_markdown` (atomically)."""
        return atomic_write(path, self.to_markdown().encode())


def _ci_cell(row: dict, key: str, spec: str = "+.3f") -> str:
    return stats.format_interval(row.get(key, math.nan), row.get(f"{key}_ci"), spec, star=key != "own_over_random")


def _p_cell(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{p:.3f}{'*' if p < 0.05 else ''}"


def _interval(iv: stats.Interval) -> list[float]:
    return [iv.low, iv.high]


def _set_name(kind: str, source: str, function: str, multi: bool) -> str:
    return f"{kind}:{source}:{function}" if multi else f"{kind}:{function}"


def intervene(model, examples, scores: HeadScores | Mapping[str, HeadScores], *, k: int = 5,
              seeds: Sequence[int] = (0, 1, 2), scale: float | None = 2.0, functions: Sequence[str] | None = None,
              others_per_function: int | None = None, resamples: int = stats.RESAMPLES,
              level: float = stats.LEVEL, seed: int = stats.SEED, progress: bool = True) -> InterventionResult:
    """Ablate and amplify each function's top-k heads (by ``scores``) and k random heads; measure all functions.

    Args:
        model: a LoadedModel or a model name.
        examples: evaluation examples (held out from whatever made ``scores``), any mix of functions.
        scores: HeadScores whose per-task maps pick the top-k heads, or several by name
            (``{"probe": ..., "taylor": ...}``): each source's top-k sets are measured against the same
            random sets; amplification (``scale``) is measured for the first source only.
        k: heads per set.
        seeds: one random k-head control set per seed.
        scale: gate for the amplification rows (None: no amplification).
        functions: the functions to intervene on (default: tasks in both ``scores`` and ``examples``).
        others_per_function: measure each function's sets on only this many examples of every other
            function (the first ones, loss only, no greedy decoding; None: all, decoded). Own-function
            and random sets are always measured and decoded on every example. Cost per example is one
            row per set it is measured with.
        resamples, level: bootstrap resamples and confidence level of the intervals.
        seed: seed of the intervals' resampling and of the permutation test's random sign patterns (beyond 16
            examples); the random head sets take ``seeds``.
    """
    sources = dict(scores) if isinstance(scores, Mapping) else {scores.method: scores}
    if not sources:
        raise HeadscoreError("no scores to pick heads from")
    multi = len(sources) > 1
    prep = prepare(model, examples)
    lm = prep.lm
    layout = head_layout(lm.model)
    for name, s in sources.items():
        if (s.num_layers, s.num_heads) != (layout.num_layers, layout.num_heads):
            raise HeadscoreError(f"{name} scores are {s.num_layers}x{s.num_heads} heads, the model has "
                                 f"{layout.num_layers}x{layout.num_heads}")
    common = [t for t in prep.tasks if all(t in s.tasks for s in sources.values())]
    functions = common if functions is None else list(functions)
    missing = [f for f in functions if f not in common]
    if missing or not functions:
        raise HeadscoreError(f"no scores or no examples for: {', '.join(missing) or 'any function'}")
    seeds = list(seeds)
    sets: dict[str, list[tuple[int, int]]] = {}
    gates: dict[str, float] = {}
    owner: dict[str, str] = {}
    for i, (source, s) in enumerate(sources.items()):
        for f in functions:
            top = [(layer, head) for layer, head, _ in s.top_k(k, f)]
            name = _set_name("ablate", source, f, multi)
            sets[name], gates[name], owner[name] = top, 0.0, f
            if scale is not None and i == 0:
                name = _set_name("scale", source, f, multi)
                sets[name], gates[name], owner[name] = top, float(scale), f
    for s_, heads_ in zip(seeds, random_head_sets(layout.num_layers, layout.num_heads, k, seeds,
                                                        layout.absent_heads()), strict=True):
        sets[f"random:{s_}"], gates[f"random:{s_}"] = heads_, 0.0
    names = ["clean", *sets]
    rows = torch.cat([head_set_gates([], layout.num_layers, layout.num_heads)]
                     + [head_set_gates(sets[name], layout.num_layers, layout.num_heads, gates[name])
                        for name in names[1:]])

    n_ex = len(prep.examples)
    task_rows = {t: [i for i, ex in enumerate(prep.examples) if ex.task == t] for t in prep.tasks}
    sampled = {t: set(idx if others_per_function is None else idx[:others_per_function])
               for t, idx in task_rows.items()}
    need = torch.ones(len(names), n_ex, dtype=torch.bool)
    for r, name in enumerate(names):
        if name in owner:
            need[r] = torch.tensor([ex.task == owner[name] or i in sampled[ex.task]
                                    for i, ex in enumerate(prep.examples)])
    # greedy decoding (for accuracy) everywhere, or, when the other functions are sampled to save time,
    # where the table reports it: clean, random and own-function sets (the samples need the loss only)
    decoded = torch.ones_like(need)
    for r, name in enumerate(names):
        if name in owner and others_per_function is not None:
            decoded[r] = torch.tensor([ex.task == owner[name] for ex in prep.examples])
    loss = torch.full((len(names), n_ex), math.nan, dtype=torch.float64)
    correct = torch.zeros(len(names), n_ex, dtype=torch.bool)
    bar = tqdm(prep.tokenized, desc="interventions", unit="example", disable=not progress, leave=False)
    with patch(lm.model) as heads, prep.naming_examples():
        longest = max(prep.tokenized, key=lambda item: item.num_target)  # the most greedy steps to check
        cached = cached_decoding_works(lm.model, heads, list(longest.ids)[:-longest.num_target],
                                       list(longest.ids)[-longest.num_target:], rows[:2])
        for item in bar:
            ids = list(item.ids)
            prompt, target = ids[:-item.num_target], ids[-item.num_target:]
            which = (need[:, item.index] & decoded[:, item.index]).nonzero().flatten()
            ex_loss, tokens = evaluate_settings(lm.model, heads, prompt, target, rows[which], index=item.index,
                                                cached=cached)
            loss[which, item.index] = ex_loss
            want = prep.examples[item.index].target.strip()
            for j, r in enumerate(which.tolist()):
                toks = tokens[j].tolist()
                text = _decode(lm.tokenizer, toks)
                correct[r, item.index] = (toks == target) if text is None else (text.strip() == want)
            loss_only = (need[:, item.index] & ~decoded[:, item.index]).nonzero().flatten()
            if len(loss_only):
                loss[loss_only, item.index] = setting_losses(lm.model, heads, prompt, target, rows[loss_only],
                                                             index=item.index)

    change = loss - loss[0:1]  # [S, N]: NaN where a set was not measured
    delta = {name: {t: _nanmean(change[r, idx]) for t, idx in task_rows.items()}
             for r, name in enumerate(names) if r > 0}
    measured = need & decoded
    accuracy = {name: {t: float(correct[r, idx][measured[r, idx]].double().mean()) if measured[r, idx].any()
                       else math.nan for t, idx in task_rows.items()} for r, name in enumerate(names)}
    row_of = {name: r for r, name in enumerate(names)}
    random_rows = [row_of[f"random:{s_}"] for s_ in seeds]
    opts = {"resamples": resamples, "level": level, "seed": seed}
    table = []
    for source in sources:
        for f in functions:
            own_idx = task_rows[f]
            others = [t for t in functions if t != f]
            a = row_of[_set_name("ablate", source, f, multi)]
            own = change[a, own_idx]
            rnd = change[random_rows][:, own_idx].mean(0) if random_rows else torch.full_like(own, math.nan)
            # each other function's examples are a group of their own (resampled within it, as source_summary
            # does): a pooled resample could lack a function, and the few-examples floor holds per function
            groups = [change[a, [i for i in task_rows[t] if i in sampled[t]]] for t in others]
            sizes = [len(g) for g in groups]

            def others_mean(*picks, groups=groups):  # mean over functions of their means
                return float(torch.stack([g[i].mean() for g, i in zip(groups, picks, strict=True)]).mean())

            row = {"function": f, "source": source, "n": len(own_idx), "heads": [list(h) for h in sets[
                _set_name("ablate", source, f, multi)]], "clean_acc": accuracy["clean"][f],
                "own_acc": accuracy[names[a]][f],
                "random_acc": _nanmean(torch.tensor([accuracy[names[r]][f] for r in random_rows]))}
            figures = {
                "own_dloss": stats.bootstrap(lambda i, v=own: float(v[i].mean()), [len(own)], **opts),
                "random_dloss": stats.bootstrap(lambda i, v=rnd: float(v[i].mean()), [len(rnd)], **opts),
                "own_over_random": stats.bootstrap(lambda i, o=own, q=rnd: _ratio(o[i].mean(), q[i].mean()),
                                                   [len(own)], **opts),
                "others_dloss": stats.bootstrap(others_mean, sizes, **opts) if others else None,
                "selectivity": stats.bootstrap(lambda i, *j, o=own: float(o[i].mean()) - others_mean(*j),
                                               [len(own), *sizes], **opts) if others else None,
            }
            if scale is not None and source == next(iter(sources)):
                sc = change[row_of[_set_name("scale", source, f, multi)], own_idx]
                figures["scale_own_dloss"] = stats.bootstrap(lambda i, v=sc: float(v[i].mean()), [len(sc)], **opts)
                row["scale_own_acc"] = accuracy[_set_name("scale", source, f, multi)][f]
            for key, iv in figures.items():
                row[key] = iv.value if iv is not None else math.nan
                row[f"{key}_ci"] = _interval(iv) if iv is not None else [math.nan, math.nan]
            row["random_dloss_sd"] = float(torch.tensor([delta[names[r]][f] for r in random_rows]).std()) \
                if len(random_rows) > 1 else 0.0
            row["p_own_vs_random"] = stats.sign_flip_pvalue(own - rnd, seed=seed) if random_rows else math.nan
            table.append(row)
    first = next(iter(sources.values()))
    return InterventionResult(functions, k, float(scale) if scale is not None else math.nan, seeds,
                              first.method if not multi else ", ".join(sources), sets,
                              {t: len(v) for t, v in task_rows.items()}, delta, accuracy, table,
                              sources=list(sources), level=level, resamples=resamples, seed=seed,
                              others_per_function=others_per_function, change=change,
                              example_tasks=[ex.task for ex in prep.examples])


def _nanmean(v: torch.Tensor) -> float:
    v = v[torch.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = float(a), float(b)
    return a / b if b != 0.0 and math.isfinite(b) else math.nan
