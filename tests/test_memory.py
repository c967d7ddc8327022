"""What the unfused gate keeps for the backward: nothing that the plain model does not keep already.

The gate's backward needs each layer's attention output O (for dL/dg). With SDPA, O is a view of the output
that SDPA's own backward keeps (torch's SDPA kernels lay their output out like the query, which transformers
passes as a [B, H, T, D] view of [B, T, H, D], so its ``transpose(1, 2).contiguous()`` copies nothing), so
the gate adds no [B, T, H, D] per layer; without a gate gradient it keeps no O at all. What is kept is read
from autograd's saved-tensor hooks (the storages packed between forward and backward).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

import headscore
from headscore.gate import apply_gate

patch_module = importlib.import_module("headscore.patch")  # the module; headscore.patch is the function

pytestmark = pytest.mark.numerics

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class SavedStorages:
    """A saved-tensor hook that records the storage of everything autograd packs while it is active."""

    def __init__(self):
        self.ptrs: list[int] = []

    def __enter__(self):
        def pack(t):
            self.ptrs.append(t.untyped_storage().data_ptr())
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_output_is_kept_once(device, dtype):
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 9, 16
    # as transformers' attention modules pass them: [B, H, T, D] views of projections laid out [B, T, H, D]
    leaves = [torch.randn(B, T, H * D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in leaves)
    with SavedStorages() as by_sdpa:
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = attention.transpose(1, 2).contiguous()  # what transformers' sdpa_attention_forward returns
    assert out.untyped_storage().data_ptr() == attention.untyped_storage().data_ptr(), "contiguous() copied"
    gate = torch.ones(B, H, device=device, requires_grad=True)
    with SavedStorages() as by_gate:
        y = apply_gate(out, gate)
    assert set(by_gate.ptrs) == {out.untyped_storage().data_ptr(), gate.untyped_storage().data_ptr()}
    assert out.untyped_storage().data_ptr() in by_sdpa.ptrs, "SDPA should keep its output for its backward"
    dy = torch.randn_like(y)
    (dg,) = torch.autograd.grad(y, gate, dy)
    ref = torch.einsum("bthd,bthd->bh", out.double(), dy.double())
    torch.testing.assert_close(dg.double(), ref, rtol=1e-5, atol=1e-5)


def test_gate_keeps_no_output_without_a_gate_gradient():
    B, H, T, D = 1, 2, 5, 4
    out = torch.randn(B, T, H, D, requires_grad=True)
    with SavedStorages() as kept:
        apply_gate(out, torch.ones(B, H, requires_grad=True))
    assert out.untyped_storage().data_ptr() in kept.ptrs
    with SavedStorages() as kept:
        y = apply_gate(out, torch.rand(B, H), torch.randn(H, D))  # gates fixed: only the output's gradient
    assert out.untyped_storage().data_ptr() not in kept.ptrs
    (d_out,) = torch.autograd.grad(y.sum(), out)
    assert d_out.shape == out.shape


def test_scoring_keeps_no_copy_of_any_layer_output(monkeypatch):
    """On a model scored as headscore scores (gates 1 with gradients, weights frozen): in every layer whose
    attention gets a gradient (all but the first), the output the gate keeps is a tensor SDPA keeps anyway."""
    layers = 4
    lm = tiny_model("llama", layers=layers, heads=4, kv_heads=2, head_dim=8, attn="sdpa")
    kept_by_gate: list[set[int]] = []

    def recording_gate(out, gate, baseline=None):
        with SavedStorages() as by_gate:
            y = apply_gate(out, gate, baseline)
        kept_by_gate.append(set(by_gate.ptrs) - {gate.untyped_storage().data_ptr()})
        return y

    monkeypatch.setattr(patch_module, "apply_gate", recording_gate)
    ids = torch.randint(2, 90, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as headscore batches
    with headscore.patch(lm.model) as heads, heads.using(heads.ones(3, requires_grad=True)):
        with SavedStorages() as everything:
            lm.model(input_ids=ids, attention_mask=mask)
    # the gate's own hook replaces the outer one while it runs: `everything` is what the other nodes keep
    assert len(kept_by_gate) == layers and all(len(s) == 1 for s in kept_by_gate)
    others = set(everything.ptrs)
    assert not kept_by_gate[0] & others, "layer 0's attention gets no gradient: SDPA keeps nothing there"
    for layer, storages in enumerate(kept_by_gate[1:], start=1):
        assert storages <= others, f"layer {layer}: the gate keeps an output that nothing else keeps (a copy)"
