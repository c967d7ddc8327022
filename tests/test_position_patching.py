"""Fast per-position patching (KV cache of the clean run + layer-prefix replay, only the tokens a cell can change)
equals the plain path (one full forward pass per (layer, head, token) cell) in float64, on padded batches,
for every baseline and metric; cells after the last token the metric reads are 0 both ways; a model the fast
path cannot serve falls back to the plain path with a warning."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from test_ablation import tiny_gpt2
from test_counterfactual import counterfactual_examples
from tiny import tiny_model

import headscore
from headscore.loss import resolve_metric
from headscore.methods import position_patching as pp
from headscore.methods.ablation import clean_losses
from headscore.methods.baseline import corrupt_head_outputs, mean_head_outputs
from headscore.patch import patch

pytestmark = [pytest.mark.numerics, pytest.mark.filterwarnings("ignore:per-position. prompts of"),
              pytest.mark.usefixtures("one_thread")]

ATOL = 1e-10


def _model(family: str):
    if family == "gpt2":
        return tiny_gpt2(layers=3, seed=2)
    kv = {"llama": 2, "qwen2": 1}[family]  # GQA, MQA
    return tiny_model(family, layers=3, heads=4, kv_heads=kv, dtype=torch.float64, seed=5)


def _deltas(lm, examples, baseline: str, metric: str, *, mode: str = "prefix", batch_size: int = 3,
            max_rows: int = 64):
    """Per batch: (batch, fast [B, L, T, H], plain [B, L, T, H], last read token [B])."""
    prep = headscore.prepare(lm, examples)
    metric = resolve_metric(metric)
    out = []
    with patch(lm.model) as heads:
        static = mean_head_outputs(lm.model, heads, prep.batches(batch_size, progress=False)) \
            if baseline == "mean" else None
        for batch in prep.batches(batch_size, progress=False):
            base = corrupt_head_outputs(lm.model, heads, batch) if baseline == "corrupt" else static
            clean = clean_losses(lm.model, heads, batch, metric)
            kw = dict(metric=metric, max_rows=max_rows)
            fast = pp.position_deltas(lm.model, heads, batch, clean, base, mode=mode, fast=True, **kw)
            plain = pp.position_deltas(lm.model, heads, batch, clean, base, mode="naive", **kw)
            out.append((batch, fast, plain, pp.last_read_positions(batch, metric)))
    return out


def _unread(batch, last):
    """[B, T] True at tokens after the last one each row's metric reads (padding included)."""
    return torch.arange(batch.input_ids.shape[1])[None] > last[:, None]


CASES = [(f, b, m) for f in ("llama", "qwen2", "gpt2") for b in ("zero", "mean", "corrupt")
         for m in ("nll", "logit-diff")]


@pytest.mark.parametrize("family,baseline,metric", CASES)
def test_fast_equals_plain(family, baseline, metric):
    lm = _model(family)
    examples = counterfactual_examples(5, seed=3)
    runs = _deltas(lm, examples, baseline, metric, max_rows=16)  # a few cells a pass: most start above layer 0
    assert any(not bool(b.attention_mask.all()) for b, *_ in runs)  # padded rows
    for batch, fast, plain, last in runs:
        assert plain.abs().max() > 1e-3
        torch.testing.assert_close(fast, plain, rtol=0, atol=ATOL)
        unread = _unread(batch, last)[:, None, :, None].expand_as(fast)
        assert unread.any()
        assert bool((fast[unread] == 0).all())  # no pass ran for them
        assert float(plain[unread].abs().max()) < 1e-12  # the full pass agrees: nothing reads them


def test_passes_split_cells_and_skip_layers():
    """One or two cells a pass, batched mode (no layer replay; every token's cells in one pass from layer 0) and a
    gate above 1 give the plain path's numbers too."""
    lm = _model("llama")
    examples = counterfactual_examples(4, seed=8)
    for _, fast, plain, _ in _deltas(lm, examples, "corrupt", "nll", max_rows=4, batch_size=2):
        torch.testing.assert_close(fast, plain, rtol=0, atol=ATOL)
    for _, fast, plain, _ in _deltas(lm, examples, "zero", "logit-diff", mode="batched"):
        torch.testing.assert_close(fast, plain, rtol=0, atol=ATOL)
    prep = headscore.prepare(lm, examples)
    with patch(lm.model) as heads:
        batch = next(iter(prep.batches(4, progress=False)))
        clean = clean_losses(lm.model, heads, batch)
        fast = pp.position_deltas(lm.model, heads, batch, clean, value=2.5, max_rows=8)
        plain = pp.position_deltas(lm.model, heads, batch, clean, value=2.5, mode="naive")
    torch.testing.assert_close(fast, plain, rtol=0, atol=ATOL)


@pytest.mark.parametrize("metric", ["nll", "logit-diff"])
def test_cells_whose_output_is_the_baseline_run_no_pass(monkeypatch, metric):
    """Corrupted prompts that start like the clean ones: at the shared tokens every head's output equals its
    corrupted-run output, so those cells change nothing; they are exactly 0 without a pass (the plain path
    gets 0 too), fewer cells run, and every other cell still equals the plain path."""
    lm = _model("llama")
    examples = [dataclasses.replace(ex, corrupt=ex.prompt[:4] + ex.corrupt[4:])
                for ex in counterfactual_examples(5, seed=11)]
    ran: list[int] = []
    run = pp.PositionPatcher.run

    def counting(self, position, cells, rows):
        ran.append(len(cells) * len(rows))
        return run(self, position, cells, rows)

    monkeypatch.setattr(pp.PositionPatcher, "run", counting)
    layout_cells, most = 3 * 4, 0
    for batch, fast, plain, last in _deltas(lm, examples, "corrupt", metric):
        torch.testing.assert_close(fast, plain, rtol=0, atol=ATOL)
        shared = (batch.input_ids == batch.corrupt_ids).cumprod(1).bool()  # tokens before the first difference
        shared &= batch.attention_mask.bool()
        assert int(shared.sum(1).min()) >= 2
        cells = shared[:, None, :, None].expand_as(fast)
        assert bool((fast[cells] == 0).all()) and float(plain[cells].abs().max()) < 1e-12
        assert float(plain[~cells & ~_unread(batch, last)[:, None, :, None].expand_as(fast)].abs().max()) > 1e-3
        reading = [int((last >= p).sum()) for p in range(batch.input_ids.shape[1])]  # rows a pass at p holds
        all_shared = shared.all(0)
        most += sum(n for p, n in enumerate(reading) if not all_shared[p]) * layout_cells
    assert sum(ran) == most  # every cell of a token shared by all rows of its passes skipped, no other


def test_a_user_metric_reads_every_position():
    """A callable sees the logits of every token (padding too): nothing is skipped, and the values still agree."""
    lm = _model("qwen2")

    def mean_logit(logits, batch):
        return logits[..., :7].mean((1, 2))

    for batch, fast, plain, last in _deltas(lm, counterfactual_examples(4, seed=4), "zero", mean_logit):
        assert bool((last == batch.input_ids.shape[1] - 1).all())
        torch.testing.assert_close(fast, plain, rtol=0, atol=ATOL)
        assert float(fast[:, :, -1].abs().max()) > 1e-6  # the last token changes its own logits


def _broken_crop(self, part, position, copies, depth):
    """The cache without the last token before the pass's first (position ids and mask then disagree)."""
    short = dataclasses.replace(part, keys=[k[:, :, :-1] for k in part.keys],
                                values=[v[:, :, :-1] for v in part.values])
    return original_cache(self, short, position - 1, copies, depth)


original_cache = pp.PositionPatcher._cache


def _no_cache_keyword(model):
    return None


@pytest.mark.parametrize("breakage", ["crop", "no-cache"])
def test_falls_back_to_the_plain_path(monkeypatch, breakage):
    """A broken cache crop is caught by the check (and would break the values: the test above can fail); a model
    whose forward takes no cache is refused; either way ablate warns and gives the plain path's numbers."""
    lm = _model("llama")
    examples = counterfactual_examples(4, seed=6)
    kw = dict(baseline="corrupt", metric="logit-diff", per_position=True, batch_size=4, progress=False)
    plain = headscore.ablate(lm, examples, mode="naive", **kw)
    if breakage == "crop":
        monkeypatch.setattr(pp.PositionPatcher, "_cache", _broken_crop)
        (batch, fast, reference, _), = _deltas(lm, examples, "corrupt", "logit-diff", batch_size=4)
        assert float((fast - reference).abs().max()) > 1e-3
    else:
        monkeypatch.setattr(pp, "_cache_keyword", _no_cache_keyword)
    with pytest.warns(UserWarning, match="per-position patching takes the plain path"):
        got = headscore.ablate(lm, examples, **kw)
    torch.testing.assert_close(got.position_values, plain.position_values, rtol=0, atol=ATOL)


def test_ablate_per_position_counts_cells(capsys):
    """ablate(per_position=True) runs the fast path (no warning), equals mode naive (the plain path), and its
    progress bar counts (example, layer, head, token) cells."""
    lm = _model("gpt2")
    examples = counterfactual_examples(5, seed=7)
    kw = dict(baseline="corrupt", metric="nll", per_position=True, batch_size=3)
    plain = headscore.ablate(lm, examples, mode="naive", progress=False, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*plain path.*")
        fast = headscore.ablate(lm, examples, **kw)
    torch.testing.assert_close(fast.position_values, plain.position_values, rtol=0, atol=ATOL)
    torch.testing.assert_close(fast.values, plain.values, rtol=0, atol=ATOL)
    assert "cell" in capsys.readouterr().err
