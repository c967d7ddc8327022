"""Probe scorer: activations vs an o_proj hook reference, importance vs autograd, a planted signal."""

import pytest
import torch
from tiny import random_examples, tiny_model

import headscore
from headscore.cogqa.probe import collect_activations, probe_gradients, probe_importance, probe_scores, train_probe

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_activations(lm, examples, positions):
    """Input of o_proj per head, averaged over the answer positions, one unpadded example at a time."""
    model, tok = lm.model, lm.tokenizer
    cfg = model.config
    out = []
    for ex in examples:
        p, t = tok(ex.prompt)["input_ids"], tok(ex.target, add_special_tokens=False)["input_ids"]
        seen = {}

        def save(module, args, li, seen=seen):
            seen[li] = args[0][0].view(args[0].shape[1], cfg.num_attention_heads, -1)

        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, li=li: save(m, a, li))
                 for li, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            model(input_ids=torch.tensor([p + t]))
        for h in hooks:
            h.remove()
        sl = slice(len(p), len(p) + len(t)) if positions == "target" else slice(len(p) - 1, len(p) + len(t) - 1)
        out.append(torch.stack([seen[li][sl].mean(0) for li in range(cfg.num_hidden_layers)]))
    return torch.stack(out)


@pytest.mark.parametrize("positions", ["target", "predict"])
def test_activations_match_hook_reference(positions):
    lm = tiny_model("qwen2", dtype=torch.float64)
    examples = random_examples(7)
    prep = headscore.prepare(lm, examples)
    acts = collect_activations(prep, batch_size=3, positions=positions, progress=False)
    ref = reference_activations(lm, examples, positions)
    assert acts.shape == (7, 3, 4, 8)
    torch.testing.assert_close(acts.double(), ref.double(), rtol=0, atol=1e-6)


def test_importance_matches_autograd_reference():
    torch.manual_seed(0)
    acts = torch.randn(20, 3, 4, 6, dtype=torch.float64)
    labels = torch.arange(20) % 3
    for shared in (True, False):
        fit = train_probe(acts, labels, range(15), range(15, 20), epochs=5, shared=shared, proj_dim=3, hidden=7)
        probe = fit.probe
        acc = probe_importance(probe, acts, labels, ["a", "b", "c"])
        ref = torch.zeros(20, 3, 4, dtype=torch.float64)
        for i in range(20):
            x = ((acts[i] - probe.mean) / probe.std).detach()
            w = probe.proj.detach()
            z = (torch.einsum("lhd,de->lhe", x, w) if shared else torch.einsum("lhd,lhde->lhe", x, w))
            z = z.clone().requires_grad_(True)
            h = torch.relu(z.flatten() @ probe.mlp[0].weight.detach().T + probe.mlp[0].bias.detach())
            logit = (h @ probe.mlp[2].weight.detach().T + probe.mlp[2].bias.detach())[labels[i]]
            (g,) = torch.autograd.grad(logit, z)
            ref[i] = (g * z).sum(-1).detach()
        torch.testing.assert_close(probe_gradients(probe, acts, labels), ref, rtol=1e-9, atol=1e-12)
        for c in range(3):
            torch.testing.assert_close(acc.mean[c], ref[labels == c].mean(0), rtol=1e-9, atol=1e-12)


def test_probe_finds_planted_head():
    g = torch.Generator().manual_seed(0)
    n, classes = 240, 4
    acts = torch.randn(n, 3, 4, 6, generator=g)
    labels = torch.arange(n) % classes
    acts[torch.arange(n), 1, 2, labels] += 3.0  # head (1, 2) carries the label
    fit = train_probe(acts, labels, range(180), range(180, n), epochs=200, seed=1)
    assert fit.test_accuracy > 0.7 and fit.chance_accuracy == pytest.approx(0.25)
    acc = probe_importance(fit.probe, acts, labels, [str(c) for c in range(classes)])
    for c in range(classes):
        grid = acc.mean[c]
        assert divmod(int(grid.argmax()), 4) == (1, 2)


def test_train_probe_is_seeded():
    acts = torch.randn(30, 2, 3, 4)
    labels = torch.arange(30) % 2
    a = train_probe(acts, labels, range(20), range(20, 30), epochs=10, seed=3)
    b = train_probe(acts, labels, range(20), range(20, 30), epochs=10, seed=3)
    torch.testing.assert_close(a.probe.proj, b.probe.proj)


def test_probe_scores_end_to_end():
    lm = tiny_model("llama")
    examples = random_examples(12)
    s = probe_scores(lm, examples, progress=False, epochs=10)
    assert s.method == "probe" and s.values.shape == (3, 3, 4) and s.tasks == ["alpha", "beta", "gamma"]
    assert {"probe_accuracy", "chance_accuracy", "train_accuracy", "num_train", "num_test"} <= set(s.extra)
    assert s.extra["num_train"] + s.extra["num_test"] == 12 and int(s.counts.sum()) == 12
    again = probe_scores(lm, examples, progress=False, epochs=10)
    torch.testing.assert_close(s.values, again.values)
    with pytest.raises(headscore.HeadscoreError, match="two tasks"):
        probe_scores(lm, [ex for ex in examples if ex.task == "alpha"], progress=False)
    with pytest.raises(headscore.HeadscoreError, match="positions"):
        probe_scores(lm, examples, positions="all", progress=False)
