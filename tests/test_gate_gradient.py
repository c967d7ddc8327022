"""The gate gradient against an independent float64 reference: o_proj input hooks, one example at a time."""

import pytest
import torch
from tiny import FAMILIES, random_examples, tiny_model

import headscore
from headscore.methods.gradient import gate_gradients

CASES = [(fam, attn) for fam, (_, _, impls) in FAMILIES.items() for attn in impls]


def reference_gate_grad(model, tokenizer, examples, num_layers: int, num_heads: int):
    """dL_b/dg[b] for a right-padded batch built here: forward pre-hooks scale each head's o_proj input slice.

    The batch is padded like headscore pads (the eager path of transformers computes softmax in float32
    even for float64 models, so padded and unpadded runs differ at 1e-6); losses come from full logits.
    """
    rows = [(tokenizer(e.prompt)["input_ids"], tokenizer(e.target, add_special_tokens=False)["input_ids"])
            for e in examples]
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (p, t) in enumerate(rows):
        ids[b, :len(p) + len(t)] = torch.tensor(p + t)
        mask[b, :len(p) + len(t)] = 1
    g = torch.ones(len(rows), num_layers, num_heads, dtype=torch.float64, requires_grad=True)
    handles = []
    for layer_idx, layer in enumerate(model.model.layers):
        def hook(module, args, layer_idx=layer_idx):
            (x,) = args
            scaled = x.view(*x.shape[:-1], num_heads, -1) * g[:, layer_idx, None, :, None]
            return (scaled.view_as(x),)
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits, -1)
    losses = torch.stack([-torch.stack([logp[b, len(p) - 1 + i, tok] for i, tok in enumerate(t)]).mean()
                          for b, (p, t) in enumerate(rows)])
    (grad,) = torch.autograd.grad(losses.sum(), g)
    return losses.detach(), grad


@pytest.mark.parametrize("family,attn", CASES)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gate_gradient_matches_reference(family, attn, kv_heads):
    lm = tiny_model(family, layers=3, heads=4, kv_heads=kv_heads, attn=attn, dtype=torch.float64)
    examples = random_examples(7, seed=kv_heads)
    prep = headscore.prepare(lm, examples)
    got_loss, got_grad = {}, {}
    padded = 0
    with headscore.patch(lm.model) as heads:
        for batch in prep.batches(4, progress=False):  # batches of mixed lengths
            padded += int((batch.attention_mask == 0).sum())
            loss, grad = gate_gradients(lm.model, heads, batch)
            for row, idx in enumerate(batch.example_index.tolist()):
                got_loss[idx], got_grad[idx] = loss[row], grad[row]
    assert padded > 0, "test needs padding"
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt))  # other batch, other padding
    ref_loss, ref_grad = reference_gate_grad(lm.model, lm.tokenizer, [examples[i] for i in order], 3, 4)
    for row, i in enumerate(order):
        torch.testing.assert_close(got_loss[i].double(), ref_loss[row], rtol=1e-6, atol=0)
        assert ref_grad[row].abs().max() > 1e-3, "reference gradient is trivially small"
        rel = ((got_grad[i].double() - ref_grad[row]).abs() / ref_grad[row].abs().clamp_min(1e-3)).max()
        assert rel < 1e-6, f"example {i}: relative error {rel:.2e}"


def test_gradient_is_not_the_identity_of_the_loss():
    """A wrong layer mapping would still give finite numbers: check per-layer gradients differ across layers."""
    lm = tiny_model("llama", dtype=torch.float64)
    prep = headscore.prepare(lm, random_examples(3))
    with headscore.patch(lm.model) as heads:
        batch = next(prep.batches(3, progress=False))
        _, grad = gate_gradients(lm.model, heads, batch)
    assert not torch.allclose(grad[:, 0], grad[:, 1])
