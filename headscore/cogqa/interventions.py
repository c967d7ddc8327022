"""Interventions: ablate (gate 0) or amplify (gate > 1) each function's top-k heads and measure every function.

For each function f, the k heads with the largest scores for f (from any HeadScores) are
changed together, and on every function's (held-out) examples we measure the mean loss change
against the unmodified model and the exact-match accuracy of greedy answers (greedy-decode as
many tokens as the target has; the decoded text, stripped, must equal the target, stripped).
The control is k random heads drawn from all L * H heads (seeded; one set per seed, shared by
all functions, so it may overlap a function's top-k).

Cost: per example, every gate setting is one row of a single batch (the example tiled once
per setting). The prompt runs once and its KV cache serves both the teacher-forced target tokens
(for the loss, :func:`headscore.loss.target_nll`, the loss every headscore method measures) and
greedy decoding, one token at a time.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import HeadscoreError
from ..loss import finite_losses, target_nll
from ..methods.ablation import head_set_gates
from ..patch import HeadGates, head_layout, patch
from ..prepared import prepare
from ..results import HeadScores, atomic_write
from ..text import markdown_text


def random_head_sets(num_layers: int, num_heads: int, k: int, seeds: Sequence[int]) -> list[list[tuple[int, int]]]:
    """One set of ``k`` distinct heads per seed, drawn uniformly from all heads."""
    n = num_layers * num_heads
    if not 1 <= k <= n:
        raise HeadscoreError(f"k must be between 1 and {n}, got {k}")
    return [[(i // num_heads, i % num_heads) for i in random.Random(s).sample(range(n), k)] for s in seeds]


def _cache_kwarg(model: torch.nn.Module) -> str:
    """``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode(tokenizer, ids: list[int]) -> str | None:
    decode = getattr(tokenizer, "decode", None)
    return None if decode is None else decode(ids, skip_special_tokens=True)


@torch.no_grad()
def evaluate_settings(model: torch.nn.Module, heads: HeadGates, prompt_ids: Sequence[int],
                      target_ids: Sequence[int], gate_rows: torch.Tensor, *,
                      index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One example under K gate settings: target loss [K] (float64) and greedy tokens [K, n].

    The model must be patched (``heads`` from :func:`headscore.patch`). Row r of ``gate_rows``
    [K, L, H] gates row r of one batch that holds the example K times. ``index`` is the example's
    position in the run, which a :class:`headscore.loss.NonFiniteLoss` reports.
    """
    # transformers is imported on first use (as in headscore.models): it is slow to import
    from transformers import DynamicCache

    device = next(model.parameters()).device
    k, n = gate_rows.shape[0], len(target_ids)
    dtype = torch.promote_types(torch.float32, next(model.parameters()).dtype)
    prompt = torch.tensor([list(prompt_ids)], device=device).expand(k, -1)
    target = torch.tensor(list(target_ids), device=device).expand(k, -1)
    key = _cache_kwarg(model)
    cache = DynamicCache()
    with heads.using(gate_rows.to(device, dtype), None):
        first = model(input_ids=prompt, use_cache=True, **{key: cache}).logits[:, -1]
        logits = first[:, None]
        if n > 1:  # teacher-forced target tokens on a copy of the prompt's cache
            forced = model(input_ids=target[:, :-1], use_cache=True, **{key: copy.deepcopy(cache)}).logits
            logits = torch.cat([logits, forced], dim=1)
        loss = finite_losses(target_nll(logits, target, torch.ones_like(target)), torch.full((k,), index),
                             logits.dtype)
        tokens = [first.argmax(-1)]
        for _ in range(n - 1):
            step = model(input_ids=tokens[-1][:, None], use_cache=True, **{key: cache}).logits[:, -1]
            tokens.append(step.argmax(-1))
    return loss.double().cpu(), torch.stack(tokens, 1).cpu()


@dataclass
class InterventionResult:
    """Loss changes and greedy exact-match accuracies of every head set on every function.

    ``delta[s][g]`` is the mean loss change on function g's examples when the set ``s`` is
    changed; ``accuracy[s][g]`` the exact-match accuracy there (``"clean"`` is the unmodified
    model). Sets are ``ablate:<f>`` (f's top-k at gate 0), ``scale:<f>`` (f's top-k at gate
    ``scale``) and ``random:<seed>`` (k random heads at gate 0).
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

    def as_dict(self) -> dict:
        """Plain data (JSON-serialisable)."""
        return {"functions": self.functions, "k": self.k, "scale": self.scale, "seeds": self.seeds,
                "source": self.source, "head_sets": {s: [list(h) for h in v] for s, v in self.head_sets.items()},
                "counts": self.counts, "delta": self.delta, "accuracy": self.accuracy, "table": self.rows}

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`as_dict` as JSON (atomically)."""
        return atomic_write(path, json.dumps(self.as_dict(), indent=1).encode())

    def to_markdown(self) -> str:
        """The study-style table: one row per function, own vs other functions vs random heads."""
        head = ("| function | n | clean acc | own dloss | others dloss | random dloss (mean +- sd) | own/random | "
                "own acc | others acc | random acc | x{s} own dloss | x{s} own acc |").format(s=f"{self.scale:g}")
        lines = [f"Top-{self.k} heads by {self.source}; random: {len(self.seeds)} sets of {self.k} heads "
                 "from all heads. dloss = mean loss change (nats/token) vs the unmodified model; acc = greedy "
                 "exact match.", "", head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
        for r in self.rows:
            lines.append(
                f"| {markdown_text(r['function'])} | {r['n']} | {r['clean_acc']:.2f} | {r['own_dloss']:+.3f} | "
                f"{r['others_dloss']:+.3f} | {r['random_dloss']:+.3f} +- {r['random_dloss_sd']:.3f} | "
                f"{_fmt_ratio(r['own_over_random'])} | {r['own_acc']:.2f} | {r['others_acc']:.2f} | "
                f"{r['random_acc']:.2f} +- {r['random_acc_sd']:.2f} | {r['scale_own_dloss']:+.3f} | "
                f"{r['scale_own_acc']:.2f} |")
        return "\n".join(lines) + "\n"

    def to_markdown_file(self, path: str | Path) -> Path:
        """Write :meth:`to_markdown` (atomically)."""
        return atomic_write(path, self.to_markdown().encode())


def _fmt_ratio(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.2f}"


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def intervene(model, examples, scores: HeadScores, *, k: int = 5, seeds: Sequence[int] = (0, 1, 2),
              scale: float | None = 2.0, functions: Sequence[str] | None = None, progress: bool = True,
              ) -> InterventionResult:
    """Ablate and amplify each function's top-k heads (by ``scores``) and k random heads; measure all functions.

    Args:
        model: a LoadedModel or a model name.
        examples: evaluation examples (held out from whatever made ``scores``), any mix of functions.
        scores: HeadScores whose per-task maps pick the top-k heads.
        k: heads per set.
        seeds: one random k-head control set per seed.
        scale: gate for the amplification rows (None: no amplification).
        functions: the functions to intervene on (default: tasks in both ``scores`` and ``examples``).
    """
    prep = prepare(model, examples)
    lm = prep.lm
    layout = head_layout(lm.model)
    if (scores.num_layers, scores.num_heads) != (layout.num_layers, layout.num_heads):
        raise HeadscoreError(f"scores are {scores.num_layers}x{scores.num_heads} heads, the model has "
                             f"{layout.num_layers}x{layout.num_heads}")
    functions = [t for t in prep.tasks if t in scores.tasks] if functions is None else list(functions)
    missing = [f for f in functions if f not in scores.tasks or f not in prep.tasks]
    if missing or not functions:
        raise HeadscoreError(f"no scores or no examples for: {', '.join(missing) or 'any function'}")
    seeds = list(seeds)
    sets: dict[str, list[tuple[int, int]]] = {}
    gates: dict[str, float] = {}
    for f in functions:
        top = [(layer, head) for layer, head, _ in scores.top_k(k, f)]
        sets[f"ablate:{f}"], gates[f"ablate:{f}"] = top, 0.0
        if scale is not None:
            sets[f"scale:{f}"], gates[f"scale:{f}"] = top, float(scale)
    for s, heads_ in zip(seeds, random_head_sets(layout.num_layers, layout.num_heads, k, seeds), strict=True):
        sets[f"random:{s}"], gates[f"random:{s}"] = heads_, 0.0
    names = ["clean", *sets]
    rows = torch.cat([head_set_gates([], layout.num_layers, layout.num_heads)]
                     + [head_set_gates(sets[name], layout.num_layers, layout.num_heads, gates[name])
                        for name in names[1:]])

    loss = torch.empty(len(names), len(prep.examples), dtype=torch.float64)
    correct = torch.zeros(len(names), len(prep.examples), dtype=torch.bool)
    bar = tqdm(prep.tokenized, desc="interventions", unit="example", disable=not progress, leave=False)
    with patch(lm.model) as heads, prep.naming_examples():
        for item in bar:
            ids = list(item.ids)
            prompt, target = ids[:-item.num_target], ids[-item.num_target:]
            ex_loss, tokens = evaluate_settings(lm.model, heads, prompt, target, rows, index=item.index)
            loss[:, item.index] = ex_loss
            want = prep.examples[item.index].target.strip()
            for r in range(len(names)):
                toks = tokens[r].tolist()
                text = _decode(lm.tokenizer, toks)
                correct[r, item.index] = (toks == target) if text is None else (text.strip() == want)

    task_rows = {t: [i for i, ex in enumerate(prep.examples) if ex.task == t] for t in prep.tasks}
    delta = {name: {t: float((loss[r, idx] - loss[0, idx]).mean()) for t, idx in task_rows.items()}
             for r, name in enumerate(names) if r > 0}
    accuracy = {name: {t: float(correct[r, idx].double().mean()) for t, idx in task_rows.items()}
                for r, name in enumerate(names)}
    table = []
    for f in functions:
        others = [t for t in functions if t != f]
        own = delta[f"ablate:{f}"][f]
        rnd, rnd_sd = _mean_sd([delta[f"random:{s}"][f] for s in seeds]) if seeds else (math.nan, math.nan)
        racc, racc_sd = _mean_sd([accuracy[f"random:{s}"][f] for s in seeds]) if seeds else (math.nan, math.nan)
        table.append({
            "function": f, "n": len(task_rows[f]), "heads": [list(h) for h in sets[f"ablate:{f}"]],
            "clean_acc": accuracy["clean"][f], "own_dloss": own,
            "others_dloss": _mean_sd([delta[f"ablate:{f}"][t] for t in others])[0] if others else math.nan,
            "random_dloss": rnd, "random_dloss_sd": rnd_sd,
            "own_over_random": own / rnd if rnd != 0.0 and math.isfinite(rnd) else math.nan,
            "own_acc": accuracy[f"ablate:{f}"][f],
            "others_acc": _mean_sd([accuracy[f"ablate:{f}"][t] for t in others])[0] if others else math.nan,
            "random_acc": racc, "random_acc_sd": racc_sd,
            "scale_own_dloss": delta[f"scale:{f}"][f] if scale is not None else math.nan,
            "scale_own_acc": accuracy[f"scale:{f}"][f] if scale is not None else math.nan,
        })
    return InterventionResult(functions, k, float(scale) if scale is not None else math.nan, seeds, scores.method,
                              sets, {t: len(v) for t, v in task_rows.items()}, delta, accuracy, table)
