"""Reproduce the CogQA "Cognitive Mirrors" head maps (arXiv 2512.10978) with headscore.

:func:`reproduce_cogqa` on a model and the CogQA JSON file:

1. loads every sub-question as an example (:func:`headscore.data.cogqa.load_cogqa`), keeps at most
   ``max_per_function`` per function (seeded), and splits by MAIN question into train / held-out;
2. probe maps (the study's method, :mod:`headscore.cogqa.probe`): activations from one forward
   pass, probe trained on the train split, held-out accuracy vs the majority class;
3. gradient maps (``taylor``) on the same examples, kept per example so split-half maps are free;
4. zero ablation of every head on ``ablation_per_function`` examples per function (the shortest
   ones, to bound the cost; prefix reuse, :mod:`headscore.methods.prefix`) as the ground truth, and
   Spearman / top-k overlap of probe vs ablation and taylor vs ablation per function;
5. the specificity map (:func:`headscore.cogqa.findings.specificity`): each function's taylor map
   against the others', in pooled standard errors;
6. interventions (:mod:`headscore.cogqa.interventions`) on examples of questions no map saw, where there
   are any; when every question went into the maps (``max_per_function=None``) on the probe's held-out
   questions instead, which the taylor and specificity maps (and the probe's importance) were built from,
   so that case is not a held-out test (the report and ``summary.json`` say which case held): each
   function's top-k heads by the probe, taylor and specificity maps ablated (the probe's also doubled) vs
   random k-head sets, with a permutation p-value per function and a comparison of the three sources;
7. findings (:mod:`headscore.cogqa.findings`): sparsity, layer profiles, Jaccard overlap, split-half
   stability; and :meth:`Reproduction.write` puts it all in one Markdown report with figures.

What a run could not do is said, not skipped silently: a function with no intervention example, a
function without a specificity map (fewer than 2 taylor examples: no standard error; it gets no
specificity heads and no specificity set), a split-half probe that cannot be trained (its stability is
n/a). Each gives a warning and a note in the report (``Reproduction.notes``).

Every per-function figure carries a bootstrap interval over examples (:mod:`headscore.stats`,
:mod:`headscore.cogqa.uncertainty`).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import stats
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
from ..intervals import ExampleMaps, agreement_intervals
from ..methods.gradient import gate_gradients
from ..models import LoadedModel, load_model
from ..output_files import OutputSet, atomic_write
from ..patch import head_layout, patch
from ..prepared import prepare
from ..results import HeadScores, json_bytes
from ..text import markdown_text, printable
from .findings import flat_sparsity, jaccard_matrix, plot_jaccard, plot_layer_profiles, sparsity, specificity
from .findings import stability as split_half_stability
from .interventions import InterventionResult, check_set_size, intervene
from .probe import collect_activations, probe_scores
from .uncertainty import sparsity_intervals, stability_intervals


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
    + ["grid_specificity.png", "grid_specificity.pdf", "specificity.hs"]
    + ["layer_profiles.png", "layer_profiles.pdf", "interventions.json", "interventions.md", "summary.json",
       "report.md"])
"""The files :meth:`Reproduction.write` may write into its directory."""

SPECIFICITY_LABEL = "z (standard errors above\nthe other functions' mean)"
"""The colour bar label of the specificity grid (two lines: one line is taller than a one-row grid)."""

UNSEEN = "unseen questions"
HELD_OUT_SEEN = "probe held-out split, seen by the maps"
"""Where the intervention examples came from (``summary.json``'s ``intervention_examples``): questions no map
saw, or, when every question went into the maps, the probe's held-out questions (which the taylor and
specificity maps and the probe's importance averaged over)."""


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
    """Everything :func:`reproduce_cogqa` measured.

    Agreement dicts map a function to ``{"spearman", "kendall", "topk_overlap", "k"}`` plus
    ``"spearman_ci"`` and ``"topk_overlap_ci"`` ([low, high] bootstrap intervals over examples at
    ``options["level"]``); ``sparsity_ci`` and ``stability_ci`` hold the intervals of ``sparsity``
    and ``stability`` the same way. ``intervention_examples`` says where the intervention examples came
    from (:data:`UNSEEN` or :data:`HELD_OUT_SEEN`); ``notes`` what the run left out and why.
    """

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
    sparsity_ci: dict = field(default_factory=dict)
    stability_ci: dict = field(default_factory=dict)
    specificity: HeadScores | None = None
    methods_compared: dict = field(default_factory=dict)
    intervention_examples: str | None = None  # UNSEEN or HELD_OUT_SEEN; None: no interventions
    notes: list[str] = field(default_factory=list)  # what the run left out, and why

    def summary(self) -> dict:
        """The figures as plain data."""
        return {"model": self.model, "options": self.options, "counts": self.counts,
                "probe_accuracy": self.probe.extra.get("probe_accuracy"),
                "chance_accuracy": self.probe.extra.get("chance_accuracy"),
                "train_accuracy": self.probe.extra.get("train_accuracy"),
                "probe_vs_ablation": self.probe_vs_ablation, "taylor_vs_ablation": self.taylor_vs_ablation,
                "taylor_same_examples_vs_ablation": self.same_examples_vs_ablation,
                "sparsity": self.sparsity, "sparsity_ci": self.sparsity_ci,
                "jaccard": {m: v.tolist() for m, v in self.jaccard.items()},
                "stability": self.stability, "stability_ci": self.stability_ci,
                "specificity_top": self.specificity_top(), "methods_compared": self.methods_compared,
                "timings": self.timings, "intervention_examples": self.intervention_examples, "notes": self.notes,
                "interventions": self.interventions.as_dict() if self.interventions else None}

    def specificity_top(self, n: int = 5) -> dict:
        """Per function with a specificity map (a finite value): its ``n`` most specific heads, ``[layer, head,
        z]``."""
        if self.specificity is None:
            return {}
        return {t: [[layer, head, round(z, 3)] for layer, head, z in self.specificity.top_k(n, t)]
                for t in self.specificity.tasks if t not in no_specificity(self.specificity)}

    def write(self, out_dir: str | Path) -> Path:
        """Scores files, figures, ``summary.json`` and ``report.md`` into ``out_dir``, all or nothing (the
        directory is replaced whole: it must be new, empty or an earlier reproduction); returns the report path."""
        with OutputSet() as outputs:
            self._write_files(outputs.directory(out_dir, REPRODUCTION_FILES, label="output directory"))
        return Path(out_dir) / "report.md"

    def _write_files(self, out: Path) -> None:
        # headscore.report imports matplotlib: on first use, so that importing this module stays fast
        from ..report import heatmap_grid, scatter_vs_ablation

        maps = {"probe": self.probe, "taylor": self.taylor}
        if self.ablation is not None:
            maps["ablation"] = self.ablation
        for name, s in maps.items():
            s.save(out / f"{name}.hs")
            heatmap_grid(s, out / f"grid_{name}", title=f"{name}: {self.model} on CogQA")
        if self.specificity is not None:
            self.specificity.save(out / "specificity.hs")
            heatmap_grid(self.specificity, out / "grid_specificity", diverging=True,
                         label=SPECIFICITY_LABEL,
                         title=f"specificity of taylor: each function vs the others ({self.model} on CogQA)")
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
        atomic_write(out / "summary.json", json_bytes(self.summary(), default=str))
        atomic_write(out / "report.md", self.markdown().encode())

    def _level(self) -> str:
        return f"{self.options.get('level', stats.LEVEL):.0%}"

    def markdown(self) -> str:
        """The report text (figures referenced by relative file names)."""
        o, p = self.options, self.probe.extra
        lines = ["# CogQA head maps (Cognitive Mirrors reproduction)", "", self._setup_text(), ""]
        if self.notes:
            lines += ["**Notes.**", "", *(f"- {markdown_text(n)}" for n in self.notes), ""]
        lines += [f"**Uncertainty.** Brackets are {self._level()} bootstrap intervals over examples "
                 f"({o.get('resamples', stats.RESAMPLES)} resamples, seed {o['seed']}; heads are never resampled). "
                 "Maps made from different examples are resampled independently, maps of the same examples "
                 "together; the probe is trained once and held fixed (its interval covers the examples its "
                 "importance averages, not retraining). A figure marked * differs from 0 at that level "
                 "(its interval excludes 0); unmarked figures are not distinguishable from 0 with these examples. "
                 "A figure without brackets has no interval: too few examples, or almost every resample on one side "
                 "of it (a bias the bootstrap cannot correct).",
                 "",
                 "## Probe", "",
                 f"Held-out accuracy **{p['probe_accuracy']:.3f}** vs chance: majority class of the training "
                 f"split {p['chance_accuracy']:.3f}, uniform {1 / len(self.probe.tasks):.3f}; training accuracy "
                 f"{p['train_accuracy']:.3f} "
                 f"({p['num_train']} train, {p['num_test']} held-out, {len(self.probe.tasks)} classes).", "",
                 "## Maps (rows: layers, columns: heads)", ""]
        for name in ("probe", "taylor", "ablation"):
            if name != "ablation" or self.ablation is not None:
                lines += [f"### {name}", "", f"![{name}](grid_{name}.png)", ""]
        if self.specificity is not None:
            lines += ["### specificity (taylor)", "",
                      "Each function's taylor map against the other functions': (value - mean of the others' "
                      "values) / pooled standard error. Heads that matter for every function score near 0; "
                      "a head with z > 2 matters for this function more than for the others by more than two "
                      "standard errors.", "", "![specificity](grid_specificity.png)", ""]
            tops = self.specificity_top()
            if tops:
                lines += ["| function | most specific heads (layer.head: z) | heads with z > 2 |", "|---|---|---|"]
            for t, top in tops.items():
                over = int((self.specificity.task(t) > 2).sum())
                lines.append(f"| {markdown_text(t)} | " + ", ".join(f"L{a}.H{b}: {z:+.1f}" for a, b, z in top)
                             + f" | {over} |")
            missing = no_specificity(self.specificity)
            if missing:
                named = ", ".join(markdown_text(t) for t in missing)
                lines += ([""] if tops else []) + [f"No specificity map for {named} (see the notes above)."]
            lines.append("")
        if self.ablation is not None:
            k = o["overlap_k"]
            lines += ["## Agreement with ablation", "",
                      "Spearman and top-k overlap of each map with the zero-ablation map. The ablation map averages "
                      f"{o['ablation_per_function']} example(s) per function, the probe and taylor maps all of theirs; "
                      "*taylor, same examples* is taylor on exactly the ablated examples, the direct "
                      "check of the gradient estimate.", "",
                      f"| function | probe Spearman | probe top-{k} | taylor Spearman | taylor top-{k} | "
                      f"taylor, same examples: Spearman | top-{k} |", "|---|---|---|---|---|---|---|"]
            for t in self.probe.tasks:
                cells = []
                for agree in (self.probe_vs_ablation, self.taylor_vs_ablation, self.same_examples_vs_ablation):
                    a = agree.get(t, {})
                    cells += [ci_cell(a.get("spearman"), a.get("spearman_ci"), "+.3f"),
                              ci_cell(a.get("topk_overlap"), a.get("topk_overlap_ci"), ".2f", star=False)]
                lines.append(f"| {markdown_text(t)} | " + " | ".join(cells) + " |")
            lines += ["", "![probe vs ablation](scatter_probe.png)", "", "![taylor vs ablation](scatter_taylor.png)",
                      ""]
        heads = int(torch.isfinite(self.taylor.values).any(0).sum())
        lines += ["## Findings", "", "Sparsity: share of total |importance| in the top 5% of heads (ceil(0.05 n) of "
                  f"the model's n = {heads} heads: a flat map gives {flat_sparsity(heads):.3f}). Stability: Spearman "
                  "between maps computed on two halves of the questions (n/a: see the notes).", "",
                  "| function | probe sparsity | taylor sparsity | probe stability | taylor stability |",
                  "|---|---|---|---|---|"]
        for t in self.probe.tasks:
            cells = [ci_cell(self.sparsity[m].get(t), self.sparsity_ci.get(m, {}).get(t), ".3f", star=False)
                     for m in ("probe", "taylor")]
            cells += [ci_cell(self.stability.get(m, {}).get(t), self.stability_ci.get(m, {}).get(t), "+.3f")
                      for m in ("probe", "taylor")]
            lines.append(f"| {markdown_text(t)} | " + " | ".join(cells) + " |")
        lines += ["", "![Jaccard probe](jaccard_probe.png) ![Jaccard taylor](jaccard_taylor.png)", "",
                  "![layer profiles](layer_profiles.png)", ""]
        if self.interventions is not None:
            lines += ["## Interventions", "", self.interventions.to_markdown()]
            if self.methods_compared:
                lines += self._methods_markdown()
        lines += ["## Timings (s)", "", ", ".join(f"{k}: {v:.0f}" for k, v in self.timings.items()), ""]
        return "\n".join(lines)

    def _setup_text(self) -> str:
        """The report's first paragraph: examples, split, and which stages ran on what."""
        o, c = self.options, self.counts
        per = "all" if o["max_per_function"] is None else f"at most {o['max_per_function']}"
        text = (f"Model `{self.model}`; {c['examples']} sub-questions from {c['questions']} questions ({per} per "
                f"function, seed {o['seed']}; taylor on {c['gradient']}), split by main question: {c['train']} train "
                f"/ {c['test']} held-out.")
        text += (" Ablation skipped." if self.ablation is None else
                 f" Ablation on {c['ablation']} examples ({o['ablation_per_function']} shortest per function).")
        if self.interventions is None:
            return text + " Interventions skipped."
        if self.intervention_examples == UNSEEN:
            return text + f" Interventions on {c['intervention']} examples of questions no map saw."
        return text + (f" Interventions on {c['intervention']} examples of the probe's held-out questions, which "
                       "the taylor and specificity maps (and the probe's importance) were built from: not a "
                       "held-out test.")

    def _methods_markdown(self) -> list[str]:
        mc = self.methods_compared
        lines = ["### Which map picks heads that matter?", "",
                 f"Mean over functions of each source's top-{self.options['k']} sets: damage to the own function, "
                 "damage to the other functions, selectivity (own - others); functions whose own set beats the "
                 f"random sets at p < 0.05. {self._level()} intervals resample examples within each function, "
                 "the same draws for every source (differences are paired).", "",
                 "| heads by | own dloss | others dloss | selectivity | functions with p < 0.05 |",
                 "|---|---|---|---|---|"]
        for src, v in mc["sources"].items():
            cells = " | ".join(interval_cell(v[w]) for w in ("own", "others", "selectivity"))
            lines.append(f"| {src} | {cells} | {v['significant_functions']} of {len(self.interventions.functions)} |")
        lines += ["", "| difference | own dloss | others dloss | selectivity |", "|---|---|---|---|"]
        for pair, v in mc["differences"].items():
            lines.append(f"| {pair} | " + " | ".join(interval_cell(v[w]) for w in ("own", "others", "selectivity"))
                         + " |")
        return lines + [""]


def interval_cell(d: dict, spec: str = "+.3f") -> str:
    """:func:`ci_cell` of an interval as plain data (``Interval.as_dict``)."""
    return ci_cell(d["value"], [d["low"], d["high"]], spec)


def ci_cell(value: float | None, ci: Sequence[float] | None, spec: str, *, star: bool = True) -> str:
    """A report cell: ``value [low, high]``, starred when the interval excludes 0 (``star``)."""
    return stats.format_interval(value, ci, spec, star=star)


def no_specificity(spec: HeadScores) -> list[str]:
    """The functions whose specificity map has no finite value (e.g. one taylor example: no standard error)."""
    return [t for t in spec.tasks if not bool(torch.isfinite(spec.task(t)).any())]


def _note(notes: list[str], text: str) -> None:
    """Keep ``text`` for the report and say it now (``warnings.warn``)."""
    notes.append(text)
    warnings.warn(text, stacklevel=3)


def _no_specificity_text(taylor: HeadScores, missing: Sequence[str]) -> str:
    """Why ``missing`` functions have no specificity map, and what the run leaves out for them."""
    few = [t for t in missing if int(taylor.counts[taylor.tasks.index(t)]) < 2]
    rest = [t for t in missing if t not in few]
    why = ([f"{', '.join(printable(t) for t in few)}: fewer than 2 taylor examples, so no standard error"]
           if few else [])
    why += ([f"{', '.join(printable(t) for t in rest)}: no other function with a standard error, or a pooled "
             "standard error of 0 at every head"] if rest else [])
    return ("specificity: no map (no finite z) for " + "; ".join(why) + ". Those functions get no most specific "
            "heads and no top-k set by specificity in the interventions.")


def _stability_halves(lm, examples, acts, seed: int, train_fraction: float, probe_options: dict,
                      notes: list[str]) -> list[HeadScores] | None:
    """A probe per half of the questions, or None (with a note) where a half cannot train one."""
    halves = []
    for h, idx in enumerate(split_indices_by_question(question_ids(examples), 0.5, seed + 1), 1):
        sub = [examples[i] for i in idx]
        try:
            halves.append(probe_scores(lm, sub, train_fraction=train_fraction, seed=seed, activations=acts[idx],
                                       progress=False, **probe_options))
        except HeadscoreError as exc:
            _note(notes, f"split-half stability of the probe: n/a: half {h} of the questions ({len(sub)} of "
                         f"{len(examples)} examples) cannot train a probe of its own; the probe refused it, with "
                         f"that half's counts: {exc}. The taylor maps' stability needs no probe and is computed.")
            return None
    return halves


def _with_intervals(agree: dict, intervals: dict) -> dict:
    """Agreement dicts with ``<figure>_ci`` [low, high] added from ``intervals``."""
    out = {}
    for t, a in agree.items():
        a = dict(a)
        for fig, iv in intervals.get(t, {}).items():
            a[f"{fig}_ci"] = [iv.low, iv.high]
        out[t] = a
    return out


def reproduce_cogqa(model, path: str | Path, *, max_per_function: int | None = 40,
                    gradient_per_function: int | None = None, ablation_per_function: int = 3,
                    intervention_per_function: int | None = 10, k: int = 5, overlap_k: int = 10,
                    seeds: Sequence[int] = tuple(range(5)), scale: float | None = 2.0, train_fraction: float = 0.8,
                    seed: int = 0, batch_size: int = 8, min_examples: int = 10, chat_template: bool = False,
                    functions: Sequence[str] | None = None, stability: bool = True, others_per_function: int | None = 2,
                    resamples: int = stats.RESAMPLES, level: float = stats.LEVEL, progress: bool = True,
                    **probe_options) -> Reproduction:
    """Run the whole reproduction (see the module docstring); ``None`` for a per-function limit means all.

    ``gradient_per_function`` limits the taylor scores to a (seeded) subset of those examples
    (default: all of them; the backward pass makes them ~4x the cost of the probe's forward pass).
    ``ablation_per_function=0`` skips ablation, ``intervention_per_function=0`` the interventions;
    ``functions`` keeps only those labels. The interventions run on examples of main questions that none
    of the maps saw; when there are none (every question used, ``max_per_function=None``), on the probe's
    held-out questions, which the taylor and specificity maps and the probe's importance were built from
    (not a held-out test: ``intervention_examples`` and the report say which case held). They compare the
    top-``k`` heads of the probe, taylor and specificity maps (not for a function without a specificity
    map) against ``len(seeds)`` random sets; each function's sets are measured on ``others_per_function``
    examples of every other function (None: all). Functions left out of a stage, and a split-half probe
    that cannot be trained, are warned about and noted. ``resamples`` and ``level`` set the bootstrap
    intervals. Extra keyword options go to
    :func:`headscore.cogqa.probe.train_probe` (``epochs``, ``proj_dim``, ``hidden``, ``shared``, ...).
    """
    timings: dict[str, float] = {}
    notes: list[str] = []
    boot = {"resamples": resamples, "level": level, "seed": seed}
    tick = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    everything = load_cogqa(path, min_examples=min_examples, chat_template=lm.tokenizer if chat_template else None,
                            functions=functions)
    examples = sample_per_function(everything, max_per_function, seed)
    used = {ex.question_id for ex in examples}
    unseen = [ex for ex in everything if ex.question_id not in used]  # questions no map has seen
    train, test = split_by_question(examples, train_fraction, seed)
    # every question used: the probe's held-out split, which the taylor map and the probe's importance averaged
    iv_pool, iv_case = (unseen, UNSEEN) if unseen else (test, HELD_OUT_SEEN)
    prep = prepare(lm, examples)
    if len(prep.tasks) < 2:
        raise HeadscoreError("the reproduction needs at least two cognitive functions")
    if intervention_per_function != 0:  # the interventions' k, before any stage runs
        check_set_size(k, head_layout(lm.model).real_heads)
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
    taylor_maps = ExampleMaps.of(per_ex, grad_examples, gprep.tasks)
    timings["taylor"] = time.perf_counter() - tick

    stab: dict[str, dict] = {}
    stab_ci: dict[str, dict] = {}
    if stability:
        tick = time.perf_counter()
        halves = _stability_halves(lm, examples, acts, seed, train_fraction, probe_options, notes)
        if halves is not None:
            stab["probe"] = split_half_stability(halves[0], halves[1], overlap_k)
            stab_ci["probe"] = stability_intervals(*(ExampleMaps.from_scores(h) for h in halves), **boot)
        ga, gb = split_indices_by_question(question_ids(grad_examples), 0.5, seed + 1)
        stab["taylor"] = split_half_stability(scores_from_values(gprep, per_ex, ga, "taylor"),
                                              scores_from_values(gprep, per_ex, gb, "taylor"), overlap_k)
        stab_ci["taylor"] = stability_intervals(taylor_maps.subset(ga), taylor_maps.subset(gb), **boot)
        stab_ci = {m: {t: [iv.low, iv.high] for t, iv in v.items()} for m, v in stab_ci.items()}
        timings["stability"] = time.perf_counter() - tick

    ablation, pva, tva, sva, abl_examples = None, {}, {}, {}, []
    if ablation_per_function > 0:
        tick = time.perf_counter()
        abl_examples = shortest_per_function(examples, ablation_per_function)
        ablation = _ordered(ablate(lm, abl_examples, batch_size=batch_size, progress=progress))
        abl_maps = ExampleMaps.from_scores(ablation)
        aprep = prepare(lm, abl_examples)
        same_values = per_example_taylor(aprep, batch_size, progress=False)
        same = scores_from_values(aprep, same_values, range(len(abl_examples)), "taylor")
        pva, tva, sva = ({t: a.as_dict() for t, a in compare(_ordered(s), ablation, overlap_k).items()}
                         for s in (probe, taylor, same))
        pva = _with_intervals(pva, agreement_intervals(ExampleMaps.from_scores(probe), abl_maps, overlap_k, **boot))
        tva = _with_intervals(tva, agreement_intervals(taylor_maps, abl_maps, overlap_k, **boot))
        sva = _with_intervals(sva, agreement_intervals(ExampleMaps.of(same_values, abl_examples, aprep.tasks),
                                                       abl_maps, overlap_k, paired=True, **boot))
        timings["ablation"] = time.perf_counter() - tick

    probe, taylor = _ordered(probe), _ordered(taylor)
    spec = specificity(taylor)
    if no_specificity(spec):
        _note(notes, _no_specificity_text(taylor, no_specificity(spec)))
    result_iv, iv_examples, compared = None, [], {}
    if intervention_per_function is None or intervention_per_function > 0:
        tick = time.perf_counter()
        iv_examples = sample_per_function(iv_pool, intervention_per_function, seed)
        result_iv, compared = _interventions(lm, iv_examples, probe, taylor, spec, iv_case, notes, k=k, seeds=seeds,
                                             scale=scale, progress=progress, others_per_function=others_per_function,
                                             resamples=resamples, level=level, seed=seed)
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
               "others_per_function": others_per_function, "resamples": resamples, "level": level,
               "ablation_mode": ablation.extra["mode"] if ablation is not None else None,
               "threads": torch.get_num_threads(), **probe_options}
    timings["total"] = sum(timings.values())
    maps = {"probe": probe, "taylor": taylor}
    example_maps = {"probe": ExampleMaps.from_scores(probe), "taylor": taylor_maps}
    sparsity_ci = {m: {t: [iv.low, iv.high] for t, iv in sparsity_intervals(v, **boot).items()}
                   for m, v in example_maps.items()}
    return Reproduction(lm.name, options, counts, probe, taylor, ablation, pva, tva, sva, result_iv,
                        {m: sparsity(s) for m, s in maps.items()},
                        {m: jaccard_matrix(s, overlap_k) for m, s in maps.items()}, stab, timings,
                        sparsity_ci=sparsity_ci, stability_ci=stab_ci, specificity=spec, methods_compared=compared,
                        intervention_examples=iv_case if result_iv is not None else None, notes=notes)


def _interventions(lm, examples, probe: HeadScores, taylor: HeadScores, spec: HeadScores, case: str,
                   notes: list[str], **options) -> tuple[InterventionResult, dict]:
    """The three-source interventions on ``examples`` and the comparison of the sources, leaving out (with a
    note) the functions without an example and the specificity source where a function has no such map."""
    present = {ex.task for ex in examples}
    functions = [t for t in probe.tasks if t in present]
    absent = [t for t in probe.tasks if t not in present]
    if absent:
        where = "a question no map saw" if case == UNSEEN else "the probe's held-out questions"
        _note(notes, f"interventions: no intervention rows for {', '.join(printable(t) for t in absent)}: no "
                     f"example of {where} (use a smaller max per function to leave more questions unseen).")
    unmapped = [t for t in functions if t in no_specificity(spec)]
    sources = {"probe": probe, "taylor": taylor}
    if len(unmapped) < len(functions):
        sources["specificity"] = spec
    result = intervene(lm, examples, sources, functions=functions, **options)
    if unmapped and "specificity" in sources:  # intervene measures every source for every function
        result.rows = [r for r in result.rows if not (r["source"] == "specificity" and r["function"] in unmapped)]
        _note(notes, "interventions: no specificity rows for "
                     f"{', '.join(printable(t) for t in unmapped)} (their first heads were measured, not reported), "
                     "and the comparison of sources leaves specificity out: its mean would cover fewer functions.")
        summary_of = dataclasses.replace(result, sources=["probe", "taylor"])
    else:
        summary_of = result
    return result, summary_of.source_summary() if len(functions) > 1 else {}
