"""Learnable hard-concrete gates: sane sampling statistics; the learned mask changes the loss as reported."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from tiny import random_examples, tiny_model

import headscore
from headscore.learn_gates import HardConcrete, apply_mask, learn_gates, mask_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hard_concrete_statistics():
    hc = HardConcrete((5,), init=0.0)
    with torch.no_grad():
        hc.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    z = hc.sample(100_000, generator=torch.Generator().manual_seed(0)).detach()
    assert z.shape == (100_000, 5) and z.min() >= 0 and z.max() <= 1
    # P(z = 0) and P(z = 1) from the closed forms, within sampling error
    se = 0.5 / math.sqrt(z.shape[0])
    torch.testing.assert_close((z == 0).double().mean(0), hc.prob_closed().detach().double(), atol=5 * se, rtol=0)
    torch.testing.assert_close((z == 1).double().mean(0), hc.prob_one().detach().double(), atol=5 * se, rtol=0)
    assert float(hc.expected_l0().detach()) == pytest.approx(float(hc.prob_open().detach().sum()))
    # the expected L0 is monotone in log_alpha and differentiable
    hc.expected_l0().backward()
    assert (hc.log_alpha.grad > 0).all()
    det = hc.deterministic()
    assert (det >= 0).all() and (det <= 1).all() and det[0] == 0 and det[-1] == 1
    assert torch.equal(det, hc.deterministic())  # deterministic
    # samples are differentiable in log_alpha
    hc.log_alpha.grad = None
    hc.sample(4).sum().backward()
    assert hc.log_alpha.grad is not None and torch.isfinite(hc.log_alpha.grad).all()


def _overall_change(effects):
    total = sum(e.count for e in effects.values())
    return sum(e.delta * e.count for e in effects.values()) / total


def test_learned_mask_changes_loss_as_reported():
    lm = tiny_model("llama")
    examples = random_examples(12)
    result = learn_gates(lm, examples, steps=40, batch_size=4, lr=0.3, sparsity=5.0, progress=False)
    assert result.mask.dtype == torch.bool and result.mask.shape == (3, 4)
    assert 0 < result.kept < 12  # a sparser, non-empty set of heads
    assert ((result.gates >= 0) & (result.gates <= 1)).all()
    assert len(result.history) > 1 and result.history[-1]["expected_l0"] < result.history[0]["expected_l0"]
    # the mask applied through an independent path: ablate the dropped heads at once
    dropped = [(int(li), int(h)) for li, h in (~result.mask).nonzero()]
    effects = headscore.ablate_heads(lm, examples, dropped, batch_size=5, progress=False)
    assert _overall_change(effects) == pytest.approx(result.loss_change, rel=1e-4, abs=1e-6)
    clean = sum(e.clean_loss * e.count for e in effects.values()) / len(examples)
    assert clean == pytest.approx(result.loss_full, rel=1e-5)
    assert mask_losses(lm, examples, result.mask, batch_size=3) == pytest.approx(
        (result.loss_full, result.loss_masked), rel=1e-5)


def test_log_every_must_be_a_whole_number_of_at_least_one():
    lm, examples = tiny_model("llama"), random_examples(4)
    for log_every in (0, -1, 2.5, True):
        with pytest.raises(headscore.HeadscoreError) as err:
            learn_gates(lm, examples, steps=2, batch_size=2, log_every=log_every, progress=False)
        assert str(err.value) == f"learn_gates needs log_every >= 1 (a whole number), got {log_every!r}"
    history = learn_gates(lm, examples, steps=3, batch_size=2, log_every=2, progress=False).history
    assert [h["step"] for h in history] == [0, 2]  # every 2nd step, and the last


def test_apply_mask_turns_heads_off():
    lm = tiny_model("llama")
    prep = headscore.prepare(lm, random_examples(4))
    batch = next(prep.batches(4, progress=False))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False
    seen = []
    o_proj = lm.model.model.layers[1].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].view(*args[0].shape[:2], 4, 8)))
    try:
        with headscore.patch(lm.model) as heads, torch.no_grad():
            with apply_mask(heads, mask):
                lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            assert heads.gates is None
            with pytest.raises(headscore.HeadscoreError, match="mask must be"):
                with apply_mask(heads, mask[:2]):
                    pass
    finally:
        handle.remove()
    out = seen[0]
    assert (out[:, :, 2] == 0).all() and (out[:, :, [0, 1, 3]] != 0).any(-1).all()


@pytest.mark.slow
def test_example_script_on_smollm2(capsys):
    """The example, shortened: its reported loss change is what ablating the dropped heads gives."""
    path = Path(__file__).resolve().parents[1] / "examples" / "learn_gates.py"
    spec = importlib.util.spec_from_file_location("learn_gates_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--steps", "8", "--max-examples", "2", "--lr", "0.5", "--sparsity", "200"])
    printed = capsys.readouterr().out
    result = out["result"]
    assert f"kept heads: {result.kept} / 270" in printed and f"{result.loss_change:+.6f}" in printed
    dropped = [(int(li), int(h)) for li, h in (~result.mask).nonzero()]
    assert dropped, "the shortened run should drop some heads"
    effects = headscore.ablate_heads(out["lm"], out["examples"], dropped, max_examples=out["max_examples"],
                                     batch_size=out["batch_size"], progress=False)
    assert _overall_change(effects) == pytest.approx(result.loss_change, rel=1e-3, abs=1e-5)
