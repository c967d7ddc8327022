"""example_losses: logits only at each row's target positions, equal to the loss from the full logits."""

import pytest
import torch
from tiny import random_examples, tiny_model

import headscore
from headscore.loss import _vocabulary_checked, example_losses, losses_from_logits, target_positions

pytestmark = pytest.mark.numerics


def full_logit_losses(model, batch):
    """The reference: every position's logits, then the batch's target span."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return losses_from_logits(logits, batch)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2 soft-caps its logits after the head
def test_gathered_logits_equal_full_logits(family):
    lm = tiny_model(family, dtype=torch.float64)
    prep = headscore.prepare(lm, random_examples(9, seed=2))
    for batch in prep.batches(4, progress=False):
        with torch.no_grad():
            got = example_losses(lm.model, batch)
        torch.testing.assert_close(got, full_logit_losses(lm.model, batch), rtol=1e-12, atol=1e-12)
    assert getattr(lm.model, "_headscore_gather_head", True)  # the fast path was taken


def test_target_positions_packs_each_rows_targets():
    lm = tiny_model("llama", layers=1)
    prep = headscore.prepare(lm, random_examples(6, seed=5))
    batch = next(iter(prep.batches(6, progress=False)))
    pred, labels, mask = target_positions(batch)
    for r in range(batch.size):
        tokens = batch.target_mask[r].nonzero().flatten()
        n = len(tokens)
        assert mask[r].sum() == n and torch.equal(pred[r, :n], tokens - 1)
        assert torch.equal(labels[r, :n], batch.input_ids[r, tokens])


def test_head_that_sees_other_inputs_falls_back_to_the_span():
    """A model whose output embedding is not what produces its logits: the losses are still right, and the
    model is remembered as one to compute the span for."""
    lm = tiny_model("llama", dtype=torch.float64)
    decoy = torch.nn.Linear(4, 4)
    lm.model.get_output_embeddings = lambda: decoy
    prep = headscore.prepare(lm, random_examples(5, seed=1))
    batch = next(iter(prep.batches(5, progress=False)))
    with torch.no_grad():
        got = example_losses(lm.model, batch)
    torch.testing.assert_close(got, full_logit_losses(lm.model, batch), rtol=1e-12, atol=1e-12)
    assert lm.model._headscore_gather_head is False


def _counterfactual_batch(lm, seed: int = 4):
    from test_counterfactual import counterfactual_examples

    prep = headscore.prepare(lm, counterfactual_examples(6, seed=seed))
    return next(iter(prep.batches(6, progress=False)))


def _reference_logit_diff(model, batch):
    """-(logit[target] - logit[foil]) at each row's answer position, from every logit of a plain forward."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    positions, labels, _ = target_positions(batch)
    rows = torch.arange(batch.size)
    answer = logits[rows, positions[:, 0]].double()
    return -(answer[rows, labels[:, 0]] - answer[rows, batch.foil_ids])


@pytest.fixture
def subset_spy(monkeypatch):
    """Records, for each forward pass through ``vocabulary_only``, whether only some logits were computed."""
    import contextlib

    from headscore import loss

    seen: list[bool] = []
    real = loss.vocabulary_only

    @contextlib.contextmanager
    def spy(model, vocabulary):
        with real(model, vocabulary) as subset:
            seen.append(subset)
            yield subset

    monkeypatch.setattr(loss, "vocabulary_only", spy)
    return seen


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])  # gemma2 soft-caps its logits after the head
def test_logit_diff_from_two_logits_equals_every_logit(family, subset_spy):
    """Without gradients, logit-diff computes the target's and the foil's logits only (once the model passed
    the check), and gets the losses every logit gives."""
    from test_ablation import tiny_gpt2

    from headscore.loss import read_vocabulary, trusted_vocabulary

    lm = tiny_gpt2(layers=2, seed=1) if family == "gpt2" else tiny_model(family, dtype=torch.float64)
    batch = _counterfactual_batch(lm)
    metric = headscore.loss.resolve_metric("logit-diff")
    vocabulary = read_vocabulary(metric, batch)
    assert torch.equal(vocabulary, torch.unique(torch.cat([target_positions(batch)[1][:, 0], batch.foil_ids])))
    assert len(vocabulary) < lm.model.config.vocab_size
    assert torch.equal(trusted_vocabulary(lm.model, metric, batch), vocabulary)
    subset_spy.clear()
    with torch.no_grad():
        got = example_losses(lm.model, batch, metric)
    assert subset_spy == [True]
    torch.testing.assert_close(got, _reference_logit_diff(lm.model, batch), rtol=1e-12, atol=1e-12)


def test_gradient_passes_compute_every_logit(subset_spy):
    """Where a gradient flows the head computes every logit (the gradient scores stay bit for bit as they were)."""
    from headscore.loss import trusted_vocabulary

    lm = tiny_model("llama", dtype=torch.float64)
    batch = _counterfactual_batch(lm)
    metric = headscore.loss.resolve_metric("logit-diff")
    assert trusted_vocabulary(lm.model, metric, batch) is not None
    subset_spy.clear()
    example_losses(lm.model, batch, metric).sum().backward()
    assert subset_spy == [False]


@pytest.mark.parametrize("change", ["softmax", "hooked"])
def test_model_whose_logits_need_every_token_is_not_trusted(change, subset_spy):
    """A model that changes the logits after its head in a way that depends on the other tokens (here: a softmax
    over what it gets), or whose head carries a forward hook: the check refuses the two-logit path, and the
    losses are those of every logit."""
    from headscore.loss import trusted_vocabulary

    lm = tiny_model("llama", dtype=torch.float64)
    model = lm.model
    if change == "softmax":
        forward = model.forward

        def renormalised(*args, **kwargs):
            out = forward(*args, **kwargs)
            out.logits = torch.softmax(out.logits, -1)  # (a log-softmax would keep every logit-diff)
            return out

        model.forward = renormalised
    else:
        model.get_output_embeddings().register_forward_hook(lambda m, a, out: out)
    batch = _counterfactual_batch(lm)
    metric = headscore.loss.resolve_metric("logit-diff")
    assert trusted_vocabulary(model, metric, batch) is None
    assert not _vocabulary_checked(model)
    subset_spy.clear()
    with torch.no_grad():
        got = example_losses(model, batch, metric)
    assert subset_spy == [False]
    torch.testing.assert_close(got, _reference_logit_diff(model, batch), rtol=1e-12, atol=1e-12)


def _softmax_logits(out):
    out.logits = torch.softmax(out.logits, -1)
    return out


@pytest.mark.parametrize("change", ["head hooked", "forward wrapped", "model hooked"])
def test_model_changed_after_the_check_gets_every_logit(change, subset_spy):
    """A model changed after it passed the check (its head hooked, or its logits renormalised by a wrapper of
    its forward or by a forward hook): the passes compute every logit again, with no error."""
    from headscore.loss import trusted_vocabulary

    lm = tiny_model("llama", dtype=torch.float64)
    model = lm.model
    batch = _counterfactual_batch(lm)
    metric = headscore.loss.resolve_metric("logit-diff")
    assert trusted_vocabulary(model, metric, batch) is not None
    if change == "head hooked":
        model.get_output_embeddings().register_forward_hook(lambda m, a, out: out)
    elif change == "forward wrapped":
        forward = model.forward
        model.forward = lambda *args, **kwargs: _softmax_logits(forward(*args, **kwargs))
    else:
        model.register_forward_hook(lambda m, a, out: _softmax_logits(out))
    assert trusted_vocabulary(model, metric, batch) is None
    subset_spy.clear()
    with torch.no_grad():
        got = example_losses(model, batch, metric)
    assert subset_spy == [False]
    torch.testing.assert_close(got, _reference_logit_diff(model, batch), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", ["nll", "prob"])
def test_metrics_over_the_whole_vocabulary_read_every_logit(metric):
    from headscore.loss import read_vocabulary

    lm = tiny_model("llama", layers=1)
    assert read_vocabulary(headscore.loss.resolve_metric(metric), _counterfactual_batch(lm)) is None


@pytest.mark.parametrize(("token", "value"), [("first", float("-inf")), ("last", "lowest")])
def test_model_that_masks_tokens_by_id_after_its_head_is_not_trusted(token, value, subset_spy):
    """A family that sets some tokens' logits by id after its head (as Chameleon suppresses its image tokens):
    with two logits the id points elsewhere or nowhere, so the two-logit pass fails or differs; the check says
    no, without an error, and the losses come from every logit (the masked token is never the metric's)."""
    from headscore.loss import read_vocabulary, trusted_vocabulary

    lm = tiny_model("llama", dtype=torch.float64)
    model = lm.model
    masked = 0 if token == "first" else model.config.vocab_size - 1
    fill = torch.finfo(torch.float64).min if value == "lowest" else value
    forward = model.forward

    def masking(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[..., masked] = fill
        return out

    model.forward = masking
    batch = _counterfactual_batch(lm)
    metric = headscore.loss.resolve_metric("logit-diff")
    assert masked not in read_vocabulary(metric, batch).tolist()
    assert trusted_vocabulary(model, metric, batch) is None
    assert _vocabulary_checked(model) is False
    subset_spy.clear()
    with torch.no_grad():
        got = example_losses(model, batch, metric)
    assert subset_spy == [False]
    torch.testing.assert_close(got, _reference_logit_diff(model, batch), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("dtype", "trusted"), [(torch.bfloat16, True), (torch.float32, False)])
def test_check_allows_the_rounding_of_the_models_own_precision(dtype, trusted):
    """The two ways may round apart by the head's products in the model's precision: a bfloat16 model is allowed
    5e-2 (1 + |loss|), a float32 one 1e-3 (1 + |loss|), though logit-diff losses are float32 for both. Here the
    two-logit pass is made to give each target's logit 0.03 less: inside the first bound, outside the second."""
    from headscore.loss import _builtin_losses, read_vocabulary, trusted_vocabulary

    lm = tiny_model("llama", dtype=dtype)
    model = lm.model
    batch = _counterfactual_batch(lm)
    metric = headscore.loss.resolve_metric("logit-diff")
    vocabulary = read_vocabulary(metric, batch)
    column = torch.searchsorted(vocabulary, target_positions(batch)[1][:, 0].contiguous())  # each row's target
    forward = model.forward

    def apart(*args, **kwargs):
        out = forward(*args, **kwargs)
        if out.logits.shape[-1] == len(vocabulary):
            lower = torch.arange(len(vocabulary))[None, None] == column[:, None, None]
            out.logits = out.logits - 0.03 * lower.to(out.logits.dtype)
        return out

    model.forward = apart
    with torch.no_grad():
        full = _builtin_losses(model, batch, metric, None)
        two = _builtin_losses(model, batch, metric, vocabulary)
    gap, size = (two - full).abs(), 1 + full.abs()
    assert bool((gap > 1e-3 * size).any()) and bool((gap <= 5e-2 * size).all())
    assert (trusted_vocabulary(model, metric, batch) is not None) is trusted


@pytest.mark.parametrize("mode", ["naive", "batched"])
def test_first_clean_pass_reads_the_logits_the_changed_passes_read(mode, subset_spy):
    """On a model's first run the clean losses come from the same logits as the changed ones (the check runs
    before the clean pass), so a change of nothing changes the loss by exactly 0."""
    from test_counterfactual import counterfactual_examples

    lm = tiny_model("llama", dtype=torch.float64)
    examples = counterfactual_examples(6, seed=4)
    result = headscore.ablate_heads(lm, examples, [(0, 0)], gate=1.0, metric="logit-diff", batch_size=6,
                                    progress=False)
    assert subset_spy == [False, True, True, True]  # the check (every logit, then two), clean, changed
    assert all(effect.delta == 0.0 for effect in result.values())
    subset_spy.clear()
    headscore.ablate(lm, examples, metric="logit-diff", batch_size=6, mode=mode, progress=False)
    assert subset_spy and all(subset_spy)  # checked once per model: every pass of the next run reads two
