"""The gate gradient and loss of whole models against an independent float64 reference.

The reference scales each head's slice of the ``o_proj`` input with forward pre-hooks, in a batch it
builds and pads itself (other order, other padding than headscore's). Two references:

* ``ref64``: the exact float64 value. transformers' eager attention computes its softmax in float32
  even for float64 models (``softmax(..., dtype=torch.float32)``); for this reference that softmax is
  made to run in float64, so every step is float64.
* ``ref_same``: the model's own arithmetic (eager: float32 softmax), other batch, other padding.

The rule is flash-attention's: headscore may be at most ``FACTOR`` times as far from ``ref64`` as the
model's own arithmetic is (``ref_same``), plus a floor for when that distance happens to be ~0:

    max|got - ref64| <= FACTOR * max|ref_same - ref64| + ATOL * max|ref64|

``ATOL`` is the unit roundoff of the dtype that each path's lowest-precision step really runs in
(float64 for SDPA on a float64 model; float32 for eager's softmax) times ``ROUNDING_STEPS``, a bound on
how many roundings of that size add up in one value here (3 layers of sums over at most a few dozen
terms). Neither depends on the CPU's SIMD width: AVX2 and AVX-512 only reorder those sums.

``test_check_catches_real_bugs`` shows that the same check fails on a swapped head, a shifted layer and
a missing padding mask.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from tiny import FAMILIES, random_examples, tiny_model

import headscore
from headscore.data.batching import Batch
from headscore.methods.gradient import gate_gradients

pytestmark = pytest.mark.numerics

CASES = [(fam, attn) for fam, (_, _, impls) in FAMILIES.items() for attn in impls]
LAYERS, HEADS = 3, 4
FACTOR = 3.0
ROUNDING_STEPS = 64
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def lowest_precision(attn: str) -> torch.dtype:
    """The dtype of the least precise step of a float64 model's forward and backward with ``attn``."""
    return torch.float32 if attn == "eager" else torch.float64


@contextmanager
def softmax_in_input_dtype():
    """Make ``softmax(x, dtype=float32)`` on a float64 ``x`` stay float64 (true float64 eager attention)."""
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if dtype is not None and x.dtype == torch.float64:
            dtype = torch.float64
        return original(x, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


def reference(model, tokenizer, examples, *, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses [N], dL_n/dg [N, L, H]) for a right-padded batch of ``examples`` built here."""
    rows = [(tokenizer(e.prompt)["input_ids"], tokenizer(e.target, add_special_tokens=False)["input_ids"])
            for e in examples]
    width = max(len(p) + len(t) for p, t in rows) + 3  # extra padding: headscore's batches are narrower
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (p, t) in enumerate(rows):
        ids[b, :len(p) + len(t)] = torch.tensor(p + t)
        mask[b, :len(p) + len(t)] = 1
    g = torch.ones(len(rows), LAYERS, HEADS, dtype=torch.float64, requires_grad=True)
    handles = []
    for layer_idx, layer in enumerate(model.model.layers):
        def hook(module, args, layer_idx=layer_idx):
            (x,) = args
            scaled = x.view(*x.shape[:-1], HEADS, -1) * g[:, layer_idx, None, :, None]
            return (scaled.view_as(x),)
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
    try:
        if exact:
            with softmax_in_input_dtype():
                logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits.double(), -1)
    losses = torch.stack([-torch.stack([logp[b, len(p) - 1 + i, tok] for i, tok in enumerate(t)]).mean()
                          for b, (p, t) in enumerate(rows)])
    (grad,) = torch.autograd.grad(losses.sum(), g)
    return losses.detach(), grad


def headscore_values(lm, examples, *, batch_size: int = 4, corrupt=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses [N], grads [N, L, H]) from headscore in its own batches; ``corrupt`` may alter each batch."""
    prep = headscore.prepare(lm, examples)
    losses = torch.empty(len(examples), dtype=torch.float64)
    grads = torch.empty(len(examples), LAYERS, HEADS, dtype=torch.float64)
    padded = 0
    with headscore.patch(lm.model) as heads:
        for batch in prep.batches(batch_size, progress=False):
            padded += int((batch.attention_mask == 0).sum())
            if corrupt is not None:
                batch = corrupt(batch)
            loss, grad = gate_gradients(lm.model, heads, batch)
            losses[batch.example_index] = loss.double()
            grads[batch.example_index] = grad.double()
    assert padded > 0, "the test needs padded batches"
    return losses, grads


def within_rule(got: torch.Tensor, ref64: torch.Tensor, ref_same: torch.Tensor, attn: str) -> tuple[bool, str]:
    """The tolerance rule of the module docstring; (holds, a message with the numbers)."""
    err = (got - ref64).abs().max().item()
    own = (ref_same - ref64).abs().max().item()
    floor = ROUNDING_STEPS * UNIT_ROUNDOFF[lowest_precision(attn)] * ref64.abs().max().item()
    bound = FACTOR * own + floor
    return err <= bound, f"max|got-ref64| {err:.3e} vs bound {bound:.3e} (own arithmetic {own:.3e}, floor {floor:.3e})"


def references(lm, examples):
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt))  # other batch, other padding
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    ordered = [examples[i] for i in order]
    loss64, grad64 = reference(lm.model, lm.tokenizer, ordered, exact=True)
    loss_same, grad_same = reference(lm.model, lm.tokenizer, ordered, exact=False)
    return loss64[inverse], grad64[inverse], loss_same[inverse], grad_same[inverse]


@pytest.mark.parametrize("family,attn", CASES)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gate_gradient_matches_reference(family, attn, kv_heads):
    lm = tiny_model(family, layers=LAYERS, heads=HEADS, kv_heads=kv_heads, attn=attn, dtype=torch.float64)
    examples = random_examples(7, seed=kv_heads)
    got_loss, got_grad = headscore_values(lm, examples)
    loss64, grad64, loss_same, grad_same = references(lm, examples)
    assert grad64.abs().amax(dim=(1, 2)).min() > 1e-3, "reference gradient is trivially small"
    for name, got, ref64, ref_same in (("loss", got_loss, loss64, loss_same), ("gate gradient", got_grad, grad64,
                                                                             grad_same)):
        ok, msg = within_rule(got, ref64, ref_same, attn)
        print(f"{family}-{attn}-kv{kv_heads} {name}: {msg}")  # the margins: pytest -s -k matches_reference
        assert ok, f"{name}: {msg}"


def left_padded_without_mask(batch: Batch) -> Batch:
    """The batch with each row's padding moved to the left and the attention mask dropped (all ones)."""
    ids, tgt = batch.input_ids.clone(), batch.target_mask.clone()
    for b in range(batch.size):
        shift = int((batch.attention_mask[b] == 0).sum())
        ids[b] = batch.input_ids[b].roll(shift)
        tgt[b] = batch.target_mask[b].roll(shift)
    return Batch(ids, torch.ones_like(batch.attention_mask), tgt, batch.task_index, batch.example_index)


def swap_heads(grad: torch.Tensor) -> torch.Tensor:
    out = grad.clone()
    out[:, 1, [0, 1]] = grad[:, 1, [1, 0]]
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_check_catches_real_bugs(attn):
    """The rule above is not loose: a swapped head, a layer shift or a missing padding mask all fail it."""
    lm = tiny_model("llama", layers=LAYERS, heads=HEADS, kv_heads=2, attn=attn, dtype=torch.float64)
    examples = random_examples(7, seed=5)
    _, grad = headscore_values(lm, examples)
    _, grad64, _, grad_same = references(lm, examples)
    assert within_rule(grad, grad64, grad_same, attn)[0], "the correct gradient must pass"
    bugs = {
        "swapped heads": swap_heads(grad),
        "layer shift": grad.roll(1, dims=1),
        "missing padding mask": headscore_values(lm, examples, corrupt=left_padded_without_mask)[1],
    }
    for name, wrong in bugs.items():
        ok, msg = within_rule(wrong, grad64, grad_same, attn)
        assert not ok, f"the check accepted a {name}: {msg}"


def test_gradient_is_not_the_identity_of_the_loss():
    """A wrong layer mapping would still give finite numbers: check per-layer gradients differ across layers."""
    lm = tiny_model("llama", dtype=torch.float64)
    prep = headscore.prepare(lm, random_examples(3))
    with headscore.patch(lm.model) as heads:
        batch = next(prep.batches(3, progress=False))
        _, grad = gate_gradients(lm.model, heads, batch)
    assert not torch.allclose(grad[:, 0], grad[:, 1])
