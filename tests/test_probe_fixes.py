"""The probe's refusals: a sequence classifier (no answer tokens: every activation would be 0 / 0), an
importance split without some task (an all-NaN map); and its docstring's CogQA count agrees with the docs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny import random_examples, tiny_model
from tiny_saved import save_tiny_family

import headscore
from headscore.cli import main
from headscore.cogqa import probe as probe_module
from headscore.cogqa.probe import collect_activations, probe_scores
from headscore.data.cogqa import question_ids, split_indices_by_question

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bert_classifier(tmp_path_factory) -> headscore.LoadedModel:
    """A tiny BERT sequence classifier (3 classes) with the character tokenizer."""
    path = save_tiny_family(tmp_path_factory.mktemp("bert") / "bert", "bert")
    return headscore.load_model(str(path), progress=False)


def labelled_examples(n: int = 12) -> list[headscore.Example]:
    """(text, label, task) examples of two tasks."""
    return [headscore.Example.labelled(f"some text {'ab' * (i % 5)}", i % 3, ("x", "y")[i % 2]) for i in range(n)]


def count_forward_passes(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """A counter of the model's forward passes (a hook on the whole model)."""
    calls: list[int] = []
    return calls, model.register_forward_hook(lambda *_: calls.append(1))


def test_probe_refuses_a_sequence_classifier_before_any_pass(bert_classifier):
    """The classifier's batches have no target tokens: the activations were all NaN and so was the map; now
    one line, and not one forward pass (not even prepare's check of the heads)."""
    calls, handle = count_forward_passes(bert_classifier.model)
    try:
        with pytest.raises(headscore.HeadscoreError) as err:
            probe_scores(bert_classifier, labelled_examples(), progress=False)
    finally:
        handle.remove()
    message = str(err.value)
    assert "\n" not in message
    assert "BertForSequenceClassification is a sequence classifier" in message and "answer tokens" in message
    assert calls == []


def test_collect_activations_refuses_an_example_without_answer_positions(bert_classifier):
    """Defence in depth: a row whose averaging weights sum to 0 (here every row: a classifier's examples have
    no target) is refused, naming the examples, instead of filling the activations with NaN."""
    examples = labelled_examples(4)
    prep = headscore.prepare(bert_classifier, examples)
    assert not any(bool(b.target_mask.any()) for b in prep.batches(8, progress=False))  # the premise
    with pytest.raises(headscore.HeadscoreError) as err:
        collect_activations(prep, 8, progress=False)
    message = str(err.value)
    assert "\n" not in message and "target tokens" in message
    assert all(f"example {i}" in message for i in range(4)) and message.endswith("have none")


def test_collect_activations_of_a_causal_model_stays_finite():
    """The check lets ordinary examples through (both kinds of positions)."""
    lm = tiny_model("llama")
    prep = headscore.prepare(lm, random_examples(5))
    for positions in ("target", "predict"):
        assert torch.isfinite(collect_activations(prep, 2, positions=positions, progress=False)).all()


def test_cli_probe_on_a_classifier_exits_2(tmp_path, capsys):
    """``headscore score --method probe`` on a classifier exited 0 with an all-NaN map; now exit 2, one line,
    nothing written."""
    model = save_tiny_family(tmp_path / "bert", "bert")
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"text": ex.prompt, "label": ex.label, "task": ex.task}) + "\n"
                             for ex in labelled_examples(20)))
    out = tmp_path / "p.hs"
    capsys.readouterr()  # what saving the model printed
    code = main(["score", "--model", str(model), "--tasks", str(tasks), "--method", "probe", "--out", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("headscore: error: the probe averages each head's output over the answer tokens")
    assert err.count("\n") == 1 and not out.exists()


def _tasks_missing_from(examples, part: str, seed: int = 0) -> list[str]:
    """The tasks without an example on one side of the probe's split, computed from the split itself."""
    train, test = split_indices_by_question(question_ids(examples), 0.8, seed)
    rows = {"train": train, "test": test}[part]
    present = {examples[i].task for i in rows}
    return sorted({ex.task for ex in examples} - present)


def test_importance_on_a_split_without_some_task_is_refused():
    """Twelve examples of four tasks hold out two: importance_on='test' gave the other two tasks all-NaN maps.
    Now one line naming them and the split, before any forward pass."""
    lm = tiny_model("llama")
    examples = random_examples(12, tasks=("a", "b", "c", "d"))
    missing = _tasks_missing_from(examples, "test")
    assert missing  # the premise: some task has no held-out example
    calls, handle = count_forward_passes(lm.model)
    try:
        with pytest.raises(headscore.HeadscoreError) as err:
            probe_scores(lm, examples, importance_on="test", progress=False)
    finally:
        handle.remove()
    message = str(err.value)
    assert "\n" not in message and message.startswith("importance_on='test': the held-out split has no example of ")
    assert all(f"'{task}' (3 in all)" in message for task in missing)
    assert all(f"'{task}'" not in message for task in "abcd" if task not in missing)
    assert "importance_on='all'" in message and "more examples" in message
    assert len(calls) <= 1  # at most prepare's one check of the heads (once per model), no activations


def test_importance_on_a_split_with_every_task_is_finite():
    """Where each side of the split has every task, 'train' and 'test' give finite maps over those rows."""
    lm = tiny_model("llama")
    examples = random_examples(30)
    assert not _tasks_missing_from(examples, "test") and not _tasks_missing_from(examples, "train")
    for part in ("train", "test"):
        scores = probe_scores(lm, examples, importance_on=part, progress=False, epochs=5)
        assert torch.isfinite(scores.values).all()
        train, test = split_indices_by_question(question_ids(examples), 0.8, 0)
        assert int(scores.counts.sum()) == len({"train": train, "test": test}[part])


def test_probe_docstring_counts_the_examples_the_docs_count():
    """The module docstring's number of CogQA examples is the one docs/cogqa.md gives."""
    pattern = r"([\d,]+)\s+CogQA\s+examples\s+on\s+SmolLM2-135M"
    ours = re.search(pattern, probe_module.__doc__)
    theirs = re.search(pattern, (ROOT / "docs" / "cogqa.md").read_text())
    assert ours and theirs and ours.group(1) == theirs.group(1) == "2,683"

