"""score(): every method equals the same statistic of independently computed per-example gradients."""

import pytest
import torch
from tiny import random_examples, tiny_model

import headscore

pytestmark = pytest.mark.numerics


def reference_grads(lm, examples, baseline=None):
    """dL/dg per example (unpadded, one at a time) with o_proj input hooks: [N, L, H] float64."""
    model, tok = lm.model, lm.tokenizer
    layers, heads = 3, 4
    out = []
    for ex in examples:
        p, t = tok(ex.prompt)["input_ids"], tok(ex.target, add_special_tokens=False)["input_ids"]
        g = torch.ones(layers, heads, dtype=torch.float64, requires_grad=True)
        hs = []
        for li, layer in enumerate(model.model.layers):
            def hook(module, args, li=li, g=g):
                x = args[0].view(*args[0].shape[:-1], heads, -1)
                m = 0.0 if baseline is None else baseline[li].double()
                return ((m + g[li][:, None] * (x - m)).view_as(args[0]),)
            hs.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
        logits = model(input_ids=torch.tensor([p + t])).logits[0].double()
        for h in hs:
            h.remove()
        logp = torch.log_softmax(logits, -1)
        loss = -torch.stack([logp[len(p) - 1 + i, k] for i, k in enumerate(t)]).mean()
        out.append(torch.autograd.grad(loss, g)[0])
    return torch.stack(out)


@pytest.mark.parametrize("method", ["taylor", "abs", "fisher", "atp-mean"])
def test_score_methods_match_reference(method):
    lm = tiny_model("qwen2", dtype=torch.float64)
    examples = random_examples(9)
    scores = headscore.score(lm, examples, method=method, batch_size=4, progress=False)
    baseline = headscore.mean_baseline(lm, examples, progress=False) if method == "atp-mean" else None
    grads = reference_grads(lm, examples, baseline)
    transform = {"taylor": lambda g: -g, "abs": torch.abs, "fisher": torch.square, "atp-mean": lambda g: -g}[method]
    values = transform(grads)
    assert scores.tasks == ["alpha", "beta", "gamma"] and scores.method == method
    for ti, task in enumerate(scores.tasks):
        rows = [i for i, ex in enumerate(examples) if ex.task == task]
        torch.testing.assert_close(scores.values[ti], values[rows].mean(0), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(scores.stderr[ti], values[rows].std(0) / len(rows) ** 0.5, rtol=1e-5, atol=1e-9)
        assert int(scores.counts[ti]) == len(rows)


def test_score_independent_of_batch_size_and_order():
    lm = tiny_model("llama")
    examples = random_examples(10)
    a = headscore.score(lm, examples, batch_size=3, progress=False)
    b = headscore.score(lm, list(reversed(examples)), batch_size=10, progress=False)
    assert a.tasks != b.tasks  # task order follows first appearance
    torch.testing.assert_close(a.values, b.select(a.tasks).values, rtol=1e-4, atol=1e-6)
    assert a.data_hash != b.data_hash  # the data hash follows the list as given


@pytest.mark.parametrize("head", [(0, 1), (2, 3)])
def test_taylor_is_the_derivative_of_real_gating(head):
    """(L(1 - eps) - L(1 + eps)) / (2 eps) = taylor + O(eps^2), with the gates set through the ablation path."""
    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(6)
    taylor = headscore.score(lm, examples, batch_size=3, progress=False)
    eps = 1e-3  # transformers norms run in float32 even in float64 models: ~1e-7 noise in each loss
    down, up = (headscore.ablate_heads(lm, examples, [head], gate=1 + s * eps, batch_size=3, progress=False)
                for s in (-1, 1))
    for ti, task in enumerate(taylor.tasks):
        expected = float(taylor.values[ti, head[0], head[1]])
        assert abs(expected) > 1e-3
        assert (down[task].delta - up[task].delta) / (2 * eps) == pytest.approx(expected, rel=2e-3)


def test_bad_arguments():
    lm = tiny_model("llama")
    ex = random_examples(2)
    with pytest.raises(headscore.HeadscoreError, match="unknown method"):
        headscore.score(lm, ex, method="nope")
    with pytest.raises(headscore.HeadscoreError, match="batch size"):
        headscore.score(lm, ex, batch_size=0)
    with pytest.raises(headscore.HeadscoreError, match="ablation mode"):
        headscore.ablate(lm, ex, mode="parallel")
    with pytest.raises(headscore.HeadscoreError, match="no examples"):
        headscore.score(lm, [])
    with pytest.raises(headscore.HeadscoreError, match="allows 256"):
        headscore.score(lm, [headscore.Example("x" * 300, " y", "t")], progress=False)


def test_nan_loss_is_reported():
    lm = tiny_model("llama")
    with torch.no_grad():
        lm.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(headscore.HeadscoreError, match="non-finite loss"):
        headscore.score(lm, random_examples(2), progress=False)


def test_a_first_target_token_of_whitespace_alone_is_warned_for_prob_and_logit_diff():
    """prob and logit-diff read the target's first token only; where that is whitespace alone (SmolLM2: ' 4' is
    ' ' + '4', 30 of the built-in suite's 191 targets; here the byte tokenizer's ' ') the metric measures p(' '),
    alike for every answer: a warning per task says so and what to do; nll and targets without the space are not
    warned about."""
    import warnings

    from tiny import ByteTokenizer, tiny_model

    from headscore.data.examples import Example
    from headscore.models import LoadedModel

    class Decoding(ByteTokenizer):
        def decode(self, ids) -> str:  # exact for the printable ASCII written here
            return "".join(chr(int(i) - 2) for i in ids if int(i) >= 2)

    lm = LoadedModel(tiny_model("llama").model, Decoding(), "tiny")
    spaced = [Example("two plus two is", " 4", "math", foil="5"), Example("one plus one is", "2", "math", foil="3"),
              Example("the sky is", "blue", "colour", foil="red")]
    for metric in ("prob", "logit-diff"):
        with pytest.warns(UserWarning, match=rf"metric {metric} reads the target's first token only, and it is "
                                             r"whitespace alone for 1 of 2 example\(s\) of task 'math' \(such as "
                                             r"example 0: target ' 4'\)") as caught:
            headscore.score(lm, spaced, batch_size=3, progress=False, metric=metric)
        assert sum("first token only" in str(w.message) for w in caught) == 1  # the colour task: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        headscore.score(lm, spaced, batch_size=3, progress=False, metric="nll")
        headscore.score(lm, spaced[1:], batch_size=3, progress=False, metric="prob")
