"""Fast correctness tests of the bench code (tiny random models): every method computes what it claims."""

import importlib.util
import json

import pytest
import torch
from tiny import random_examples, tiny_model

import headscore
from headscore import bench
from headscore.cli import main
from headscore.loss import example_losses


@pytest.fixture(scope="module")
def setup():
    lm = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8)
    return lm, random_examples(12)


def ctx_for(setup, **kw):
    lm, examples = setup
    return bench.Context(lm, examples, batch_size=4, **kw)


def test_target_losses_equal_example_losses(setup):
    ctx = ctx_for(setup)
    for batch in ctx.prep.batches(4, progress=False):
        with torch.no_grad():
            logits = ctx.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            torch.testing.assert_close(bench.target_losses(logits, batch), example_losses(ctx.lm.model, batch))


def test_hooks_attribution_equals_headscore_taylor(setup):
    """grad x act at the o_proj inputs (how hook libraries compute attribution) is exactly taylor."""
    ctx = ctx_for(setup)
    hooks = bench.run_hooks_attribution(ctx).scores
    taylor = bench.run_taylor(ctx).scores
    assert hooks.values.shape == taylor.values.shape
    torch.testing.assert_close(hooks.values, taylor.values, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in ctx.lm.model.parameters())


def test_floor_leaves_model_as_it_was(setup):
    ctx = ctx_for(setup)
    flags = [p.requires_grad for p in ctx.lm.model.parameters()]
    bench.run_floor(ctx)
    assert [p.requires_grad for p in ctx.lm.model.parameters()] == flags
    assert all(p.grad is None for p in ctx.lm.model.parameters())


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_sampled_ablation_matches_full_ablation(setup, mode):
    ctx = ctx_for(setup, sample_heads=3)
    out = bench.sampled_ablation(ctx, mode)
    assert "extrapolated from 3 of 8 heads" in out.note and out.seconds > 0
    full = headscore.ablate(ctx.lm, ctx.examples, batch_size=4, progress=False)
    assert sorted(out.partial) == ctx.head_sample() == [0, 4, 7]
    for flat, per_task in out.partial.items():
        torch.testing.assert_close(torch.tensor(per_task, dtype=torch.float64),
                                   full.values[:, flat // 4, flat % 4], atol=1e-5, rtol=1e-4)


def test_run_bench_table(setup, tmp_path):
    ctx = ctx_for(setup, sample_heads=2)
    doc = bench.run_bench(ctx, ["floor", "taylor", "ablate-batched", "ablate-sequential", "hooks-attribution"],
                          repeats=2, warmup=1, memory="inprocess")
    rows = {r["method"]: r for r in doc["rows"]}
    assert all(len(r["times"]) == (1 if m == "ablate-batched" else 2) for m, r in rows.items())
    assert rows["ablate-sequential"]["status"] == "extrapolated"
    assert rows["taylor"]["spearman"] is not None and rows["hooks-attribution"]["spearman"] is not None
    assert abs(rows["taylor"]["spearman"] - rows["hooks-attribution"]["spearman"]) < 1e-6
    assert "max |diff| vs headscore taylor" in rows["hooks-attribution"]["note"]
    assert all(r["peak_mib"] is not None for r in rows.values())
    assert doc["heads"] == 8 and doc["machine"]["cores"] >= 1
    paths = bench.write_outputs(doc, tmp_path)
    assert json.loads(paths["json"].read_text())["rows"][0]["method"] == "floor"
    assert "x floor" in paths["md"].read_text() and paths["csv"].read_text().startswith("method,")


def test_missing_peer_is_reported_not_raised(setup, tmp_path):
    ctx = ctx_for(setup)
    absent = bench.load_peers(tmp_path / "nope.py")
    assert isinstance(absent, str) and "not found" in absent
    peers = bench.load_peers()
    assert not isinstance(peers, str), peers
    for name in peers.PEERS:
        reason = peers.unavailable(name)
        lib = "nnsight" if name.startswith("nnsight") else "transformer_lens"
        assert (reason is None) == (importlib.util.find_spec(lib) is not None)
    if importlib.util.find_spec("nnsight") is None:
        doc = bench.run_bench(ctx, ["taylor", "nnsight-attribution"], repeats=1, warmup=0, memory="off")
        assert doc["rows"][1]["status"].startswith("unavailable: nnsight is not installed")


@pytest.mark.skipif(importlib.util.find_spec("nnsight") is None, reason="nnsight not installed (optional peer)")
def test_nnsight_attribution_equals_taylor(setup):
    peers = bench.load_peers()
    ctx = ctx_for(setup)
    tok = ctx.lm.tokenizer  # nnsight's LanguageModel reads these; the byte tokenizer lacks them
    tok.padding_side, tok.pad_token, tok.eos_token = "right", "<pad>", "<pad>"
    got = peers.nnsight_attribution(ctx).scores
    torch.testing.assert_close(got.values, bench.run_taylor(ctx).scores.values, atol=1e-5, rtol=1e-4)


def test_cli_bench_rejects_unknown_method(capsys):
    assert main(["bench", "--methods", "taylor,bogus"]) == 2
    assert "unknown bench method 'bogus'" in capsys.readouterr().err
