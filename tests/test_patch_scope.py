"""headscore.patch's scope: evaluation mode inside the block, what it restores and what it leaves alone, models
that share a config, each tower of a multimodal model, and sparse-attention models whose key selection depends on
the implementation's name."""

import copy

import pytest
import torch
from model_matrix import build_model  # noqa: E402
from tiny import random_examples, tiny_model

import headscore
from headscore.errors import UnsupportedModelError
from headscore.patch import _sparse_indices_as_mask

pytestmark = pytest.mark.numerics


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_a_model_left_in_training_mode_scores_as_in_evaluation_mode():
    """Dropout on and activation checkpointing on (a model straight from a training loop): the scores equal the
    evaluation-mode scores bitwise, and every module's own mode is back afterwards (one left in eval mode)."""
    lm = tiny_model("llama", dtype=torch.float64)
    lm.model.config.attention_dropout = 0.5
    examples = random_examples(4)
    reference = headscore.score(lm, examples, batch_size=2, progress=False).values
    lm.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lm.model.train()
    lm.model.model.norm.eval()
    modes = {name: m.training for name, m in lm.model.named_modules()}
    for _ in range(2):
        got = headscore.score(lm, examples, batch_size=2, progress=False).values
        torch.testing.assert_close(got, reference, rtol=0, atol=0)
    assert {name: m.training for name, m in lm.model.named_modules()} == modes


def test_training_true_leaves_modes_and_freeze_false_leaves_flags():
    """``track``'s settings: modules keep their mode inside the block, and ``requires_grad`` flags the loop
    changes inside the block stay changed after it (gradual unfreezing)."""
    lm = tiny_model("llama")
    model = lm.model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    with headscore.patch(model, freeze=False, training=True):
        assert model.training and model.model.layers[0].training
        for p in model.parameters():
            p.requires_grad_(True)
    assert model.training and all(p.requires_grad for p in model.parameters())
    with headscore.patch(model):  # the defaults: frozen and evaluating inside, both restored
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_a_model_sharing_the_config_is_not_gated():
    """Two models built from one config object share the implementation name the patch switches: the model
    not patched computes what it did (its modules are not the patch's), the patched one is gated."""
    a = tiny_model("llama", seed=0).model
    b = type(a)(a.config).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01)
    assert a.config is b.config
    ids = torch.randint(2, 90, (2, 7))
    before_b = _logits(b, ids)
    with headscore.patch(a) as heads, heads.using(torch.zeros(1, *heads.ones(1).shape[1:])):
        with pytest.warns(RuntimeWarning, match="runs ungated"):
            torch.testing.assert_close(_logits(b, ids), before_b, rtol=0, atol=0)
        zeroed = _logits(a, ids)
    assert not torch.allclose(zeroed, _logits(a, ids))


@pytest.mark.parametrize("first", ["outer", "inner"])
def test_blocks_on_a_model_and_its_inner_model_end_in_any_order(first):
    """A causal LM and its own ``.model`` share one config: a block on each, ended in either order, keeps the
    other's gates acting and leaves the model as it was (before, the inner block was left on a key no longer
    registered: every later forward pass failed)."""
    lm = tiny_model("llama")
    model = lm.model
    ids = torch.randint(2, 90, (2, 7))
    before = _logits(model, ids)
    outer = headscore.patch(model)
    inner = headscore.patch(model.model)
    outer_heads = outer.__enter__()
    inner_heads = inner.__enter__()
    zeros = torch.zeros(1, *outer_heads.ones(1).shape[1:])
    (outer if first == "outer" else inner).__exit__(None, None, None)
    still = inner_heads if first == "outer" else outer_heads
    with still.using(zeros):
        assert not torch.allclose(_logits(model, ids), before)  # the open block still gates
    (inner if first == "outer" else outer).__exit__(None, None, None)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)


def test_each_tower_of_a_multimodal_model_gets_its_implementation_back():
    model = build_model("gemma3", seed=1)
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})

    def towers():
        return {name: getattr(model.config, name)._attn_implementation for name in model.config.sub_configs}

    before = towers()
    assert before == {"text_config": "eager", "vision_config": "sdpa"}
    with headscore.patch(model):
        assert set(towers().values()) != set(before.values())
    assert towers() == before


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sparse_attention_keeps_its_key_selection_when_patched(family, attn):
    """These models fold their indexer's top-k keys into the mask only under the names eager and sdpa; under the
    patch's name they pass ``indices=``, which eager and SDPA ignore (dense attention, 3-5 logits off before).
    With open gates the patched model is the model, bitwise; a zeroed head equals zeroing that head's slice of
    the output projection's input by a hook (float64)."""
    model = build_model(family, seed=1)
    model.set_attn_implementation(attn)
    assert model.config.index_topk < 9  # the sparse path runs on these 9 tokens
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding in one row
    before = _logits(model, ids, mask)
    layer, head = 1, 2
    width = model.config.v_head_dim
    projection = model.model.layers[layer].self_attn.o_proj

    def zero_head(module, args):
        x = args[0].clone()
        x[..., head * width:(head + 1) * width] = 0
        return (x,)

    handle = projection.register_forward_pre_hook(zero_head)
    expected = _logits(model, ids, mask)
    handle.remove()
    with headscore.patch(model) as heads:
        torch.testing.assert_close(_logits(model, ids, mask), before, rtol=0, atol=0)
        gates = heads.ones(1, dtype=torch.float64)
        gates[0, layer, head] = 0
        with heads.using(gates):
            ablated = _logits(model, ids, mask)
    assert not torch.allclose(expected, before)
    torch.testing.assert_close(ablated, expected, rtol=1e-12, atol=1e-12)


def test_block_sparse_selection_is_refused_and_other_implementations_pass_through():
    q = k = torch.zeros(1, 2, 4, 8)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(UnsupportedModelError, match="block_indices"):
        _sparse_indices_as_mask("sdpa", q, k, mask, {"block_indices": torch.zeros(1, 2, 1, dtype=torch.long)})
    kwargs = {"indices": torch.zeros(1, 4, 2, dtype=torch.long)}
    assert _sparse_indices_as_mask("flash_attention_2", q, k, mask, kwargs) == (mask, kwargs)  # it applies them
    folded, rest = _sparse_indices_as_mask("sdpa", q, k, mask, {"indices": torch.tensor([[[0, 1]] * 4])})
    assert rest["indices"] is None
    assert torch.equal(folded[0, 0], torch.tensor([[True, True, False, False]] * 4))


def _state(model):
    return ({n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()})


def test_out_of_order_blocks_restore_every_flag_and_mode():
    """A block on the inner model, then one on the causal LM, the first ended first: the later block restores
    what only it recorded (the LM head's flag, the top module's mode) as well as what the first recorded."""
    model = tiny_model("llama").model.train()
    before = _state(model)
    inner, outer = headscore.patch(model.model), headscore.patch(model)
    inner.__enter__()
    outer.__enter__()
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    assert _state(model) == before


def test_a_tracker_left_open_when_an_earlier_patch_ends_trains():
    """``patch`` (frozen, evaluating) then ``track``, the patch ended first: the tracker's block goes on with the
    flags and modes it found before the patch (before, every parameter stayed frozen: training updated nothing)."""
    model = tiny_model("llama").model.train()
    p = headscore.patch(model)
    p.__enter__()
    with headscore.track(model):
        p.__exit__(None, None, None)
        assert model.training and all(q.requires_grad for q in model.parameters())
        ids = torch.randint(2, 90, (2, 6))
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(q.grad is not None for q in model.parameters() if q.dim() == 2)


@pytest.mark.parametrize("first", ["model", "language model"])
def test_a_multimodal_model_and_its_language_model_are_not_patched_at_once(first):
    """Their configs share the text tower: each block would switch and restore the other's (a dead key after
    both, or the outer gates silently dropped). The second block is refused and the first one still works."""
    model = build_model("gemma3", seed=1)
    language = model.model.language_model
    assert language.config is model.config.text_config
    a, b = (model, language) if first == "model" else (language, model)
    with headscore.patch(a):
        with pytest.raises(headscore.HeadscoreError, match="multimodal model and its language model"):
            with headscore.patch(b):
                pass
    assert model.config.text_config._attn_implementation == "eager"
    _logits(model, torch.randint(3, 50, (1, 5)))


def test_the_language_tower_runs_its_own_implementation():
    """Towers with different implementations (text sdpa, vision eager: the top config says eager): inside the patch
    the language tower still runs SDPA, so open gates give the unpatched logits bitwise (eager there: 6e-7 off)."""
    model = build_model("gemma3", seed=1)
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "eager"})
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    with headscore.patch(model):
        torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)


def test_a_sparse_model_sharing_the_config_keeps_its_key_selection():
    a = build_model("deepseek_v32", seed=1)
    b = type(a)(a.config).to(torch.float64).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    before = _logits(b, ids)
    with headscore.patch(a), pytest.warns(RuntimeWarning, match="runs ungated"):
        torch.testing.assert_close(_logits(b, ids), before, rtol=0, atol=0)


def test_a_copy_made_inside_the_block_runs_ungated_and_says_so():
    """A copy made inside the block runs ungated, with a warning; after the block too (its config still names the
    block's key, which was removed, and every forward pass of the copy failed), also while a later block on another
    model has taken that key over; the registry does not grow with blocks run one after another."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model("llama").model
    ids = torch.randint(2, 90, (2, 6))
    before = _logits(model, ids)
    with headscore.patch(model) as heads, heads.using(torch.zeros(1, *heads.ones(1).shape[1:])):
        twin = copy.deepcopy(model)
        with pytest.warns(RuntimeWarning, match="not in the patched model when the block began runs ungated"):
            torch.testing.assert_close(_logits(twin, ids), before, rtol=0, atol=0)
    stale = twin.config._attn_implementation
    assert stale.startswith("headscore_gated_") and model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(twin, ids), before, rtol=0, atol=0)
    other = tiny_model("llama", seed=3).model
    with headscore.patch(other) as heads, heads.using(torch.zeros(1, *heads.ones(1).shape[1:])):
        assert other.config._attn_implementation == stale  # the key, taken over
        with pytest.warns(RuntimeWarning, match="runs ungated"):
            torch.testing.assert_close(_logits(twin, ids), before, rtol=0, atol=0)
        assert not torch.equal(_logits(other, ids), _logits(tiny_model("llama", seed=3).model, ids))  # gated
    keys = {k for k in ALL_ATTENTION_FUNCTIONS._global_mapping if k.startswith("headscore_gated_")}
    for _ in range(5):
        with headscore.patch(model):
            pass
    assert {k for k in ALL_ATTENTION_FUNCTIONS._global_mapping if k.startswith("headscore_gated_")} == keys


def test_a_sparse_copy_keeps_its_key_selection_after_the_block():
    a = build_model("deepseek_v32", seed=1)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    before = _logits(a, ids)
    with headscore.patch(a):
        twin = copy.deepcopy(a)
    assert twin.config._attn_implementation.startswith("headscore_gated_")
    torch.testing.assert_close(_logits(twin, ids), before, rtol=0, atol=0)
