"""headscore.patch: exact restore, frozen parameters, clear errors, unchanged outputs."""

import importlib

import pytest
import torch
from tiny import random_examples, tiny_model
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

import headscore
from headscore.errors import UnsupportedModelError

pytestmark = pytest.mark.numerics
patch_module = importlib.import_module("headscore.patch")  # the module; headscore.patch is the function


def _registries() -> tuple[set[str], set[str]]:
    """The attention and mask registries' keys, but for the keys of ended blocks (which run the model's own
    implementation, ungated, for copies made inside a block, until a later block takes them)."""
    retired = {k for keys in patch_module._FREE_KEYS.values() for k in keys}
    return ({k for k in AttentionInterface._global_mapping if k not in retired},
            {k for k in AttentionMaskInterface._global_mapping if k not in retired})


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("qwen3", "eager"), ("gemma2", "eager")])
def test_patched_model_computes_the_same_and_restores(family, attn):
    lm = tiny_model(family, attn=attn)
    lm.model.lm_head.weight.requires_grad_(True)
    lm.model.model.embed_tokens.weight.requires_grad_(False)
    flags = [p.requires_grad for p in lm.model.parameters()]
    ids = torch.randint(2, 90, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    before = _logits(lm.model, ids, mask)
    keys = _registries()
    with headscore.patch(lm.model) as heads:
        key = lm.model.config._attn_implementation
        assert key.startswith("headscore_gated_")
        assert not any(p.requires_grad for p in lm.model.parameters())
        torch.testing.assert_close(_logits(lm.model, ids, mask), before, rtol=0, atol=0)
        with heads.using(heads.ones(3)):
            torch.testing.assert_close(_logits(lm.model, ids, mask), before, rtol=1e-6, atol=1e-6)
        gates = heads.ones(3)
        gates[0, 1, 2] = 0.0
        with heads.using(gates):
            changed = _logits(lm.model, ids, mask)
        assert (changed[0] - before[0]).abs().max() > 1e-4  # row 0 changed
        torch.testing.assert_close(changed[1:], before[1:], rtol=1e-6, atol=1e-6)  # other rows did not
    assert lm.model.config._attn_implementation == attn
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert _registries() == keys and key in patch_module._FREE_KEYS[attn]
    torch.testing.assert_close(_logits(lm.model, ids, mask), before, rtol=0, atol=0)


def test_restored_after_exception():
    lm = tiny_model("llama")
    keys = _registries()
    with pytest.raises(RuntimeError, match="boom"):
        with headscore.patch(lm.model):
            raise RuntimeError("boom")
    assert lm.model.config._attn_implementation == "sdpa"
    assert all(p.requires_grad for p in lm.model.parameters())
    assert _registries() == keys


def test_parameters_get_no_gradients():
    lm = tiny_model("mistral")
    headscore.score(lm, random_examples(4), batch_size=2, progress=False)
    assert all(p.grad is None for p in lm.model.parameters())


def test_unsupported_models_get_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="Linear"):
        with headscore.patch(torch.nn.Linear(2, 2)):
            pass
    lm = tiny_model("llama")
    lm.model._can_set_attn_implementation = lambda: False
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM does not route attention"):
        with headscore.patch(lm.model):
            pass


def test_a_wrapped_model_is_told_to_pass_the_inner_one():
    """``track(DDP(model))``: the wrapper has no attention registry; the message names the model it wraps."""

    class Wrapper(torch.nn.Module):  # DistributedDataParallel's shape: the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(UnsupportedModelError, match=r"it wraps a LlamaForCausalLM: pass that \(model.module\)"):
        with headscore.patch(Wrapper(tiny_model("llama").model)):
            pass


def test_gates_with_wrong_rows_are_rejected():
    lm = tiny_model("llama")
    with headscore.patch(lm.model) as heads, heads.using(heads.ones(2)):
        with pytest.raises(ValueError, match="2 rows"):
            lm.model(input_ids=torch.randint(2, 90, (3, 5)))
