"""What the CogQA reproduction's report says about its own limits: where the intervention examples come from,
functions or sources left out, a stage that could not run or was skipped, and figures whose text fits
(tiny model, synthetic CogQA-format data; each run a few seconds)."""

import json
import math
import warnings

import pytest
import torch
from named_pipes import fed_pipe
from tiny import tiny_model
from tiny_saved import save_tiny_model

import headscore.cogqa.reproduce as reproduce
from headscore.cli import main
from headscore.cogqa.findings import jaccard_matrix, plot_jaccard, plot_layer_profiles
from headscore.data.cogqa import load_cogqa, sample_per_function, split_by_question
from headscore.results import HeadScores

pytestmark = pytest.mark.usefixtures("one_thread")

SKILLS = ["Retrieval", "Inference", "Math Calculation"]
FAST = {"min_examples": 1, "seeds": (0,), "k": 2, "progress": False, "epochs": 5, "resamples": 0,
        "ablation_per_function": 0, "stability": False}


def question(i: int, skills) -> dict:
    return {"question": f"Question {i}?", "answer": "x",
            "generated": [{"subquestion": f"s{j} of q{i}?", "answer": f"a{j}{i}", "cognitive_skill": s}
                          for j, s in enumerate(skills)]}


def cycled(n: int) -> list[dict]:
    """``n`` questions of three sub-questions, one of each skill."""
    return [question(i, [SKILLS[(i + j) % 3] for j in range(3)]) for i in range(n)]


def write(tmp_path, data, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def seen(monkeypatch):
    """The examples each run's interventions measure."""
    got = {}
    original = reproduce.intervene

    def spy(lm, examples, scores, **kw):
        got["examples"], got["sources"] = list(examples), list(scores)
        return original(lm, examples, scores, **kw)

    monkeypatch.setattr(reproduce, "intervene", spy)
    return got


def test_interventions_on_unseen_questions(tmp_path, seen):
    path = write(tmp_path, cycled(20))
    rep = reproduce.reproduce_cogqa(tiny_model("llama"), path, max_per_function=2, intervention_per_function=2,
                                    **FAST)
    maps = sample_per_function(load_cogqa(path, min_examples=1), 2, 0)  # the maps' examples, as the run picks them
    assert not {ex.question_id for ex in seen["examples"]} & {ex.question_id for ex in maps}
    assert rep.summary()["intervention_examples"] == "unseen questions"
    first = rep.markdown().split("\n")[2]
    assert "(at most 2 per function," in first
    assert "Interventions on 6 examples of questions no map saw." in first
    assert "Ablation skipped" in first and "Ablation on 0" not in first


def test_interventions_on_the_held_out_split_say_the_maps_saw_them(tmp_path, seen):
    """Every question used: the interventions run on the probe's held-out questions, which every map averaged."""
    path = write(tmp_path, cycled(10))
    rep = reproduce.reproduce_cogqa(tiny_model("llama"), path, max_per_function=None, intervention_per_function=2,
                                    **FAST)
    _, held_out = split_by_question(load_cogqa(path, min_examples=1), 0.8, 0)
    assert {ex.question_id for ex in seen["examples"]} <= {ex.question_id for ex in held_out}
    assert rep.summary()["intervention_examples"] == "probe held-out split, seen by the maps"
    text = rep.markdown()
    assert "no map saw" not in text
    first = text.split("\n")[2]
    assert "(all per function," in first and "at most None" not in first
    assert ("Interventions on 6 examples of the probe's held-out questions, which the taylor and specificity "
            "maps (and the probe's importance) were built from: not a held-out test.") in first


def test_functions_without_unseen_examples_are_named(tmp_path, seen):
    """The unseen questions hold Math Calculation only: the other functions get no intervention rows, and the
    run says which and why."""
    data = [question(i, ["Retrieval", "Inference"]) for i in range(6)]
    data += [question(i, ["Math Calculation"]) for i in range(6, 18)]
    path = write(tmp_path, data)
    with pytest.warns(UserWarning, match="no intervention rows for Retrieval, Inference: no example of a question"):
        rep = reproduce.reproduce_cogqa(tiny_model("llama"), path, max_per_function=6, intervention_per_function=2,
                                        **FAST)
    assert rep.interventions.functions == ["Math Calculation"]
    notes = [n for n in rep.summary()["notes"] if "no intervention rows" in n]
    assert len(notes) == 1 and "Retrieval, Inference" in notes[0]
    assert notes[0] in rep.markdown()


def test_specificity_without_finite_values_is_no_source(tmp_path, seen):
    """One taylor example per function: no standard error, so no specificity anywhere; no 'top-k by specificity'
    set, no 'most specific heads' (they were the first heads in head order, z = nan)."""
    path = write(tmp_path, cycled(20))
    with pytest.warns(UserWarning, match="fewer than 2 taylor examples"):
        rep = reproduce.reproduce_cogqa(tiny_model("llama"), path, max_per_function=3, gradient_per_function=1,
                                        intervention_per_function=2, **FAST)
    assert not torch.isfinite(rep.specificity.values).any()
    assert seen["sources"] == ["probe", "taylor"]
    assert rep.interventions.sources == ["probe", "taylor"]
    assert {r["source"] for r in rep.interventions.rows} == {"probe", "taylor"}
    assert set(rep.methods_compared["sources"]) == {"probe", "taylor"}
    assert rep.specificity_top() == {}
    text = rep.markdown()
    assert "nan" not in text.split("## Findings")[0].split("### specificity")[1]
    assert "| Retrieval | L" not in text
    assert any("fewer than 2 taylor examples" in n for n in rep.notes)
    assert "fewer than 2 taylor examples" in text


def test_specificity_missing_for_one_function_drops_its_rows(tmp_path, seen, monkeypatch):
    """Specificity for some functions only: the others keep their specificity rows; the comparison of sources
    (a mean over functions) leaves specificity out."""
    original = reproduce.specificity

    def without_inference(scores):
        spec = original(scores)
        spec.values[spec.tasks.index("Inference")] = math.nan
        return spec

    monkeypatch.setattr(reproduce, "specificity", without_inference)
    path = write(tmp_path, cycled(20))
    with pytest.warns(UserWarning, match="no other function with a standard error"), \
            pytest.warns(UserWarning, match="leaves specificity out"):
        rep = reproduce.reproduce_cogqa(tiny_model("llama"), path, max_per_function=3, intervention_per_function=2,
                                        **FAST)
    rows = {(r["source"], r["function"]) for r in rep.interventions.rows}
    assert ("specificity", "Inference") not in rows and ("specificity", "Retrieval") in rows
    assert ("taylor", "Inference") in rows
    assert set(rep.methods_compared["sources"]) == {"probe", "taylor"}
    assert "Inference" not in rep.specificity_top() and "Retrieval" in rep.specificity_top()
    assert any("leaves specificity out" in n for n in rep.notes)


def test_stability_without_a_probe_for_one_half(tmp_path):
    """Inference is in two questions: the run's probe trains on one, but one half's probe would train on none.
    The run finishes; the probe's stability is n/a with a note, taylor's is computed."""
    data = [question(i, ["Retrieval", "Math Calculation"] + (["Inference"] if i in (0, 6) else []))
            for i in range(8)]
    path = write(tmp_path, data)
    opts = {**FAST, "stability": True}
    with pytest.warns(UserWarning, match="stability"):
        rep = reproduce.reproduce_cogqa(tiny_model("llama"), path, max_per_function=None,
                                        intervention_per_function=0, **opts)
    assert "probe" not in rep.stability and set(rep.stability["taylor"]) == set(rep.taylor.tasks)
    note = next(n for n in rep.notes if "stability" in n)
    assert "half 1" in note and "'Inference'" in note
    text = rep.markdown()
    assert note in text
    row = next(line for line in text.split("## Findings")[1].splitlines() if line.startswith("| Retrieval |"))
    assert row.split(" | ")[3] == "n/a"
    first = text.split("\n")[2]
    assert "Interventions skipped" in first and "interventions on 0" not in first.lower()


def test_flat_map_sparsity_is_stated_for_the_model(tmp_path):
    """A flat map keeps ceil(0.05 n) of n heads: 1/12 for the tiny model's 3 x 4, not 0.05."""
    path = write(tmp_path, cycled(6))
    rep = reproduce.reproduce_cogqa(tiny_model("llama"), path, max_per_function=None, intervention_per_function=0,
                                    **FAST)
    flat = math.ceil(0.05 * 12) / 12
    assert f"a flat map gives {flat:.3f}" in rep.markdown()
    assert "gives 0.05)" not in rep.markdown()


def _drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_specificity_colour_bar_label_fits(tmp_path):
    from headscore.report.heatmaps import build_heatmap_figure

    values = torch.randn(3, 3, 4, dtype=torch.float64)
    spec = HeadScores(values, torch.ones_like(values), torch.full((3,), 5), SKILLS, "specificity-taylor", "m", "h")
    fig = build_heatmap_figure(spec, title="specificity of taylor: each function vs the others (m on CogQA)",
                               label=reproduce.SPECIFICITY_LABEL, diverging=True)
    renderer = _drawn(fig)
    label = next(ax.yaxis.label for ax in fig.axes if ax.yaxis.label.get_text() == reproduce.SPECIFICITY_LABEL)
    box = label.get_window_extent(renderer)
    assert 0 <= box.y0 and box.y1 <= fig.bbox.y1 and box.x1 <= fig.bbox.x1


def test_jaccard_title_clear_of_colour_bar_and_layer_ticks_whole(tmp_path, monkeypatch):
    import headscore.cogqa.findings as findings

    figures = []
    monkeypatch.setattr(findings, "save_figure", lambda fig, path: figures.append(fig) or [])
    values = torch.randn(3, 3, 4, dtype=torch.float64)
    tasks = ["Retrieval", "Knowledge Recall", "Math Calculation"]  # the title ran under the colour bar here
    scores = HeadScores(values, torch.ones_like(values), torch.full((3,), 5), tasks, "taylor", "m", "h")
    plot_jaccard(jaccard_matrix(scores, 4), tasks, tmp_path / "j", title="top-10 overlap (taylor)")
    plot_layer_profiles({"taylor": scores}, tmp_path / "p")
    jaccard, profiles = figures
    renderer = _drawn(jaccard)
    title = next(t for t in [jaccard._suptitle, *(ax.title for ax in jaccard.axes)]
                 if t is not None and t.get_text() == "top-10 overlap (taylor)")
    box = title.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in jaccard.axes)
    assert 0 <= box.x0 and box.x1 <= jaccard.bbox.x1 and box.y1 <= jaccard.bbox.y1
    _drawn(profiles)
    ticks = [t for t in profiles.axes[0].get_xticks() if -0.5 <= t <= 2.5]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_reproduce_cogqa_reads_a_pipe_once(tmp_path, capsys):
    """``reproduce-cogqa <(cmd)``: the file is read once (load_cogqa), so a pipe works (a second read would fail
    the run, see ``fed_pipe``)."""
    model = save_tiny_model(tmp_path / "model")
    with fed_pipe(tmp_path / "c.fifo", json.dumps(cycled(12))) as fifo:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(["reproduce-cogqa", str(fifo), "--model", str(model), "--out", str(tmp_path / "r"),
                         "--max-per-function", "3", "--ablation-per-function", "0", "--intervention-per-function",
                         "0", "--resamples", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["counts"]["examples"] == 9
