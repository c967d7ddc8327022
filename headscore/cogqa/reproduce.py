"""Reproduce the CogQA "Cognitive Mirrors" head maps (arXiv 2512.10978) with headscore.

:func:`reproduce_cogqa` on a model and the CogQA JSON file:

1. loads every sub-question as an example (:func:`headscore.data.cogqa.load_cogqa`), keeps at most
   ``max_per_function`` per function (seeded), and splits by MAIN question into train / held-out;
2. probe maps (the study's method, :mod:`headscore.methods.probe`): activations from one forward
   pass, probe trained on the train split, held-out accuracy vs the majority class;
3. gradient maps (``taylor``) on the same examples, kept per example so split-half maps are free;
4. zero ablation of every head on ``ablation_per_function`` examples per function (the shortest
   ones, to bound the cost: 1 + L * H forward passes per example) as the ground truth, and
   Spearman / top-k overlap of probe vs ablation and taylor vs ablation per function;
5. interventions (:mod:`headscore.cogqa.interventions`) on held-out examples: each function's top-k
   probe heads ablated and doubled vs k random heads;
6. findings (:mod:`headscore.cogqa.findings`): sparsity, layer profiles, Jaccard overlap, split-half
   stability; and :meth:`Reproduction.write` puts it all in one Markdown report with figures.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..api import ablate
from ..compare import compare
from ..data.cogqa import (
    COGQA_FUNCTIONS,
    load_cogqa,
    question_ids,
    sample_per_function,
    split_by_question,
    split_indices_by_question,
)
from ..errors import HeadscoreError
from ..methods.gradient import gate_gradients
from ..methods.probe import collect_activations, probe_scores
from ..models import LoadedModel, load_model
from ..patch import patch
from ..prepared import prepare
from ..results import HeadScores, atomic_write
from .findings import jaccard_matrix, plot_jaccard, plot_layer_profiles, sparsity
from .findings import stability as split_half_stability
from .interventions import InterventionResult, intervene


def per_example_taylor(prep, batch_size: int = 8, *, progress: bool = True) -> torch.Tensor:
    """-dL/dg for every example (``taylor`` before averaging): float64 [N, L, H] in ``prep.examples`` order."""
    with patch(prep.lm.model) as heads:
        out = torch.zeros(len(prep.examples), heads.layout.num_layers, heads.layout.num_heads, dtype=torch.float64)
        for batch in prep.batches(batch_size, desc="score (taylor)", progress=progress):
            _, grad = gate_gradients(prep.lm.model, heads, batch)
            out[batch.example_index.cpu()] = -grad.detach().to("cpu", torch.float64)
    return out


def scores_from_values(prep, values: torch.Tensor, rows: Sequence[int], method: str, **extra) -> HeadScores:
    """HeadScores from per-example values [N, L, H], averaged by task over ``rows``."""
    acc = prep.accumulator()
    rows = torch.as_tensor(list(rows), dtype=torch.long)
    labels = torch.tensor([prep.tasks.index(ex.task) for ex in prep.examples])
    acc.add(labels[rows], values[rows])
    return prep.result(acc, method, **extra)


def _ordered(scores: HeadScores) -> HeadScores:
    known = [f for f in COGQA_FUNCTIONS if f in scores.tasks]
    return scores.select(known + [t for t in scores.tasks if t not in known])


REPRODUCTION_FILES = tuple(
    [f"{m}.hs" for m in ("probe", "taylor", "ablation")]
    + [f"{kind}_{m}.{ext}" for kind, methods in (("grid", ("probe", "taylor", "ablation")),
                                                  ("scatter", ("probe", "taylor")), ("jaccard", ("probe", "taylor")))
       for m in methods for ext in ("png", "pdf")]
    + ["layer_profiles.png", "layer_profiles.pdf", "interventions.json", "interventions.md", "summary.json",
       "report.md"])
"""The files :meth:`Reproduction.write` may write into its directory."""


def shortest_per_function(examples, n: int) -> list:
    """The ``n`` shortest (prompt + target characters) examples of each function, in input order."""
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(i)
    keep = set()
    for idx in by_task.values():
        keep.update(sorted(idx, key=lambda i: (len(examples[i].prompt) + len(examples[i].target), i))[:n])
    return [ex for i, ex in enumerate(examples) if i in keep]


@dataclass
class Reproduction:
    """Everything :func:`reproduce_cogqa` measured."""

    model: str
    options: dict
    counts: dict
    probe: HeadScores
    taylor: HeadScores
    ablation: HeadScores | None
    probe_vs_ablation: dict
    taylor_vs_ablation: dict
    same_examples_vs_ablation: dict  # taylor computed on exactly the ablated examples
    interventions: InterventionResult | None
    sparsity: dict
    jaccard: dict
    stability: dict
    timings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The figures as plain data."""
        return {"model": self.model, "options": self.options, "counts": self.counts,
                "probe_accuracy": self.probe.extra.get("probe_accuracy"),
                "chance_accuracy": self.probe.extra.get("chance_accuracy"),
                "train_accuracy": self.probe.extra.get("train_accuracy"),
                "probe_vs_ablation": self.probe_vs_ablation, "taylor_vs_ablation": self.taylor_vs_ablation,
                "taylor_same_examples_vs_ablation": self.same_examples_vs_ablation,
                "sparsity": self.sparsity, "jaccard": {m: v.tolist() for m, v in self.jaccard.items()},
                "stability": self.stability, "timings": self.timings,
                "interventions": self.interventions.as_dict() if self.interventions else None}

    def write(self, out_dir: str | Path) -> Path:
        """Scores files, figures, ``summary.json`` and ``report.md`` into ``out_dir``; returns the report path."""
        # headscore.report imports matplotlib: on first use, so that importing this module stays fast
        from ..report import heatmap_grid, scatter_vs_ablation

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        maps = {"probe": self.probe, "taylor": self.taylor}
        if self.ablation is not None:
            maps["ablation"] = self.ablation
        for name, s in maps.items():
            s.save(out / f"{name}.hs")
            heatmap_grid(s, out / f"grid_{name}", title=f"{name}: {self.model} on CogQA")
        if self.ablation is not None:
            for name in ("probe", "taylor"):
                scatter_vs_ablation(maps[name], self.ablation, out / f"scatter_{name}")
        for name in ("probe", "taylor"):
            plot_jaccard(self.jaccard[name], maps[name].tasks, out / f"jaccard_{name}",
                         title=f"top-{self.options['overlap_k']} overlap ({name})")
        plot_layer_profiles(maps, out / "layer_profiles")
        if self.interventions is not None:
            self.interventions.to_json(out / "interventions.json")
            self.interventions.to_markdown_file(out / "interventions.md")
        atomic_write(out / "summary.json", json.dumps(self.summary(), indent=1, default=str).encode())
        return atomic_write(out / "report.md", self.markdown().encode())

    def markdown(self) -> str:
        """The report text (figures referenced by relative file names)."""
        o, c, p = self.options, self.counts, self.probe.extra
        lines = ["# CogQA head maps (Cognitive Mirrors reproduction)", "",
                 f"Model `{self.model}`; {c['examples']} sub-questions from {c['questions']} questions "
                 f"(at most {o['max_per_function']} per function, seed {o['seed']}; taylor on {c['gradient']}), "
                 "split by main question: "
                 f"{c['train']} train / {c['test']} held-out. Ablation on {c['ablation']} examples "
                 f"({o['ablation_per_function']} shortest per function); interventions on {c['intervention']} "
                 "held-out examples.", "",
                 "## Probe", "",
                 f"Held-out accuracy **{p['probe_accuracy']:.3f}** vs chance: majority class of the training "
                 f"split {p['chance_accuracy']:.3f}, uniform {1 / len(self.probe.tasks):.3f}; training accuracy "
                 f"{p['train_accuracy']:.3f} "
                 f"({p['num_train']} train, {p['num_test']} held-out, {len(self.probe.tasks)} classes).", "",
                 "## Maps (rows: layers, columns: heads)", ""]
        for name in ("probe", "taylor", "ablation"):
            if name != "ablation" or self.ablation is not None:
                lines += [f"### {name}", "", f"![{name}](grid_{name}.png)", ""]
        if self.ablation is not None:
            k = o["overlap_k"]
            lines += ["## Agreement with ablation", "",
                      "Spearman and top-k overlap of each map with the zero-ablation map. The ablation map averages "
                      f"{o['ablation_per_function']} example(s) per function, the probe and taylor maps all of theirs, "
                      "so with few ablated examples the map columns reflect how much single examples differ as much "
                      "as the methods; *taylor, same examples* is taylor on exactly the ablated examples, the direct "
                      "check of the gradient estimate.", "",
                      f"| function | probe Spearman | probe top-{k} | taylor Spearman | taylor top-{k} | "
                      f"taylor, same examples: Spearman | top-{k} |", "|---|---|---|---|---|---|---|"]
            for t in self.probe.tasks:
                cells = []
                for agree in (self.probe_vs_ablation, self.taylor_vs_ablation, self.same_examples_vs_ablation):
                    a = agree.get(t, {})
                    cells += [fmt_cell(a.get("spearman"), "+.3f"), fmt_cell(a.get("topk_overlap"), ".2f")]
                lines.append(f"| {t} | " + " | ".join(cells) + " |")
            lines += ["", "![probe vs ablation](scatter_probe.png)", "", "![taylor vs ablation](scatter_taylor.png)",
                      ""]
        lines += ["## Findings", "", "Sparsity: share of total |importance| in the top 5% of heads. Stability: "
                  "Spearman between maps computed on two halves of the questions.", "",
                  "| function | probe sparsity | taylor sparsity | probe stability | taylor stability |",
                  "|---|---|---|---|---|"]
        for t in self.probe.tasks:
            lines.append(f"| {t} | {fmt_cell(self.sparsity['probe'].get(t), '.3f')} | "
                         f"{fmt_cell(self.sparsity['taylor'].get(t), '.3f')} | "
                         f"{fmt_cell(self.stability.get('probe', {}).get(t), '+.3f')} | "
                         f"{fmt_cell(self.stability.get('taylor', {}).get(t), '+.3f')} |")
        lines += ["", "![Jaccard probe](jaccard_probe.png) ![Jaccard taylor](jaccard_taylor.png)", "",
                  "![layer profiles](layer_profiles.png)", ""]
        if self.interventions is not None:
            lines += ["## Interventions", "", self.interventions.to_markdown()]
        lines += ["## Timings (s)", "", ", ".join(f"{k}: {v:.0f}" for k, v in self.timings.items()), ""]
        return "\n".join(lines)


def reproduce_cogqa(model, path: str | Path, *, max_per_function: int | None = 40,
                    gradient_per_function: int | None = None, ablation_per_function: int = 1,
                    intervention_per_function: int | None = 5, k: int = 5, overlap_k: int = 10,
                    seeds: Sequence[int] = (0, 1, 2), scale: float | None = 2.0, train_fraction: float = 0.8,
                    seed: int = 0, batch_size: int = 8, min_examples: int = 10, chat_template: bool = False,
                    functions: Sequence[str] | None = None, stability: bool = True, progress: bool = True,
                    **probe_options) -> Reproduction:
    """Run the whole reproduction (see the module docstring); ``None`` for a per-function limit means all.

    ``gradient_per_function`` limits the taylor scores to a (seeded) subset of those examples
    (default: all of them; the backward pass makes them ~4x the cost of the probe's forward pass).
    ``ablation_per_function=0`` skips ablation, ``intervention_per_function=0`` the interventions;
    ``functions`` keeps only those labels. Extra keyword options go to
    :func:`headscore.methods.probe.train_probe` (``epochs``, ``proj_dim``, ``hidden``, ``shared``, ...).
    """
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    examples = load_cogqa(path, min_examples=min_examples, chat_template=lm.tokenizer if chat_template else None,
                          functions=functions)
    examples = sample_per_function(examples, max_per_function, seed)
    train, test = split_by_question(examples, train_fraction, seed)
    prep = prepare(lm, examples)
    if len(prep.tasks) < 2:
        raise HeadscoreError("the reproduction needs at least two cognitive functions")
    timings["load"] = time.perf_counter() - tick

    tick = time.perf_counter()
    acts = collect_activations(prep, batch_size, progress=progress)
    probe = probe_scores(lm, examples, train_fraction=train_fraction, seed=seed, activations=acts, progress=progress,
                         **probe_options)
    timings["probe"] = time.perf_counter() - tick

    tick = time.perf_counter()
    grad_examples = sample_per_function(examples, gradient_per_function, seed)
    gprep = prep if len(grad_examples) == len(examples) else prepare(lm, grad_examples)
    per_ex = per_example_taylor(gprep, batch_size, progress=progress)
    taylor = scores_from_values(gprep, per_ex, range(len(grad_examples)), "taylor", batch_size=batch_size)
    timings["taylor"] = time.perf_counter() - tick

    stab: dict[str, dict] = {}
    if stability:
        tick = time.perf_counter()
        halves = []
        for idx in split_indices_by_question(question_ids(examples), 0.5, seed + 1):
            sub = [examples[i] for i in idx]
            halves.append(probe_scores(lm, sub, train_fraction=train_fraction, seed=seed, activations=acts[idx],
                                       progress=False, **probe_options))
        stab["probe"] = split_half_stability(halves[0], halves[1], overlap_k)
        ga, gb = split_indices_by_question(question_ids(grad_examples), 0.5, seed + 1)
        stab["taylor"] = split_half_stability(scores_from_values(gprep, per_ex, ga, "taylor"),
                                              scores_from_values(gprep, per_ex, gb, "taylor"), overlap_k)
        timings["stability"] = time.perf_counter() - tick

    ablation, pva, tva, sva, abl_examples = None, {}, {}, {}, []
    if ablation_per_function > 0:
        tick = time.perf_counter()
        abl_examples = shortest_per_function(examples, ablation_per_function)
        ablation = _ordered(ablate(lm, abl_examples, batch_size=batch_size, progress=progress))
        aprep = prepare(lm, abl_examples)
        same = scores_from_values(aprep, per_example_taylor(aprep, batch_size, progress=False),
                                  range(len(abl_examples)), "taylor")
        pva, tva, sva = ({t: a.as_dict() for t, a in compare(_ordered(s), ablation, overlap_k).items()}
                         for s in (probe, taylor, same))
        timings["ablation"] = time.perf_counter() - tick

    probe, taylor = _ordered(probe), _ordered(taylor)
    result_iv, iv_examples = None, []
    if intervention_per_function is None or intervention_per_function > 0:
        tick = time.perf_counter()
        iv_examples = sample_per_function(test, intervention_per_function, seed)
        present = {ex.task for ex in iv_examples}
        result_iv = intervene(lm, iv_examples, probe, k=k, seeds=seeds, scale=scale, progress=progress,
                              functions=[t for t in probe.tasks if t in present])
        timings["interventions"] = time.perf_counter() - tick

    counts = {"examples": len(examples), "gradient": len(grad_examples),
              "questions": len({ex.question_id for ex in examples}), "train": len(train),
              "test": len(test), "ablation": len(abl_examples), "intervention": len(iv_examples),
              "per_function": {t: int(n) for t, n in zip(probe.tasks, probe.counts.tolist(), strict=True)}}
    options = {"max_per_function": max_per_function, "gradient_per_function": gradient_per_function,
               "ablation_per_function": ablation_per_function,
               "intervention_per_function": intervention_per_function, "k": k, "overlap_k": overlap_k,
               "seeds": list(seeds), "scale": scale, "train_fraction": train_fraction, "seed": seed,
               "batch_size": batch_size, "min_examples": min_examples, "chat_template": chat_template,
               "threads": torch.get_num_threads(), **probe_options}
    timings["total"] = sum(timings.values())
    maps = {"probe": probe, "taylor": taylor}
    return Reproduction(lm.name, options, counts, probe, taylor, ablation, pva, tva, sva, result_iv,
                        {m: sparsity(s) for m, s in maps.items()},
                        {m: jaccard_matrix(s, overlap_k) for m, s in maps.items()}, stab, timings)


def fmt_cell(value: float | None, spec: str) -> str:
    """A table cell: ``value`` formatted, or ``n/a`` when missing or undefined (NaN)."""
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)
