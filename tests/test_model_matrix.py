"""The compatibility matrix's CI subset: tiny models of the families that carry every quirk the engine must
follow, checked by headscore.model_check against an independent float64 reference; and the refusals."""

import json

import model_matrix
import pytest
import torch

import headscore
from headscore.errors import HeadscoreError, UnsupportedModelError
from headscore.model_check import FORWARD_ONLY, PADDING_TOLERANCE, REFUSED, SUPPORTED, UNAVAILABLE, check_model

EXPECTED = {family: {"eager": SUPPORTED, "sdpa": SUPPORTED} for family in model_matrix.CI_SUBSET}
EXPECTED["gpt_oss"]["sdpa"] = UNAVAILABLE  # GPT-OSS has no SDPA attention (sinks)
# transformers' eager ModernBERT gives NaN on a padded position whose local window holds only padding; NaN
# then reaches every gradient through the softmax's backward: headscore refuses it with that reason
EXPECTED["modernbert-classifier"]["eager"] = REFUSED


def _build(family):
    if family.endswith(model_matrix.CLASSIFIER_SUFFIX):
        return model_matrix.build_model(family[:-len(model_matrix.CLASSIFIER_SUFFIX)], classifier=True)
    return model_matrix.build_model(family)


def test_ci_subset_covers_the_quirks():
    """GPT-2, GPT-NeoX, Phi-3, Gemma 3, OLMo 2, Qwen3-MoE, DeepSeek-V3, GPT-OSS, Llama 4, BERT are all in."""
    needed = {"gpt2", "gpt_neox", "phi3", "gemma3", "olmo2", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4",
              "bert-classifier"}
    assert needed <= set(model_matrix.CI_SUBSET)


@pytest.mark.numerics
@pytest.mark.parametrize("family", model_matrix.CI_SUBSET)
def test_family_passes_every_check(family, one_thread):
    """Each implementation: patch() transparent and restored bitwise, gate gradients and every head's batched
    and prefix ablation equal to the float64 output-projection reference to 1e-9 of the largest value (float64
    sums in another order change ~1e-16; a swapped head shows at >= 1e-8), padding exact to 1e-6 (some families
    run softmax in float32 even in float64). Ablation to 1e-6 too: it runs each row in other batch shapes than
    the reference, through those float32 steps (Laguna: 4.8e-9 eager, 9.1e-9 sdpa on an AVX-512 CPU, below 1e-9
    on AVX2)."""
    model = _build(family)
    results = {r.implementation: r for r in check_model(model, ["eager", "sdpa"])}
    for impl, want in EXPECTED[family].items():
        r = results[impl]
        assert r.status == want, f"{family} {impl}: {r.status}: {r.reason}"
        if want == REFUSED:
            assert "non-finite gate gradients" in r.reason
        if want == SUPPORTED:
            assert r.attention_layers >= 1 and r.gradient_error < 1e-9
            assert r.ablation_error < PADDING_TOLERANCE, (impl, r.ablation_error)
            assert r.output_projection


@pytest.mark.slow  # 80 s in a shared CI run: compiles FlexAttention for the CPU
def test_flex_attention_forward_checks(one_thread):
    """flex_attention on a CPU: everything but the gradients (no CPU backward), on a float32 copy."""
    model = _build("olmo2")
    (r,) = check_model(model, ["flex_attention"])
    assert r.status == FORWARD_ONLY, r.reason
    assert r.gradient_error is None and r.ablation_error < 1e-4
    assert next(model.parameters()).dtype == torch.float64  # the model itself is untouched


def test_per_layer_head_widths(one_thread):
    """Gemma 4's global layers have wider heads than its sliding ones (a per-layer config): the layout keeps
    each layer's width, and a mean baseline padded to the widest is sliced per layer (mean ablation through
    prefix reuse equals running each ablation alone)."""
    from tiny_saved import char_tokenizer

    from headscore.patch import head_layout

    model = _build("gemma4_text")
    layout = head_layout(model)
    assert layout.head_dims is not None and len(set(layout.head_dims)) == 2
    assert layout.head_dim == max(layout.head_dims)
    lm = headscore.LoadedModel(model, char_tokenizer(), "tiny-gemma4")
    mean = headscore.mean_baseline(lm, EXAMPLES, progress=False)
    assert mean.shape == (layout.num_layers, layout.num_heads, layout.head_dim)
    narrow = [i for i, d in enumerate(layout.head_dims) if d < layout.head_dim][0]
    assert (mean[narrow, :, layout.head_dims[narrow]:] == 0).all()
    prefix = headscore.ablate(lm, EXAMPLES, baseline="mean", progress=False)
    naive = headscore.ablate(lm, EXAMPLES, baseline="mean", mode="naive", progress=False)
    assert naive.values.abs().max() > 0
    torch.testing.assert_close(prefix.values, naive.values, rtol=1e-9, atol=1e-12)


def test_per_layer_head_counts(tmp_path, one_thread):
    """Laguna with 4 heads in layer 0 and 2 in layer 1: gates and maps are [2, 4]; the heads layer 1 does not
    have are NaN in every map (scores, ablation, per position), rank last, and leave the agreement of two
    maps to the heads both have; the report draws them blank."""
    from tiny_saved import char_tokenizer

    from headscore.patch import head_layout

    model = _build("laguna")
    model.set_attn_implementation("sdpa")  # float64 throughout (eager's softmax runs in float32)
    layout = head_layout(model)
    assert layout.heads_per_layer == (4, 2) and layout.num_heads == 4 and layout.real_heads == 6
    lm = headscore.LoadedModel(model, char_tokenizer(), "tiny-laguna")
    two = [*EXAMPLES, headscore.Example("Then Cy and Di sat, Di read to", " Cy", "t")]  # a standard error
    s = headscore.score(lm, two, progress=False, per_position=True)
    a = headscore.ablate(lm, two, progress=False)
    n = headscore.ablate(lm, two, mode="naive", progress=False)
    for values in (s.values, s.stderr, a.values, s.example_values):
        assert values[..., 1, 2:].isnan().all() and values[..., 0, :].isfinite().all()
        assert values[..., 1, :2].isfinite().all()
    assert s.position_values[:, 1, 2:].isnan().all() and s.position_values[:, 0].isfinite().all()
    # Laguna rounds its norms, router logits and output gate to float32 even in a float64 model, so batches of
    # another composition differ by float32 roundings (eps32 = 6e-8 per step): float32's tolerance
    torch.testing.assert_close(a.values, n.values, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert all((layer, head) != (1, 2) and (layer, head) != (1, 3) for layer, head, _ in a.top_k(6))
    agreement = headscore.compare(s, a)["t"]
    assert -1 <= agreement.spearman <= 1 and -1 <= agreement.kendall <= 1 and agreement.topk_overlap >= 0
    # its softplus output gate scales the head outputs after attention: the heads are gated at o_proj's input
    # (test_output_gated_layers_are_found); the padded mean there
    from headscore.methods.baseline import mean_head_outputs

    with headscore.patch(model) as heads:
        mean = mean_head_outputs(model, heads, headscore.prepare(lm, EXAMPLES).batches(8, progress=False))
    assert mean.shape == (2, 4, 8) and (mean[1, 2:] == 0).all() and (mean[1, :2] != 0).any()
    from headscore.report import write_report

    paths = write_report(s, tmp_path / "report", ablation=a)
    assert paths["heatmaps_png"].is_file() and (tmp_path / "report" / "index.html").is_file()
    import re

    rows = re.findall(r"^\| (\d+) \| (\d) \| (\d) \|", paths["summary"].read_text(encoding="utf-8"), re.M)
    assert len(rows) == 6 and not {(layer, head) for _, layer, head in rows} & {("1", "2"), ("1", "3")}  # no rank


def test_output_gated_layers_are_found(one_thread):
    """Laguna multiplies each head's output by softplus(g_proj(x)) after attention: prepare finds both layers and
    gates them at o_proj's input (exactness against a float64 reference: tests/test_output_gate.py), so mean
    ablation with its per-layer head counts is the same through prefix reuse as run alone; a model without an
    output gate has no such layer."""
    from tiny_saved import char_tokenizer

    from headscore.patch import gated_at_projections
    from headscore.prepared import mixed_head_layers, output_gated_layers

    model = _build("laguna")
    model.set_attn_implementation("sdpa")
    lm = headscore.LoadedModel(model, char_tokenizer(), "tiny-laguna")
    prefix = headscore.ablate(lm, EXAMPLES, baseline="mean", progress=False)
    assert output_gated_layers(model) == [0, 1] and mixed_head_layers(model) == []
    assert gated_at_projections(model) == {i: f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)}
    naive = headscore.ablate(lm, EXAMPLES, baseline="mean", mode="naive", progress=False)
    assert prefix.extra["mode"] == "prefix" and naive.values[..., :2].abs().min() > 0
    # float32 steps inside Laguna (see test_per_layer_head_counts): float32's tolerance
    torch.testing.assert_close(prefix.values, naive.values, rtol=1e-5, atol=1e-7, equal_nan=True)
    plain = _build("llama")
    headscore.prepare(headscore.LoadedModel(plain, char_tokenizer(), "tiny-llama"), EXAMPLES)
    assert output_gated_layers(plain) == [] and gated_at_projections(plain) == {}


@pytest.mark.slow  # 20 s in a shared CI run: FlexAttention again
def test_implementation_the_model_itself_cannot_run(one_thread):
    """GPT-OSS's sinks have no CPU FlexAttention: the unpatched model fails, so the implementation is
    unavailable here (not a headscore failure), with torch's reason."""
    (r,) = check_model(_build("gpt_oss"), ["flex_attention"])
    assert r.status == UNAVAILABLE and "the unpatched model fails" in r.reason and "sinks" in r.reason


def test_output_projection_is_found_not_assumed(one_thread):
    """GPT-2's heads feed ``c_proj`` (a Conv1D), not an ``o_proj``."""
    (r,) = check_model(_build("gpt2"), ["eager"])
    assert r.status == SUPPORTED and r.output_projection == "transformer.h.*.attn.c_proj"


def _lm(model):
    from tiny_saved import char_tokenizer

    return headscore.LoadedModel(model, char_tokenizer(), "tiny")


EXAMPLES = [headscore.Example("When Ann and Bob went out, Bob gave it to", " Ann", "t")]


@pytest.mark.parametrize("family,message", [
    ("bitnet", "head outputs are mixed before the output projection"),  # a norm over all heads before o_proj
    ("diffllama", "runs more than once per forward pass"),  # differential attention: two softmaxes per layer
    ("bloom", "does not route attention through transformers' AttentionInterface"),
])
def test_unseparable_families_are_refused(family, message, one_thread):
    """check_model says refused, and scoring raises UnsupportedModelError with the same reason, before any work."""
    model = _build(family)
    (r,) = check_model(model, ["eager"])
    assert r.status == REFUSED and message in r.reason
    with pytest.raises(UnsupportedModelError, match=message):
        headscore.score(_lm(model), EXAMPLES, progress=False)


def test_markdown_matrix(tmp_path, one_thread):
    """The script writes the JSON rows and a table with one line per family, statuses and reasons."""
    out_json, out_md = tmp_path / "m.json", tmp_path / "models.md"
    assert model_matrix.main(["--families", "gpt2,bitnet", "--flex", "none", "--json", str(out_json),
                              "--markdown", str(out_md)]) == 0
    rows = json.loads(out_json.read_text())
    assert [r["family"] for r in rows] == ["bitnet", "gpt2"]
    text = out_md.read_text()
    assert "| gpt2 | GPT2LMHeadModel | yes | yes | not run | `transformer.h.*.attn.c_proj` |" in text
    assert "| bitnet |" in text and "refused" in text and "mixed before the output projection" in text
    assert "Totals: 1 supported, 1 refused." in text
    again = tmp_path / "again.md"  # the table again from the JSON, without checking again
    assert model_matrix.main(["--from-json", str(out_json), "--markdown", str(again)]) == 0
    assert [line for line in again.read_text().splitlines() if line.startswith("| ")] == \
        [line for line in text.splitlines() if line.startswith("| ")]


def test_matrix_refuses_a_missing_output_folder(tmp_path):
    with pytest.raises(SystemExit, match="no such directory"):
        model_matrix.main(["--families", "gpt2", "--markdown", str(tmp_path / "nope" / "models.md")])


def test_unknown_family():
    with pytest.raises(SystemExit, match="unknown model type"):
        model_matrix.main(["--families", "no_such_family"])


def test_labelled_examples_need_a_classifier(one_thread):
    lm = _lm(_build("llama"))
    with pytest.raises(HeadscoreError, match="need a sequence classifier"):
        headscore.score(lm, [headscore.Example.labelled("a cat", 1, "t")], progress=False)
