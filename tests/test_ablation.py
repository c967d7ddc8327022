"""Ablation: batched equals sequential, and both equal an independent hook-based ablation."""

import pytest
import torch
from tiny import random_examples, tiny_model

import headscore

pytestmark = pytest.mark.numerics


def hooked_loss(model, tokenizer, ex, zero_heads, num_heads, baseline=None):
    """Loss of one unpadded example with the listed (layer, head) slices of the o_proj input replaced."""
    p = tokenizer(ex.prompt)["input_ids"]
    t = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
    handles = []
    for layer_idx, layer in enumerate(model.model.layers):
        heads_here = [h for (lay, h) in zero_heads if lay == layer_idx]
        if not heads_here:
            continue

        def hook(module, args, heads_here=heads_here, layer_idx=layer_idx):
            x = args[0].clone().view(*args[0].shape[:-1], num_heads, -1)
            for h in heads_here:
                x[..., h, :] = 0.0 if baseline is None else baseline[layer_idx, h]
            return (x.view_as(args[0]),)
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + t])).logits[0].double()
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits, -1)
    return -torch.stack([logp[len(p) - 1 + i, tok] for i, tok in enumerate(t)]).mean()


@pytest.mark.parametrize("family,kv_heads,batch_size", [("llama", 2, 3), ("qwen2", 1, 4), ("mistral", 4, 5)])
def test_batched_equals_sequential(family, kv_heads, batch_size):
    lm = tiny_model(family, kv_heads=kv_heads)
    examples = random_examples(8)
    kw = dict(batch_size=batch_size, progress=False)
    batched = headscore.ablate(lm, examples, mode="batched", rows_per_pass=16, **kw)
    sequential = headscore.ablate(lm, examples, mode="sequential", **kw)
    assert batched.method == "ablation-zero"
    assert batched.values.abs().max() > 1e-3
    torch.testing.assert_close(batched.values, sequential.values, rtol=0, atol=1e-5)


def test_ablation_matches_hooked_reference_zero_and_mean():
    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(6)
    mean = headscore.mean_baseline(lm, examples, batch_size=4, progress=False)
    for baseline, base in (("zero", None), ("mean", mean.double())):
        got = headscore.ablate(lm, examples, baseline=baseline, batch_size=4, progress=False)
        tasks = got.tasks
        for layer in range(3):
            for head in range(4):
                per_task = {t: [] for t in tasks}
                for ex in examples:
                    d = hooked_loss(lm.model, lm.tokenizer, ex, [(layer, head)], 4, base) - \
                        hooked_loss(lm.model, lm.tokenizer, ex, [], 4)
                    per_task[ex.task].append(float(d))
                for ti, t in enumerate(tasks):
                    ref = sum(per_task[t]) / len(per_task[t])
                    assert abs(float(got.values[ti, layer, head]) - ref) < 1e-8, (baseline, layer, head, t)


def test_mean_baseline_matches_token_average():
    lm = tiny_model("llama", dtype=torch.float64, layers=2)
    examples = random_examples(5)
    got = headscore.mean_baseline(lm, examples, batch_size=2, progress=False)
    captured = []
    layer = lm.model.model.layers[1].self_attn.o_proj
    handle = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0][0].detach()))
    for ex in examples:
        ids = lm.tokenizer(ex.prompt)["input_ids"] + lm.tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        lm.model(input_ids=torch.tensor([ids]))
    handle.remove()
    ref = torch.cat(captured).mean(0).view(4, 8)
    torch.testing.assert_close(got[1].double(), ref, rtol=1e-5, atol=1e-6)


def test_head_set_ablation_and_amplification():
    lm = tiny_model("qwen3", dtype=torch.float64)
    examples = random_examples(6)
    heads = [(0, 1), (2, 3)]
    effects = headscore.ablate_heads(lm, examples, heads, batch_size=4, progress=False)
    for task, eff in effects.items():
        exs = [e for e in examples if e.task == task]
        ref = sum(float(hooked_loss(lm.model, lm.tokenizer, e, heads, 4)
                        - hooked_loss(lm.model, lm.tokenizer, e, [], 4)) for e in exs) / len(exs)
        assert abs(eff.delta - ref) < 1e-8
        assert eff.count == len(exs)
    scaled = headscore.ablate_heads(lm, examples, heads, gate=2.0, batch_size=4, progress=False)
    assert all(abs(s.delta - effects[t].delta) > 1e-6 for t, s in scaled.items())
    with pytest.raises(headscore.HeadscoreError, match="outside"):
        headscore.ablate_heads(lm, examples, [(9, 0)], progress=False)
