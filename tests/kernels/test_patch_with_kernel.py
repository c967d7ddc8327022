"""End to end: headscore scores through the fused Triton kernel equal scores through the wrapper path."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import random_examples, tiny_model  # noqa: E402

import headscore  # noqa: E402
from headscore.kernels import triton_available  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.numerics,
              pytest.mark.skipif(not triton_available(), reason="triton is not installed")]


@pytest.mark.slow  # 4-8 s each on 2 cores (the Triton interpreter); the kernel's own tests stay in the fast tier
@pytest.mark.parametrize("family,kv_heads", [("llama", 2), ("qwen2", 1)])
@pytest.mark.parametrize("method", ["taylor", "atp-mean"])
def test_scores_with_kernel_equal_scores_without(family, kv_heads, method):
    lm = tiny_model(family, layers=2, heads=4, kv_heads=kv_heads, head_dim=16)
    examples = random_examples(6)  # mixed lengths: right padding inside batches
    with_kernel = headscore.score(lm, examples, method=method, batch_size=3, progress=False, kernel=True)
    without = headscore.score(lm, examples, method=method, batch_size=3, progress=False, kernel=False)
    assert without.values.abs().max() > 1e-3
    rel = (with_kernel.values - without.values).abs().max() / without.values.abs().max()
    assert rel < 1e-4, f"relative difference {rel:.2e}"


def test_kernel_really_runs_and_ablation_is_exact():
    lm = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    ids = torch.randint(2, 90, (2, 9))
    with headscore.patch(lm.model, kernel=True) as heads:
        gates = heads.ones(2)
        gates[0, 1, 3] = 0.0
        with heads.using(gates), torch.no_grad():
            fused = lm.model(input_ids=ids).logits
        assert heads.kernel_calls == 2  # one per layer
    with headscore.patch(lm.model, kernel=False) as heads, heads.using(gates), torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        assert heads.kernel_calls == 0
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # 5-8 s on 2 cores (the Triton interpreter)
def test_per_position_scores_through_the_kernel():
    """score(per_position=True) is served by the kernel (all-ones per-position gates) and equals the wrapper's
    per-position maps; per-position ablation rows (a gate changed at one token) fall back to the wrapper."""
    lm = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    examples = random_examples(6)
    kw = {"per_position": True, "batch_size": 3, "progress": False, "metric": "prob"}
    with_kernel = headscore.score(lm, examples, kernel=True, **kw)
    without = headscore.score(lm, examples, kernel=False, **kw)
    scale = without.position_values.abs().max()
    assert scale > 1e-4
    rel = (with_kernel.position_values - without.position_values).abs().max() / scale
    assert rel < 1e-4, f"relative difference {rel:.2e}"
    ids = torch.randint(2, 90, (2, 9))
    with headscore.patch(lm.model, kernel=True) as heads, torch.no_grad():
        with heads.using(heads.ones(2, positions=9)):
            lm.model(input_ids=ids)
        assert heads.kernel_calls == 2
        one_token = heads.ones(2, positions=9)
        one_token[:, 1, 4, 2] = 0.0
        with heads.using(one_token):
            lm.model(input_ids=ids)
        assert heads.kernel_calls == 2 + 1  # layer 0 is uniform, layer 1 falls back


def test_exact_edge_patching_runs_every_pass_through_the_kernel():
    """Exact edge patching's clean pass (which records the writers) and its patched passes run the same attention
    code: with the clean writers as the baseline every edge's change is exactly 0, whatever edges share a pass
    (the clean pass is not an observed one the kernel would decline)."""
    from headscore.edges.attribution import writer_outputs
    from headscore.edges.patching import edge_patched_losses
    from headscore.edges.residual import residual_model
    from headscore.prepared import prepare

    lm = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, dtype=torch.bfloat16)
    rm = residual_model(lm.model)
    batch = next(iter(prepare(lm, random_examples(3, seed=0)).batches(3, progress=False)))
    edges = [(0, len(rm.graph.downstream) - 1), (0, 0)]  # emb -> logits, emb -> L0.H0.q: one pass from layer 0
    with headscore.patch(lm.model, kernel=True) as heads:
        clean = writer_outputs(lm.model, heads, rm, batch)
        calls = heads.kernel_calls
        before, patched = edge_patched_losses(lm.model, heads, rm, batch, edges, clean)
        assert heads.kernel_calls - calls >= 2 * 2  # the clean pass and the patched pass, two layers each
    assert before.abs().max() > 0
    assert torch.equal(patched, before[None].expand_as(patched))


def test_fast_per_position_patching_compares_like_with_like():
    """The fast per-position passes run on cached tokens, which the kernel does not take; their clean run and
    their uncached first-token passes skip it too, so a cell changed to its own value (gate 1) changes the loss
    by exactly 0 in bf16, and a real change is what the wrapper path gives."""
    from headscore.loss import resolve_metric
    from headscore.methods import position_patching as pp
    from headscore.methods.ablation import clean_losses
    from headscore.prepared import prepare

    lm = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, dtype=torch.bfloat16)
    batch = next(iter(prepare(lm, random_examples(3, seed=0)).batches(3, progress=False)))
    metric = resolve_metric("nll")
    with headscore.patch(lm.model, kernel=True) as heads:
        clean = clean_losses(lm.model, heads, batch, metric)
        assert heads.kernel_calls == 2  # the kernel is there for the passes that may take it
        nothing = pp.position_deltas(lm.model, heads, batch, clean, metric=metric, value=1.0)
        zeroed = pp.position_deltas(lm.model, heads, batch, clean, metric=metric)
        assert heads.kernel_calls == 2
    with headscore.patch(lm.model, kernel=False) as heads:
        wrapped = pp.position_deltas(lm.model, heads, batch, clean_losses(lm.model, heads, batch, metric),
                                     metric=metric)
    assert zeroed.abs().max() > 1e-2
    assert torch.equal(nothing, torch.zeros_like(nothing))
    assert torch.equal(zeroed, wrapped)
