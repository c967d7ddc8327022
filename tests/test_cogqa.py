"""CogQA loader, split by question, and the reproduction (tiny model; the real file in a slow test)."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

import headscore
from headscore.data.cogqa import (
    CogQAExample,
    load_cogqa,
    question_ids,
    sample_per_function,
    split_by_question,
    split_indices_by_question,
)
from headscore.data.tasks import load_tasks

# the CogQA training split stays outside the project: $HEADSCORE_COGQA, else the team's shared folder
COGQA_FILE = Path(os.environ.get("HEADSCORE_COGQA")
                  or Path(__file__).resolve().parents[2] / "shared" / "data" / "cogqa" / "train.json")
SKILLS = ["Retrieval", "Inference", "Math Calculation"]


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(n_questions=12, rare=True):
    data = []
    for i in range(n_questions):
        subs = [{"subquestion": f"Step {j} of q{i}?", "answer": f"ans {j}-{i}", "cognitive_skill": SKILLS[(i + j) % 3]}
                for j in range(3)]
        data.append({"question": f"Question {i}:\\nline two", "answer": "final", "generated": subs})
    data[0]["generated"][1]["answer"] = 42  # numbers occur in the real file
    if rare:
        data[1]["generated"].append({"subquestion": "odd", "answer": "x", "cognitive_skill": "Induction"})
    return data


def write(tmp_path, data, name="cogqa.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_prompt_composition_and_unescaping(tmp_path):
    path = write(tmp_path, synthetic(rare=False))
    examples = load_cogqa(path, min_examples=1)
    assert len(examples) == 36 and all(isinstance(ex, CogQAExample) for ex in examples)
    ex = examples[2]  # question 0, third sub-question
    assert ex.prompt == ("Question 0:\nline two\n\n"
                         "Q: Step 0 of q0?\nA: ans 0-0\n"
                         "Q: Step 1 of q0?\nA: 42\n"
                         "Q: Step 2 of q0?\nA:")
    assert ex.target == " ans 2-0" and ex.task == SKILLS[2] and ex.question_id == 0 and ex.step == 2
    assert examples[0].prompt == "Question 0:\nline two\n\nQ: Step 0 of q0?\nA:"
    assert examples[1].target == " 42"
    assert "\\n" not in "".join(ex.prompt for ex in examples)
    assert question_ids(examples)[:4] == [0, 0, 0, 1]


def test_fractional_answers_stay_as_written(tmp_path):
    path = tmp_path / "floats.json"
    path.write_text('[{"question": "Q", "generated": ['
                    '{"subquestion": "a?", "answer": 0.00001, "cognitive_skill": "Math Calculation"},'
                    '{"subquestion": "b?", "answer": 12.50, "cognitive_skill": "Math Calculation"},'
                    '{"subquestion": "c?", "answer": 1E+23, "cognitive_skill": "Math Calculation"}]}]')
    examples = load_cogqa(path, min_examples=1)
    assert [ex.target for ex in examples] == [" 0.00001", " 12.50", " 1E+23"]
    assert examples[2].prompt.endswith("Q: a?\nA: 0.00001\nQ: b?\nA: 12.50\nQ: c?\nA:")


def test_chat_template(tmp_path):
    class Tok:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt and messages[0]["role"] == "user"
            return f"<user>{messages[0]['content']}</user><assistant>"

    examples = load_cogqa(write(tmp_path, synthetic(rare=False)), min_examples=1, chat_template=Tok())
    assert examples[1].prompt == ("<user>Question 0:\nline two\n\nQ: Step 0 of q0?\nA: ans 0-0\nQ: Step 1 of q0?"
                                  "</user><assistant>")
    assert examples[1].target == "42"


def test_rare_labels_dropped_with_warning(tmp_path):
    path = write(tmp_path, synthetic())
    with pytest.warns(UserWarning, match=r"Induction \(1\)"):
        examples = load_cogqa(path, min_examples=5)
    assert {ex.task for ex in examples} == set(SKILLS)
    assert len(load_cogqa(path, min_examples=1)) == 37
    only = load_cogqa(path, min_examples=1, functions=["Inference"])
    assert {ex.task for ex in only} == {"Inference"}


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_by_question(tmp_path, seed):
    examples = load_cogqa(write(tmp_path, synthetic(30, rare=False)), min_examples=1)
    a, b = split_by_question(examples, 0.7, seed)
    qa, qb = {ex.question_id for ex in a}, {ex.question_id for ex in b}
    assert not qa & qb and len(qa) == 21 and len(qb) == 9 and len(a) + len(b) == len(examples)
    assert split_by_question(examples, 0.7, seed) == (a, b)
    raw = synthetic(30, rare=False)
    ra, rb = split_by_question(raw, 0.7, seed)  # raw question dicts
    assert len(ra) == 21 and len(rb) == 9
    assert {r["question"] for r in ra} == {raw[q]["question"] for q in qa}  # same questions either way
    assert split_by_question(examples, 0.7, seed + 100) != (a, b)


def test_index_split_agrees_with_split_by_question(tmp_path):
    """split_by_question is the items at split_indices_by_question's positions: synthetic and real file."""
    cases = [load_cogqa(write(tmp_path, synthetic(30, rare=False)), min_examples=1), synthetic(30, rare=False)]
    if COGQA_FILE.is_file():
        with pytest.warns(UserWarning, match="dropped labels"):
            real = load_cogqa(COGQA_FILE)
        cases += [real, sample_per_function(real, 40, 0)]
    for items in cases:
        for fraction, seed in ((0.8, 0), (0.5, 1), (0.7, 7), (0.1, 3)):
            first, second = split_indices_by_question(question_ids(items), fraction, seed)
            assert sorted(first + second) == list(range(len(items)))
            assert first == sorted(first) and second == sorted(second)
            assert split_by_question(items, fraction, seed) == ([items[i] for i in first], [items[i] for i in second])
    # pinned: the split the reproductions so far were made with (random.Random(seed).shuffle of sorted ids)
    assert split_indices_by_question(list(range(10)), 0.7, 0) == ([1, 2, 3, 4, 5, 7, 8], [0, 6, 9])
    assert split_indices_by_question([3, 3, 1, 1, 1, 7, 0, 0, 5], 0.5, 2) == ([0, 1, 2, 3, 4], [5, 6, 7, 8])
    with pytest.raises(headscore.HeadscoreError, match="two distinct questions"):
        split_indices_by_question([4, 4, 4])


def test_sample_per_function(tmp_path):
    examples = load_cogqa(write(tmp_path, synthetic(30, rare=False)), min_examples=1)
    sub = sample_per_function(examples, 4, seed=3)
    assert sorted(ex.task for ex in sub) == sorted(SKILLS * 4)
    assert sub == sample_per_function(examples, 4, seed=3)
    assert all(examples.index(x) < examples.index(y) for x, y in zip(sub, sub[1:], strict=False))


def test_bad_files(tmp_path):
    with pytest.raises(headscore.HeadscoreError, match="no such CogQA file"):
        load_cogqa(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(headscore.HeadscoreError, match="malformed JSON"):
        load_cogqa(bad)
    with pytest.raises(headscore.HeadscoreError, match="sub-question 0"):
        load_cogqa(write(tmp_path, [{"question": "q", "generated": [{"subquestion": "s"}]}], "x.json"))
    with pytest.raises(headscore.HeadscoreError, match="non-empty JSON list"):
        load_cogqa(write(tmp_path, {"question": "q"}, "y.json"))
    with pytest.raises(headscore.HeadscoreError, match="between 0 and 1"):
        split_by_question([], 1.5)


def test_cli_task_spec(tmp_path):
    path = write(tmp_path, synthetic(rare=False))
    assert load_tasks(f"cogqa:{path}") == load_cogqa(path)


@pytest.mark.slow  # 2 min in a shared CI run: the whole study (probe, ablation, interventions) on a tiny model
def test_reproduction_tiny(tmp_path):
    from headscore.cogqa import reproduce_cogqa

    path = write(tmp_path, synthetic(12, rare=False))
    # 3 examples per function in the ablation: 75% intervals are the most they hold (stats.min_examples_for)
    rep = reproduce_cogqa(tiny_model("llama"), path, max_per_function=None, min_examples=1, seeds=(0, 1),
                          progress=False, epochs=20, level=0.75)
    assert rep.probe.method == "probe" and rep.taylor.method == "taylor" and rep.ablation.method == "ablation-zero"
    assert rep.probe.tasks == ["Retrieval", "Math Calculation", "Inference"]  # the study's order
    assert set(rep.probe_vs_ablation) == set(rep.taylor_vs_ablation) == set(rep.probe.tasks)
    assert set(rep.same_examples_vs_ablation) == set(rep.probe.tasks)
    assert rep.counts["train"] + rep.counts["test"] == 36 and rep.counts["ablation"] == 9  # 3 per function
    # three sources of top-k heads, one table row per (function, source), each with intervals and a p-value
    assert rep.interventions.sources == ["probe", "taylor", "specificity"] and len(rep.interventions.rows) == 9
    assert all(len(r["own_dloss_ci"]) == 2 and 0 < r["p_own_vs_random"] <= 1 for r in rep.interventions.rows)
    assert set(rep.methods_compared["differences"]) == {"probe - taylor", "probe - specificity",
                                                        "taylor - specificity"}
    assert rep.specificity.method == "specificity-taylor" and rep.specificity.tasks == rep.taylor.tasks
    for agree in (rep.probe_vs_ablation, rep.taylor_vs_ablation, rep.same_examples_vs_ablation):
        for a in agree.values():
            assert a["spearman_ci"][0] <= a["spearman"] <= a["spearman_ci"][1]
    for m in ("probe", "taylor"):
        for t, (low, high) in rep.sparsity_ci[m].items():
            assert low <= rep.sparsity[m][t] <= high
        assert set(rep.stability_ci[m]) == set(rep.stability[m])
    text = rep.markdown()  # figures and files: written in the slow test (matplotlib is slow here)
    for name in ("grid_probe.png", "grid_taylor.png", "grid_ablation.png", "scatter_probe.png", "jaccard_probe.png",
                 "layer_profiles.png", "Held-out accuracy", "| Inference |", "grid_specificity.png",
                 "Which map picks heads that matter?", "| taylor - specificity |", "bootstrap intervals"):
        assert name in text
    summary = rep.summary()
    assert summary["counts"]["examples"] == 36 and summary["options"]["resamples"] == 1000
    assert summary["interventions"]["per_example"]["sets"][0] == "clean"


@pytest.mark.slow  # 4.5 min on one CPU thread, mostly the head-by-head ablation of 2 examples
def test_reproduction_on_real_cogqa(tmp_path):
    """The whole reproduction on a small subset of the real CogQA file (CI runs it when the file is there)."""
    if not COGQA_FILE.is_file():
        pytest.skip(f"the shared CogQA file {COGQA_FILE} is absent")
    from headscore.cogqa import REPRODUCTION_FILES, reproduce_cogqa

    torch.set_num_threads(1)
    start = time.perf_counter()
    # the two functions with the shortest examples keep the head-by-head ablation (271 passes) cheap
    rep = reproduce_cogqa("smollm2-135m", COGQA_FILE, max_per_function=4, ablation_per_function=1,
                          intervention_per_function=1, seeds=(0,), functions=["Retrieval", "Knowledge Recall"],
                          progress=False)
    report = rep.write(tmp_path)
    for name in ("grid_probe.png", "grid_taylor.png", "grid_ablation.png", "scatter_taylor.png", "jaccard_taylor.png",
                 "jaccard_taylor.pdf", "layer_profiles.png", "layer_profiles.pdf", "probe.hs", "summary.json",
                 "interventions.md", "grid_specificity.png", "specificity.hs"):
        assert (tmp_path / name).is_file()
    assert {p.name for p in tmp_path.iterdir()} <= set(REPRODUCTION_FILES)  # what the CLI checks before writing
    assert "![probe](grid_probe.png)" in report.read_text()
    assert headscore.HeadScores.load(tmp_path / "probe.hs").extra["probe_accuracy"] == \
        rep.probe.extra["probe_accuracy"]
    assert rep.probe.values.shape == (2, 30, 9) and rep.ablation.values.shape == (2, 30, 9)
    assert 0.0 <= rep.probe.extra["probe_accuracy"] <= 1.0
    assert all(-1 <= a["spearman"] <= 1 for a in rep.taylor_vs_ablation.values())
    assert (tmp_path / "report.md").is_file()
    print(f"reproduction on 8 examples of 2 functions: {time.perf_counter() - start:.0f}s; probe accuracy "
          f"{rep.probe.extra['probe_accuracy']:.3f}; spearman vs ablation: probe "
          f"{ {t: round(a['spearman'], 3) for t, a in rep.probe_vs_ablation.items()} }, taylor "
          f"{ {t: round(a['spearman'], 3) for t, a in rep.taylor_vs_ablation.items()} }")


@pytest.mark.slow  # 40 s in a shared CI run
def test_reproduction_same_examples_check(tmp_path):
    """When every example is ablated, taylor on "the ablated examples" is the taylor map itself."""
    from headscore.cogqa import reproduce_cogqa

    path = write(tmp_path, synthetic(4, rare=False))
    rep = reproduce_cogqa(tiny_model("llama"), path, max_per_function=None, ablation_per_function=100,
                          intervention_per_function=0, stability=False, min_examples=1, progress=False, epochs=5)
    assert rep.counts["ablation"] == rep.counts["examples"] == 12
    for t in rep.probe.tasks:
        got, want = rep.same_examples_vs_ablation[t], rep.taylor_vs_ablation[t]
        assert got["spearman"] == pytest.approx(want["spearman"], abs=1e-9)
        assert got["topk_overlap"] == want["topk_overlap"]
