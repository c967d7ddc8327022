"""Fast correctness tests of the bench code (tiny random models): every method computes what it claims."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from tiny import random_examples, tiny_model
from tiny_saved import save_tiny_model

import headscore
from headscore import bench
from headscore.cli import main
from headscore.loss import NonFiniteLoss, example_losses


@pytest.fixture(scope="module")
def setup():
    lm = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8)
    return lm, random_examples(12)


def ctx_for(setup, **kw):
    lm, examples = setup
    return bench.Context(lm, examples, batch_size=4, **kw)


def test_losses_from_logits_equal_example_losses(setup):
    ctx = ctx_for(setup)
    for batch in ctx.prep.batches(4, progress=False):
        with torch.no_grad():
            logits = ctx.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            torch.testing.assert_close(bench.losses_from_logits(logits, batch), example_losses(ctx.lm.model, batch))


def test_losses_from_logits_refuses_non_finite_loss(setup):
    ctx = ctx_for(setup)
    batch = next(iter(ctx.prep.batches(4, progress=False)))
    with torch.no_grad():
        logits = ctx.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits[0] = float("nan")
    with pytest.raises(NonFiniteLoss):
        bench.losses_from_logits(logits, batch)


def test_head_sample_is_evenly_spaced():
    assert bench.head_sample(8, 3) == [0, 4, 7]
    assert bench.head_sample(8, 1) == [0]
    assert bench.head_sample(8, 8) is None and bench.head_sample(8, None) is None
    assert bench.head_sample(270, 6) == [0, 54, 108, 161, 215, 269]  # the SmolLM2 run in RESULTS.md


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


class HookZBridge:
    """Stands in for TransformerLens' bridge (not a dependency): ``blocks.L.attn.hook_z`` is the input of
    layer L's o_proj, [B, T, H*D], which the TransformerLens ablation zeroes one head of in place."""

    def __init__(self, model):
        self.model, self.projs, self.handles = model, bench.o_proj_modules(model), []

    def __call__(self, input_ids, attention_mask, return_type):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def add_hook(self, name, fn, direction):
        def pre_hook(_m, args):
            if direction == "fwd":
                fn(args[0], None)
            elif args[0].requires_grad:
                args[0].register_hook(lambda grad: fn(grad, None))
        self.handles.append(self.projs[int(name.split(".")[1])].register_forward_pre_hook(pre_hook))

    def reset_hooks(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)

    def run_with_hooks(self, input_ids, attention_mask, return_type, fwd_hooks):
        handles = [self.projs[int(name.split(".")[1])].register_forward_pre_hook(
            lambda _m, args, fn=fn: fn(args[0], None)) for name, fn in fwd_hooks]
        try:
            return self(input_ids, attention_mask, return_type)
        finally:
            for h in handles:
                h.remove()


def test_tl_ablation_shares_the_sampled_sweep(setup, monkeypatch):
    """The TransformerLens ablation (through a stand-in bridge) samples the same heads and measures the same
    loss increases as headscore's sequential sweep."""
    ctx = ctx_for(setup, sample_heads=3)
    monkeypatch.setattr(bench.peers, "_bridge", lambda c: HookZBridge(c.lm.model))
    got = bench.tl_ablation(ctx)
    want = bench.sampled_ablation(ctx, "sequential")
    assert got.note == want.note == "extrapolated from 3 of 8 heads" and got.seconds > 0
    assert sorted(got.partial) == sorted(want.partial) == [0, 4, 7]
    for flat in want.partial:
        torch.testing.assert_close(torch.tensor(got.partial[flat]), torch.tensor(want.partial[flat]),
                                   atol=1e-5, rtol=1e-4)


def test_tl_attribution_equals_taylor(setup, monkeypatch):
    ctx = ctx_for(setup)
    monkeypatch.setattr(bench.peers, "_bridge", lambda c: HookZBridge(c.lm.model))
    got = bench.tl_attribution(ctx).scores
    torch.testing.assert_close(got.values, bench.run_taylor(ctx).scores.values, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in ctx.lm.model.parameters())


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


def test_missing_peer_is_reported_not_raised(setup):
    ctx = ctx_for(setup)
    for name in bench.PEERS:
        reason = bench.unavailable(name)
        lib = "nnsight" if name.startswith("nnsight") else "transformer_lens"
        assert (reason is None) == (importlib.util.find_spec(lib) is not None)
        assert bench.resolve(name) == (reason if reason else bench.PEERS[name])
    if importlib.util.find_spec("nnsight") is None:
        doc = bench.run_bench(ctx, ["taylor", "nnsight-attribution"], repeats=1, warmup=0, memory="off")
        assert doc["rows"][1]["status"].startswith("unavailable: nnsight is not installed")


@pytest.mark.skipif(importlib.util.find_spec("nnsight") is None, reason="nnsight not installed (optional peer)")
def test_nnsight_attribution_equals_taylor(setup):
    ctx = ctx_for(setup)
    tok = ctx.lm.tokenizer  # nnsight's LanguageModel reads these; the byte tokenizer lacks them
    tok.padding_side, tok.pad_token, tok.eos_token = "right", "<pad>", "<pad>"
    got = bench.nnsight_attribution(ctx).scores
    torch.testing.assert_close(got.values, bench.run_taylor(ctx).scores.values, atol=1e-5, rtol=1e-4)


def test_cli_bench_rejects_unknown_method(capsys):
    assert main(["bench", "--methods", "taylor,bogus"]) == 2
    assert "unknown bench method 'bogus'" in capsys.readouterr().err
    for empty in (",", "", " , "):  # ran, printed an empty table and exited 0
        assert main(["bench", "--methods", empty]) == 2
        assert "--methods names no method; choose from floor, taylor" in capsys.readouterr().err


def test_prefix_ablation_is_never_extrapolated_from_a_sample(setup):
    """With the batched sweep sampled (``--sample-ablation``), prefix ablation still runs every head: a sample's
    time counted its recording pass once per head and its heads in passes of their own (1.1-2.4x too high)."""
    ctx = ctx_for(setup, sample_heads=3, full_ablation=False)
    prefix = bench.methods.run_ablate_prefix(ctx)
    assert prefix.scores is not None and prefix.partial is None and "extrapolated" not in prefix.note
    full = headscore.ablate(ctx.lm, ctx.examples, batch_size=4, progress=False)
    torch.testing.assert_close(prefix.scores.values, full.values, rtol=0, atol=1e-12)
    assert "extrapolated from 3 of 8 heads" in bench.methods.run_ablate_batched(ctx).note  # batched still sampled


@pytest.mark.slow  # 2 min in a shared CI run: a fresh Python worker per method
def test_cli_bench_measures_memory_in_worker_subprocesses(tmp_path, capsys):
    """End to end: ``headscore bench`` with the default ``--memory subprocess``, whose workers are
    ``python -m headscore.bench --memory-worker ...`` processes."""
    model = save_tiny_model(tmp_path / "model", layers=2, heads=4)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"The {w} is", "target": f" {w}{i}", "task": t}) + "\n"
                             for i, (w, t) in enumerate([("cat", "a"), ("dog", "a"), ("sun", "b"), ("sea", "b")])))
    out = tmp_path / "out"
    assert main(["bench", "--model", str(model), "--tasks", str(tasks), "--batch-size", "2", "--no-progress",
                 "--methods", "floor,taylor,ablate-sequential", "--sample-heads", "3", "--repeats", "1",
                 "--warmup", "0", "--out", str(out)]) == 0
    assert "| headscore taylor, all heads (one pass) (`taylor`) | ok |" in capsys.readouterr().out
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    for row in rows.values():
        # the worker ran with malloc returning freed tensors at once (a deterministic high-water mark)
        assert row["memory_how"].endswith(", malloc: mmap from 64 KiB, one arena (fresh subprocess)"), row["memory_how"]
        assert row["peak_mib"] is not None
    assert rows["ablate-sequential"]["status"] == "extrapolated"


@pytest.mark.slow  # 40 s in a shared CI run: worker subprocesses
def test_memory_worker_reports_failure_and_needs_its_options(tmp_path):
    args = {"model": str(tmp_path / "no-model"), "device": "cpu", "dtype": "float32", "tasks": "builtin",
            "batch_size": 2, "max_examples": 1, "rows_per_pass": 8, "sample_heads": 2, "full_ablation": True}
    mib, how = bench.measure_memory_subprocess("taylor", args, timeout=300)
    assert mib is None and how.startswith("memory worker failed:") and "no-model" in how
    proc = subprocess.run([sys.executable, "-m", "headscore.bench"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "headscore bench" in proc.stderr
