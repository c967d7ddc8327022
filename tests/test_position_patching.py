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
from tiny import counting_bars, tiny_model

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
        monkeypatch.setattr(pp, "cache_keyword", _no_cache_keyword)
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


def _configured(family: str, **extra):
    """A tiny float64 model of ``family`` (Mistral, Phi3) with config fields of the test's own."""
    import transformers
    from tiny import VOCAB, ByteTokenizer

    from headscore.models import LoadedModel

    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=0,
        tie_word_embeddings=False, **extra)
    torch.manual_seed(5)
    model = getattr(transformers, f"{family}ForCausalLM")._from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return LoadedModel(model.double().eval(), ByteTokenizer(), f"tiny-{family.lower()}")


def test_sliding_window_shorter_than_the_batch():
    """A sliding-window model whose window (4 tokens) is shorter than the batches: the clean run's cache keeps
    every token anyway (the window comes from the mask), so the fast path serves every batch, the longer later
    ones included, and equals the plain path."""
    lm = _configured("Mistral", sliding_window=4, max_position_embeddings=256)
    examples = counterfactual_examples(5, seed=3)
    runs = _deltas(lm, examples, "corrupt", "nll", batch_size=2, max_rows=16)
    assert all(b.input_ids.shape[1] > 4 for b, *_ in runs) and len({b.input_ids.shape[1] for b, *_ in runs}) > 1
    for _, fast, plain, _ in runs:
        assert plain.abs().max() > 1e-3
        torch.testing.assert_close(fast, plain, rtol=0, atol=ATOL)
    kw = dict(baseline="corrupt", metric="nll", per_position=True, batch_size=2, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*plain path.*")
        fast = headscore.ablate(lm, examples, **kw)
    plain = headscore.ablate(lm, examples, mode="naive", **kw)
    torch.testing.assert_close(fast.position_values, plain.position_values, rtol=0, atol=ATOL)


def test_rope_that_depends_on_the_pass_length_takes_the_plain_path():
    """Phi-3's longrope picks its factors from each pass's length, so a pass of the late tokens over cached keys
    would rotate them otherwise than the full pass: per-position patching warns and takes the plain path, whose
    numbers it gives."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "short_factor": [1.0] * 4, "long_factor": [3.0] * 4, "original_max_position_embeddings": 8}
    lm = _configured("Phi3", max_position_embeddings=64, original_max_position_embeddings=8, rope_parameters=rope)
    examples = counterfactual_examples(4, seed=6)
    kw = dict(baseline="corrupt", metric="logit-diff", per_position=True, batch_size=2, progress=False)
    plain = headscore.ablate(lm, examples, mode="naive", **kw)
    with pytest.warns(UserWarning, match=r"RoPE \(longrope\).*plain path"):
        got = headscore.ablate(lm, examples, **kw)
    torch.testing.assert_close(got.position_values, plain.position_values, rtol=0, atol=ATOL)


def test_a_gate_value_that_float32_rounds_is_kept_exact():
    """Cells set to 0.1 (not a float32 number): in a float64 model both paths run the gate at 0.1 itself."""
    lm = _model("llama")
    prep = headscore.prepare(lm, counterfactual_examples(3, seed=2))
    metric = resolve_metric("nll")
    with patch(lm.model) as heads:
        batch = next(iter(prep.batches(3, progress=False)))
        clean = clean_losses(lm.model, heads, batch, metric)
        fast = pp.position_deltas(lm.model, heads, batch, clean, metric=metric, value=0.1)
        plain = pp.position_deltas(lm.model, heads, batch, clean, metric=metric, mode="naive", value=0.1)
    assert plain.abs().max() > 1e-3
    torch.testing.assert_close(fast, plain, rtol=0, atol=ATOL)


def test_a_later_batch_the_fast_path_cannot_serve_takes_the_plain_path(monkeypatch):
    """The check runs on the first batch; a later batch whose clean run the fast path cannot take (here: any
    batch wider than the first) goes the plain way with a warning, and the numbers are the plain path's."""
    lm = _model("llama")
    examples = counterfactual_examples(5, seed=3)
    kw = dict(baseline="corrupt", metric="nll", per_position=True, batch_size=2, progress=False)
    plain = headscore.ablate(lm, examples, mode="naive", **kw)
    widths = []
    record = pp.PositionPatcher._record

    def picky(self):
        widths.append(self.batch.input_ids.shape[1])
        if widths[-1] > widths[0]:
            raise RuntimeError("too wide")
        return record(self)

    monkeypatch.setattr(pp.PositionPatcher, "_record", picky)
    with pytest.warns(UserWarning, match="failed on a batch of .* tokens .too wide.; that batch takes the plain"):
        got = headscore.ablate(lm, examples, **kw)
    assert len(set(widths)) > 1
    torch.testing.assert_close(got.position_values, plain.position_values, rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["prefix", "naive"])
def test_per_layer_head_counts_count_and_run_only_real_cells(monkeypatch, mode):
    """Laguna's layers have 4 and 2 heads: the cell bar counts the real cells and its updates sum to its total
    (354 of 472 counted before), no pass changes a head a layer lacks, and those cells are NaN; the values equal
    the other path's."""

    from model_matrix import build_model
    from tiny import ByteTokenizer

    import headscore.api as api
    from headscore.models import LoadedModel

    lm = LoadedModel(build_model("laguna", seed=1), ByteTokenizer(), "tiny-laguna")
    from headscore.patch import head_layout

    layout = head_layout(lm.model)
    assert layout.heads_per_layer == (4, 2)
    plain_rows = []
    real = pp.gated_losses

    def recording(model, heads, batch, gate_rows, *args, **kwargs):
        plain_rows.append(gate_rows.clone())
        return real(model, heads, batch, gate_rows, *args, **kwargs)

    monkeypatch.setattr(pp, "gated_losses", recording)
    run = pp.PositionPatcher.run
    cells_run = []

    def counting(self, position, cells, rows):
        cells_run.extend(cells)
        return run(self, position, cells, rows)

    monkeypatch.setattr(pp.PositionPatcher, "run", counting)
    Bar, bars = counting_bars()
    monkeypatch.setattr(api, "tqdm", Bar)
    examples = counterfactual_examples(5, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = headscore.ablate(lm, examples, baseline="corrupt", per_position=True, batch_size=2, mode=mode)
    bar = next(b for b in bars if b.desc == "patch positions")
    assert bar.n == bar.total > 0
    assert cells_run or plain_rows
    assert all(head < layout.heads_of(layer) for layer, head in cells_run)
    for rows in plain_rows:  # the plain path's rows (and the checks' full passes) change only real heads
        assert not bool((rows[:, 1, :, 2:] != 1).any())
    assert torch.isnan(got.position_values[:, 1, 2:]).all() and torch.isfinite(got.position_values[:, 1, :2]).any()


def test_a_cell_already_at_its_baseline_is_exactly_zero_in_float32():
    """Two examples in one batch, a float32 model: example a's corrupted prompt shares its first 7 tokens with its
    clean one, b's 2. At the tokens only a shares, a's cells ran in a pass for b (other matmul shapes than the clean
    run) and came out 9.5e-7, not 0; a patch that changes nothing is exactly 0 now."""
    from headscore.data.examples import Example

    lm = tiny_model("llama", layers=3, heads=4, kv_heads=2, dtype=torch.float32, seed=5)
    examples = [Example("abcdefghij", "k", "a", corrupt="abcdefxyzw", foil="m"),
                Example("qrstuvwxyz", "k", "b", corrupt="qzzzzzzzzz", foil="m")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = headscore.ablate(lm, examples, baseline="corrupt", per_position=True, batch_size=2, progress=False)
    a, b = s.position_map("a"), s.position_map("b")
    only_a = [s.positions.index(f"end-{k}") for k in (8, 7, 6, 5, 4)]  # 'a'..'f' shared by a only (BOS: both)
    assert float(a[..., only_a].abs().max()) == 0.0
    assert float(b[..., only_a].abs().max()) > 1e-4  # b's cells there did change its loss
