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


def _decoder_classifier(pad_token_id):
    """A tiny float64 LlamaForSequenceClassification (it pools each row's last token that is not
    config.pad_token_id) with the byte tokenizer, whose own pad id is 0."""
    import transformers
    from tiny import ByteTokenizer

    from headscore.models import LoadedModel

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=256, pad_token_id=pad_token_id, bos_token_id=1,
                                   eos_token_id=2, num_labels=3)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification._from_config(cfg, attn_implementation="eager")
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return LoadedModel(model, ByteTokenizer(), "clf")


def test_a_decoder_classifier_is_padded_with_its_own_pad_id():
    """A classifier that pools by config.pad_token_id is padded with that id: a batch of three gives what one
    example at a time gives (padded with the tokenizer's 0 while the config said 2, a row pooled a padding token:
    losses 3.11 vs 2.77); without a pad id in its config, batches of more than one are one line (transformers'
    ValueError was a traceback)."""
    from headscore.data.examples import Example

    examples = [Example.labelled("ab", 1, "t"), Example.labelled("abcdefghij", 2, "t"),
                Example.labelled("abcd", 0, "t")]
    lm = _decoder_classifier(2)
    assert lm.pad_id == 2 and lm.tokenizer.pad_token_id == 0
    one, three = (headscore.ablate_heads(lm, examples, [(0, 0)], batch_size=b, progress=False)["t"] for b in (1, 3))
    # float64 but for eager attention's softmax, in float32 (rows of other lengths round otherwise): 1e-6
    assert one.clean_loss == pytest.approx(three.clean_loss, rel=1e-6) and one.delta == pytest.approx(three.delta,
                                                                                                       rel=1e-6)
    scored = [headscore.score(lm, examples, batch_size=b, progress=False).values for b in (1, 3)]
    torch.testing.assert_close(scored[0], scored[1], rtol=1e-6, atol=1e-6 * float(scored[0].abs().max()))
    lm = _decoder_classifier(None)
    assert headscore.ablate_heads(lm, examples, [(0, 0)], batch_size=1, progress=False)["t"].clean_loss == \
        pytest.approx(one.clean_loss, abs=1e-12)
    with pytest.raises(HeadscoreError, match="LlamaForSequenceClassification finds each example's last token by "
                                             "config.pad_token_id, which this model's config does not set"):
        headscore.score(lm, examples, batch_size=3, progress=False)


def test_whisper_decoder_positions_bound_the_length():
    """WhisperForCausalLM keeps its learned positions under max_target_positions: an example longer than that is
    the one-line 'the model allows' error (an IndexError inside the model before)."""

    from model_matrix import build_model
    from tiny import ByteTokenizer

    from headscore.data.examples import Example
    from headscore.models import LoadedModel

    model = build_model("whisper", seed=1)
    lm = LoadedModel(model, ByteTokenizer(), "tiny-whisper")
    assert getattr(model.config, "max_position_embeddings", None) is None
    assert lm.max_length == model.config.max_target_positions
    with pytest.raises(HeadscoreError, match=f"has {lm.max_length + 15} tokens; the model allows {lm.max_length}"):
        headscore.score(lm, [Example("a" * (lm.max_length + 12), " b", "t")], progress=False)
