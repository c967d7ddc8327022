"""headscore.kernels.dispatch: which calls the fused kernel serves (the rest falls back to the wrapper)."""

import pytest
import torch

from headscore.kernels.dispatch import fused_gated_attention, kernel_available, key_padding_mask


def causal_padding_mask(keep: torch.Tensor) -> torch.Tensor:
    """A transformers-style boolean mask [B, 1, T, T]: causal and key padding."""
    t = keep.shape[1]
    return (torch.ones(t, t, dtype=torch.bool).tril()[None] & keep[:, None, :])[:, None]


def test_key_padding_mask_recognises_causal_plus_padding():
    keep = torch.tensor([[True, True, True, False], [True, True, True, True]])
    ok, pad = key_padding_mask(causal_padding_mask(keep), 4, 4)
    assert ok and torch.equal(pad, keep)
    ok, pad = key_padding_mask(causal_padding_mask(torch.ones(2, 4, dtype=torch.bool)), 4, 4)
    assert ok and pad is None  # nothing padded: no mask needed
    assert key_padding_mask(None, 4, 4) == (True, None)
    # no mask with more keys than queries: a static cache's empty slots, masked top-left by the model's own
    # attention (the kernel would align bottom-right and see them)
    assert key_padding_mask(None, 4, 6) == (False, None)


@pytest.mark.parametrize("bad", ["sliding", "float", "cross", "packed"])
def test_key_padding_mask_refuses_other_masks(bad):
    mask = causal_padding_mask(torch.ones(1, 5, dtype=torch.bool))
    if bad == "sliding":
        mask = mask & torch.ones(5, 5, dtype=torch.bool).triu(-1)
    elif bad == "float":
        mask = mask.float()
    elif bad == "packed":  # two documents in one row: block-diagonal
        mask = mask.clone()
        mask[..., 3:, :3] = False
    q_len = 4 if bad == "cross" else 5
    assert key_padding_mask(mask, q_len, 5) == (False, None)


class Attn(torch.nn.Module):
    layer_idx = 0
    is_causal = True


@pytest.mark.parametrize("why", ["not wanted", "cpu default", "observed", "dropout", "softcap", "sliding_window",
                                 "float64", "no layer_idx", "not causal", "one query", "custom mask",
                                 "static cache prefill", "block mask", "latent values", "wide heads", "gqa remainder",
                                 "mixed dtypes", "sinks", "s_aux", "packed positions", "cu_seq_lens",
                                 "call not causal", "position_bias", "indices", "block_indices"])
def test_calls_the_kernel_cannot_serve_fall_back(why):
    """Each of these returns None before any kernel runs (so this needs no GPU and no interpreter)."""
    q = torch.randn(1, 2, 4, 8)
    k = v = q
    kw = dict(gates=None, baseline=None, wanted=True, observed=False)
    module, mask = Attn(), None
    if why == "not wanted":
        kw["wanted"] = False
    elif why == "cpu default":
        kw["wanted"] = None
    elif why == "observed":
        kw["observed"] = True
    elif why == "dropout":
        kw["dropout"] = 0.1
    elif why in ("softcap", "sliding_window"):
        kw[why] = 4
    elif why == "float64":
        q = q.double()
    elif why == "no layer_idx":
        module = torch.nn.Module()
    elif why == "not causal":
        module.is_causal = False
    elif why == "one query":
        q = q[:, :, :1]
    elif why == "custom mask":
        mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)  # bidirectional: not causal
    elif why == "static cache prefill":  # 4 queries, 6 cache slots, no mask
        k = v = torch.randn(1, 2, 6, 8)
    elif why == "block mask":  # FlexAttention's mask is no tensor
        mask = object()
    elif why == "latent values":  # DeepSeek-V3's values are narrower than its keys
        v = torch.randn(1, 2, 4, 4)
    elif why == "wide heads":
        q = k = v = torch.randn(1, 2, 4, 320)
    elif why == "gqa remainder":
        k = v = torch.randn(1, 3, 4, 8)  # 2 query heads over 3 key heads
    elif why == "mixed dtypes":
        k = v = q.half()
    elif why in ("sinks", "s_aux"):  # GPT-OSS-style attention sinks, one logit per head
        kw[why] = torch.zeros(2)
    elif why == "packed positions":  # flash attention's packing: two documents in one unmasked row
        kw["position_ids"] = torch.tensor([[0, 1, 0, 1]])
    elif why == "cu_seq_lens":
        kw["cu_seq_lens_q"] = kw["cu_seq_lens_k"] = torch.tensor([0, 2, 4], dtype=torch.int32)
    elif why == "call not causal":  # transformers' SDPA lets the call's is_causal override the module's
        kw["is_causal"] = False
    elif why == "position_bias":  # an additive bias on the attention logits
        kw["position_bias"] = torch.zeros(1, 2, 4, 4)
    elif why == "indices":  # a sparse model's top-k keys per query (DeepSeek-V3.2 under another name)
        kw["indices"] = torch.zeros(1, 4, 2, dtype=torch.long)
    elif why == "block_indices":  # MiniMax-M3-VL's selected key blocks
        kw["block_indices"] = torch.zeros(1, 2, 1, dtype=torch.long)
    assert fused_gated_attention(module, q, k, v, mask, **kw) is None


def test_settings_that_change_nothing_are_still_served(monkeypatch):
    """softcap/sliding_window None or 0, consecutive position ids: the call reaches the kernel (stubbed here)."""
    import headscore.kernels.dispatch as dispatch

    seen = []
    monkeypatch.setattr(dispatch, "gated_attention", lambda q, *a, **k: seen.append(1) or q)
    q = torch.randn(1, 2, 4, 8)
    kw = dict(gates=None, baseline=None, wanted=True, observed=False, softcap=None, sliding_window=0,
              position_ids=torch.arange(4)[None], s_aux=None)
    assert fused_gated_attention(Attn(), q, q, q, None, **kw) is not None and seen == [1]


def test_kernel_available_only_on_cuda():
    assert not kernel_available(torch.device("cpu"))


@pytest.mark.parametrize("capability,served", [((7, 5), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)])
def test_gpus_older_than_ampere_are_not_served(monkeypatch, capability, served):
    """A T4 (sm_75, 64 KiB of shared memory per block) fits none of the sm80 configs: ``auto`` leaves it the
    model's own attention, and ``kernel=True`` says why (checked with a stubbed CUDA device: no GPU here)."""
    import headscore.kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch, "_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda")
    assert dispatch.kernel_available(cuda) is served
    why = dispatch.kernel_unavailable(cuda)
    assert (why is None) is served
    if not served:
        assert "compute capability 8.0 (Ampere) or newer; this one has 7.5" in why
