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


def test_register_and_unregister_leave_no_trace():
    before = set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)
    compat.register_attention("headscore_test_key", lambda *a, **k: None, masks_like="sdpa")
    assert "headscore_test_key" in AttentionInterface._global_mapping
    assert AttentionMaskInterface._global_mapping["headscore_test_key"] is \
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"]
    compat.unregister_attention("headscore_test_key")
    compat.unregister_attention("headscore_test_key")  # twice is fine
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


def test_family_without_sdpa_loads_with_eager(tmp_path):
    """GPT-OSS has no SDPA attention: load_model falls back to eager (an explicit 'sdpa' still fails with one
    clear line), and the model is gated: exact ablation of every head equals the prefix-reuse result."""
    import transformers
    from tiny_saved import char_tokenizer

    from headscore.errors import HeadscoreError

    tok = char_tokenizer()
    config = transformers.GptOssConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=0, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10000.0})
    torch.manual_seed(0)
    transformers.GptOssForCausalLM(config).save_pretrained(tmp_path / "gpt-oss")
    tok.save_pretrained(tmp_path / "gpt-oss")
    lm = headscore.load_model(str(tmp_path / "gpt-oss"), progress=False)
    assert lm.model.config._attn_implementation == "eager"
    with pytest.raises(HeadscoreError, match="scaled_dot_product_attention"):
        headscore.load_model(str(tmp_path / "gpt-oss"), attn_implementation="sdpa", progress=False)
    examples = [headscore.Example("When Ann and Bob went out, Bob gave it to ", "Ann", "t"),
                headscore.Example("Then Cy and Di sat, Di read to ", "Cy", "t")]
    scores = headscore.score(lm, examples, progress=False)
    assert scores.values.abs().max() > 0
    naive = headscore.ablate(lm, examples, mode="naive", progress=False)
    prefix = headscore.ablate(lm, examples, progress=False)
    torch.testing.assert_close(prefix.values, naive.values, rtol=1e-4, atol=1e-5)


def test_mixture_of_experts_in_float64(tmp_path):
    """Qwen3-MoE in float64: the experts' grouped matmul has no float64, so load_model runs them one by one;
    the scores equal the float32 model's to float32 precision."""
    import transformers
    from tiny_saved import char_tokenizer

    tok = char_tokenizer()
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    examples = [headscore.Example("When Ann and Bob went out, Bob gave it to ", "Ann", "t")]
    s64 = headscore.score(headscore.load_model(str(tmp_path / "moe"), dtype="float64", progress=False), examples,
                          progress=False)
    s32 = headscore.score(headscore.load_model(str(tmp_path / "moe"), progress=False), examples, progress=False)
    assert s64.values.abs().max() > 1e-3
    torch.testing.assert_close(s32.values, s64.values, rtol=1e-3, atol=1e-4 * float(s64.values.abs().max()))


def test_latent_attention_value_head_dim(tmp_path):
    """DeepSeek-V3 (multi-head latent attention): a head's output is v_head_dim wide (6 here), not the
    query/key head_dim; the layout, the mean baseline and mean ablation follow the real width. The mean
    baseline equals the mean of the o_proj inputs recorded by a hook (float64)."""
    import transformers
    from tiny_saved import char_tokenizer

    from headscore.patch import head_layout

    tok = char_tokenizer()
    config = transformers.DeepseekV3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8,
        v_head_dim=6, n_group=1, topk_group=1, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=0)
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(tmp_path / "dsv3")
    tok.save_pretrained(tmp_path / "dsv3")
    lm = headscore.load_model(str(tmp_path / "dsv3"), dtype="float64", progress=False)
    assert head_layout(lm.model).head_dim == 6
    examples = [headscore.Example("When Ann and Bob went out, Bob gave it to ", "Ann", "t"),
                headscore.Example("Then Cy and Di sat, Di read to ", "Cy", "t")]
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
    want = torch.stack([torch.cat(s).mean(0) for s in seen]).float()
    torch.testing.assert_close(mean, want, rtol=1e-5, atol=1e-6)
    naive = headscore.ablate(lm, examples, baseline="mean", mode="naive", progress=False)
    prefix = headscore.ablate(lm, examples, baseline="mean", progress=False)
    assert naive.values.abs().max() > 0
    torch.testing.assert_close(prefix.values, naive.values, rtol=1e-6, atol=1e-9)
