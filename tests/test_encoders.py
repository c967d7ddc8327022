"""Encoders (BERT, ModernBERT) with a sequence-classification head: scored on their own loss from labels,
through the same engine and command line, from ``{"text", "label", "task"}`` JSONL."""

import json

import pytest
import torch
from tiny_saved import save_tiny_family

import headscore
from headscore.cli import main
from headscore.errors import HeadscoreError
from headscore.loss import classifier_losses

TEXTS = [("the cat sat on the mat", 0, "animals"), ("dogs bark at night!", 2, "animals"),
         ("buy 3 apples, 2 pears", 1, "shopping"), ("xyz", 0, "shopping")]


def _examples():
    return [headscore.Example.labelled(t, label, task) for t, label, task in TEXTS]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_family(tmp_path_factory.mktemp("bert") / "bert", "bert")


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_labelled_jsonl(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": t, "label": lab, "task": task} for t, lab, task in TEXTS])
    examples = headscore.load_jsonl(path)
    assert examples == _examples()
    assert examples[1].text == "dogs bark at night!" and examples[1].label == 2 and examples[1].target == ""
    out = tmp_path / "back.jsonl"
    headscore.data.examples.save_jsonl(examples, out)
    assert headscore.load_jsonl(out) == examples


@pytest.mark.parametrize("record,message", [
    ({"text": "a", "task": "t"}, r"missing field\(s\) label"),
    ({"text": "a", "label": True, "task": "t"}, "must be a number"),
    ({"text": "a", "label": "pos", "task": "t"}, "must be a number"),
    ({"text": " ", "label": 1, "task": "t"}, "empty text"),
    ({"text": "a", "label": 1, "task": "t", "target": "b"}, "has no target"),
])
def test_bad_labelled_records(tmp_path, record, message):
    with pytest.raises(HeadscoreError, match=message):
        headscore.load_jsonl(_jsonl(tmp_path / "d.jsonl", [record]))


def test_mixed_kinds_are_refused(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1, "task": "t"},
                                         {"prompt": "a", "target": " b", "task": "t"}])
    with pytest.raises(HeadscoreError, match=":2: labelled examples .* cannot be mixed"):
        headscore.load_jsonl(path)


@pytest.mark.numerics
def test_loss_is_the_models_own(bert_dir):
    """classifier_losses averaged over the batch equals the classifier's own forward(labels=...).loss."""
    lm = headscore.load_model(str(bert_dir), dtype="float64", progress=False)
    enc = lm.tokenizer([t for t, _, _ in TEXTS], padding=True, return_tensors="pt")
    labels = torch.tensor([lab for _, lab, _ in TEXTS])
    with torch.no_grad():
        out = lm.model(**enc, labels=labels)
    mine = classifier_losses(out.logits, labels, lm.model.config)
    assert mine.shape == (4,)
    torch.testing.assert_close(mine.mean(), out.loss, rtol=1e-12, atol=0)


def test_regression_head_loss():
    """One output (or problem_type regression): squared error per row, as the model's MSE loss."""
    config = type("C", (), {"problem_type": None})()
    logits = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    got = classifier_losses(logits, torch.tensor([1.0, 1.0]), config)
    torch.testing.assert_close(got, torch.tensor([0.25, 1.0], dtype=torch.float64))
    with pytest.raises(HeadscoreError, match="class indices 0..2"):
        classifier_losses(torch.zeros(2, 3), torch.tensor([0, 3]), config)


def test_score_and_ablate_a_classifier(bert_dir):
    """The engine scores the classifier's heads: ablation of every head (prefix reuse) equals running each
    ablation alone, and taylor (first order) has the sign of ablation for the heads that matter most."""
    lm = headscore.load_model(str(bert_dir), dtype="float64", progress=False)
    assert type(lm.model).__name__ == "BertForSequenceClassification"
    s = headscore.score(lm, _examples(), progress=False)
    a = headscore.ablate(lm, _examples(), progress=False)
    n = headscore.ablate(lm, _examples(), mode="naive", progress=False)
    assert s.values.shape == (2, 2, 4) and s.tasks == ["animals", "shopping"]
    torch.testing.assert_close(a.values, n.values, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(s.values).all() and s.values.abs().max() > 0
    assert "classifier's own loss" in s.extra["metric_meaning"]


@pytest.mark.parametrize("kwargs,message", [
    ({"metric": "logit-diff"}, "scored on its own loss from the labels"),
    ({"per_position": True}, "no answer position"),
    ({"baseline": "corrupt"}, "labelled examples have none"),
])
def test_classifier_refuses_what_it_cannot_serve(bert_dir, kwargs, message):
    lm = headscore.load_model(str(bert_dir), progress=False)
    with pytest.raises(HeadscoreError, match=message):
        headscore.score(lm, _examples(), progress=False, **kwargs)


def test_classifier_needs_labelled_examples(bert_dir):
    lm = headscore.load_model(str(bert_dir), progress=False)
    with pytest.raises(HeadscoreError, match="is a sequence classifier: its examples are"):
        headscore.score(lm, [headscore.Example("a", " b", "t")], progress=False)


def test_cli_scores_a_classifier(bert_dir, tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t, "label": lab, "task": task} for t, lab, task in TEXTS])
    out = tmp_path / "s.hs"
    assert main(["score", "--model", str(bert_dir), "--tasks", str(data), "--out", str(out)]) == 0
    got = headscore.HeadScores.load(out)
    want = headscore.score(headscore.load_model(str(bert_dir), progress=False), _examples(), progress=False)
    torch.testing.assert_close(got.values, want.values)
