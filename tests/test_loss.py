"""example_losses: logits only at each row's target positions, equal to the loss from the full logits."""

import pytest
import torch
from tiny import random_examples, tiny_model

import headscore
from headscore.loss import example_losses, losses_from_logits, target_positions

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
