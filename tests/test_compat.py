"""headscore.compat: the one door to transformers' private attributes, and its version check."""

import pytest
import torch
from tiny import tiny_model
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import headscore
from headscore import compat
from headscore.errors import UnsupportedModelError


def test_private_attributes_still_exist():
    """Fails on a transformers release that renamed what compat reads (then only compat needs fixing)."""
    lm = tiny_model("llama", attn="sdpa")
    assert isinstance(AttentionInterface._global_mapping, dict)
    assert isinstance(AttentionMaskInterface._global_mapping, dict)
    assert "sdpa" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    assert compat.can_route_attention(lm.model)
    assert compat.attention_implementation(lm.model) == "sdpa"
    assert compat.attention_function("sdpa") is ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert callable(compat.eager_attention(lm.model.model.layers[0].self_attn))
    model = lm.model.train()
    assert compat.activation_checkpointing(model) is None
    for reentrant, mode in ((True, "reentrant"), (False, "non-reentrant")):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        assert compat.activation_checkpointing(model) == mode
        assert compat.activation_checkpointing(model, compat.checkpointing_modules(model)) == mode
    model.activation_checkpointing_disable()
    assert compat.activation_checkpointing(model) is None


def test_register_adds_the_function_and_the_mask_of_its_model():
    """(patch keeps an ended block's key registered, ungated, for reuse: nothing unregisters keys.)"""
    before = set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)
    compat.register_attention("headscore_test_key", lambda *a, **k: None, masks_like="sdpa")
    assert "headscore_test_key" in AttentionInterface._global_mapping
    assert AttentionMaskInterface._global_mapping["headscore_test_key"] is \
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"]
    AttentionInterface._global_mapping.pop("headscore_test_key")
    AttentionMaskInterface._global_mapping.pop("headscore_test_key")
    assert (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)) == before


def test_force_attention_implementation():
    lm = tiny_model("llama", attn="sdpa")
    compat.force_attention_implementation(lm.model, "eager")
    assert compat.attention_implementation(lm.model) == "eager"


@pytest.mark.parametrize("version,ok", [("5.0.0", True), ("5.24.0", True), ("5.1.0.dev0", True), ("6.0.0rc1", True),
                                        ("4.57.1", False), ("4.0", False)])
def test_version_check(version, ok):
    if ok:
        compat.check_transformers(version)
    else:
        with pytest.raises(UnsupportedModelError, match=r"transformers>=5\.0.*this is transformers " + version):
            compat.check_transformers(version)


def test_patch_refuses_an_old_transformers(monkeypatch):
    """The check runs before anything is registered: a too-old transformers gets one clear error."""
    monkeypatch.setattr(compat, "installed_version", lambda name: "4.46.0")
    lm = tiny_model("llama")
    flags = [p.requires_grad for p in lm.model.parameters()]
    keys = set(AttentionInterface._global_mapping)
    with pytest.raises(UnsupportedModelError, match="needs transformers>=5.0"), headscore.patch(lm.model):
        pass
    assert set(AttentionInterface._global_mapping) == keys
    assert compat.attention_implementation(lm.model) == "sdpa"
    assert [p.requires_grad for p in lm.model.parameters()] == flags


EXAMPLES = [("When Ann and Bob went out, Bob gave it to ", "Ann"), ("Then Cy and Di sat, Di read to ", "Cy")]


def _examples():
    return [headscore.Example(prompt, target, "t") for prompt, target in EXAMPLES]


def test_family_without_sdpa_loads_with_eager(tmp_path):
    """GPT-OSS has no SDPA attention: load_model falls back to eager (an explicit 'sdpa' still fails with one
    clear line), and the model is gated: exact ablation of every head equals the prefix-reuse result."""
    from tiny_saved import save_tiny_family

    from headscore.errors import HeadscoreError

    path = str(save_tiny_family(tmp_path / "gpt-oss", "gpt-oss"))
    lm = headscore.load_model(path, progress=False)
    assert lm.model.config._attn_implementation == "eager"
    with pytest.raises(HeadscoreError, match="scaled_dot_product_attention"):
        headscore.load_model(path, attn_implementation="sdpa", progress=False)
    naive = headscore.ablate(lm, _examples(), mode="naive", progress=False)
    prefix = headscore.ablate(lm, _examples(), progress=False)
    assert naive.values.abs().max() > 0
    torch.testing.assert_close(prefix.values, naive.values, rtol=1e-4, atol=1e-5)


def test_mixture_of_experts_in_float64(tmp_path):
    """Qwen3-MoE in float64: the experts' grouped matmul has no float64, so load_model runs them one by one;
    the scores equal the float32 model's to float32 precision."""
    from tiny_saved import save_tiny_family

    path = str(save_tiny_family(tmp_path / "moe", "qwen3-moe"))
    s64 = headscore.score(headscore.load_model(path, dtype="float64", progress=False), _examples(), progress=False)
    s32 = headscore.score(headscore.load_model(path, progress=False), _examples(), progress=False)
    assert s64.values.abs().max() > 1e-3
    torch.testing.assert_close(s32.values, s64.values, rtol=1e-3, atol=1e-4 * float(s64.values.abs().max()))


def _o_proj_reference(lm, example, heads: int) -> torch.Tensor:
    """dL/dg [L, H] for one unpadded example, the gate put on each head's slice of the o_proj input by a hook."""
    layers = lm.model.model.layers
    gates = torch.ones(len(layers), heads, dtype=torch.float64, requires_grad=True)

    def hook(module, args, i):
        x = args[0]
        return ((x.view(*x.shape[:-1], heads, -1) * gates[i][:, None]).view_as(x),)

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: hook(m, a, i))
               for i, layer in enumerate(layers)]
    prompt = lm.tokenizer(example.prompt)["input_ids"]
    target = lm.tokenizer(example.target, add_special_tokens=False)["input_ids"]
    try:
        logits = lm.model(input_ids=torch.tensor([prompt + target])).logits[0]
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits.double(), -1)
    loss = -torch.stack([logp[len(prompt) - 1 + i, t] for i, t in enumerate(target)]).mean()
    return torch.autograd.grad(loss, gates)[0]


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["gpt-oss", "qwen3-moe", "deepseek-v3"])
def test_gate_gradient_of_quirky_families(tmp_path, family):
    """Float64 gate gradients (attention sinks, experts, latent attention) equal a hook on each layer's own
    o_proj. headscore's batch is padded, the reference runs each example alone, both through the same float64
    model: 1e-9 of the largest gradient is far above what reordered float64 sums change (observed ~1e-17)
    and far below a swapped head or layer."""
    from tiny_saved import save_tiny_family

    from headscore.methods.gradient import gate_gradients

    lm = headscore.load_model(str(save_tiny_family(tmp_path / family, family)), dtype="float64", progress=False)
    examples = _examples()
    prep = headscore.prepare(lm, examples)
    with headscore.patch(lm.model) as heads:
        batch = next(prep.batches(2, progress=False))
        assert (batch.attention_mask == 0).any(), "the test needs a padded batch"
        _, grad = gate_gradients(lm.model, heads, batch)
    got = grad[batch.example_index.argsort()]
    want = torch.stack([_o_proj_reference(lm, ex, 4) for ex in examples])
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * float(want.abs().max()))


def test_latent_attention_value_head_dim(tmp_path):
    """DeepSeek-V3 (multi-head latent attention): a head's output is v_head_dim wide (6 here), not the
    query/key head_dim; the layout, the mean baseline and mean ablation follow the real width. The mean
    baseline equals the mean of the o_proj inputs recorded by a hook (float64)."""
    from tiny_saved import save_tiny_family

    from headscore.patch import head_layout

    lm = headscore.load_model(str(save_tiny_family(tmp_path / "dsv3", "deepseek-v3")), dtype="float64",
                              progress=False)
    assert head_layout(lm.model).head_dim == 6
    examples = _examples()
    mean = headscore.mean_baseline(lm, examples, progress=False)
    assert mean.shape == (2, 4, 6)
    seen = [[], []]
    layers = lm.model.model.layers
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, args, i=i: seen[i].append(args[0][0].view(-1, 4, 6))) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for ex in examples:
                target = lm.tokenizer(ex.target, add_special_tokens=False)["input_ids"]
                ids = lm.tokenizer(ex.prompt)["input_ids"] + target
                lm.model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    want = torch.stack([torch.cat(s).mean(0) for s in seen])  # a float64 model: a float64 mean
    torch.testing.assert_close(mean, want, rtol=1e-12, atol=1e-14)
    naive = headscore.ablate(lm, examples, baseline="mean", mode="naive", progress=False)
    prefix = headscore.ablate(lm, examples, baseline="mean", progress=False)
    assert naive.values.abs().max() > 0
    torch.testing.assert_close(prefix.values, naive.values, rtol=1e-6, atol=1e-9)
