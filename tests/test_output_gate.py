"""Families with an output gate of their own (``attn_output * sigmoid(gate)`` before ``o_proj``): the head gate
sits at the output projection's input, so mean ablation and activation patching replace what the projection
reads. Checked against an independent float64 reference that hooks each ``self_attn.o_proj`` directly, one
unpadded example at a time: the mean baseline, gate gradients against the mean and corrupted baselines, real
mean ablation and activation patching. A model whose layers mix the heads linearly before the projection
(a head permutation here) keeps the gate at the attention's output and refuses the replacing baselines.

Everything runs in float64 (sdpa: no float32 softmax), so 1e-6 of the largest value is far above rounding
and far below a wrong baseline (a baseline put before the model's gate is 30-100% off on these models).
"""

from __future__ import annotations

import model_matrix
import pytest
import torch
from test_counterfactual import counterfactual_examples
from tiny_saved import char_tokenizer

import headscore
from headscore.errors import UnsupportedModelError
from headscore.prepared import mixed_head_layers, output_gated_layers

pytestmark = [pytest.mark.numerics, pytest.mark.filterwarnings("ignore:per-position. prompts of")]

REL = 1e-6
FAMILIES = ("afmoe", "qwen3_next")  # sigmoid output gate on every layer; on the full-attention layer of two


def _model(family: str) -> headscore.LoadedModel:
    model = model_matrix.build_model(family, seed=1)
    model.set_attn_implementation("sdpa")
    return headscore.LoadedModel(model, char_tokenizer(), f"tiny-{family}")


def _projections(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Each attention layer's ``o_proj``, found by name (not through headscore)."""
    return {int(name.split(".")[2]): module for name, module in model.named_modules()
            if name.endswith("self_attn.o_proj")}


class Reference:
    """One example, alone and unpadded, with every ``o_proj`` input in reach."""

    def __init__(self, lm: headscore.LoadedModel, example: headscore.Example, heads: int):
        tok = lm.tokenizer
        self.model, self.heads = lm.model, heads
        prompt = tok(example.prompt)["input_ids"]
        self.target = tok(example.target, add_special_tokens=False)["input_ids"]
        self.prompt_len = len(prompt)
        self.ids = torch.tensor([prompt + self.target])
        corrupt = torch.tensor([tok(example.corrupt)["input_ids"] + self.target])
        self.clean = self.record(self.ids)
        self.corrupt = self.record(corrupt)

    def run(self, ids: torch.Tensor, replace=None) -> torch.Tensor:
        """Target NLL (mean over target tokens) with ``replace(layer, x)`` applied to each ``o_proj`` input."""
        handles = [proj.register_forward_pre_hook(lambda m, args, layer=layer: (replace(layer, args[0]),))
                   for layer, proj in _projections(self.model).items()] if replace else []
        try:
            logp = torch.log_softmax(self.model(input_ids=ids).logits[0].double(), -1)
        finally:
            for h in handles:
                h.remove()
        return -torch.stack([logp[self.prompt_len - 1 + i, tok] for i, tok in enumerate(self.target)]).mean()

    @torch.no_grad()
    def record(self, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        seen = {}

        def keep(layer, x):
            seen[layer] = x[0].detach().clone().unflatten(-1, (self.heads, -1))  # [T, H, D]
            return x
        self.run(ids, keep)
        return seen

    def gradient_terms(self, baseline: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """-<O - m, dL/dO> summed over tokens, per head: {layer: [H]} (taylor against ``baseline``)."""
        leaves = {layer: torch.zeros_like(z, requires_grad=True) for layer, z in self.clean.items()}
        loss = self.run(self.ids, lambda layer, x: x + leaves[layer].flatten(-2)[None])
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        return {layer: -((self.clean[layer] - baseline[layer]) * grads[layer]).sum((0, 2)) for layer in leaves}

    @torch.no_grad()
    def replaced(self, layer: int, head: int, value: torch.Tensor) -> float:
        """loss with head ``head`` of ``layer`` replaced by ``value`` ([T, D] or [D]) - the clean loss."""
        def swap(idx, x):
            if idx != layer:
                return x
            z = x.clone().unflatten(-1, (self.heads, -1))
            z[0, :, head] = value
            return z.flatten(-2)
        return float(self.run(self.ids, swap) - self.run(self.ids))


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal to REL of the largest value; NaN (no head: a layer without attention) exactly where ``want`` is."""
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: absent heads differ"
    got, want = got.nan_to_num(), want.nan_to_num()
    scale = want.abs().max().item()
    assert scale > 1e-4, f"{what}: the reference is trivially small"
    err = (got - want).abs().max().item()
    assert err <= REL * scale, f"{what}: max error {err:.3e} vs {REL:.0e} x {scale:.3e}"


def _per_head(refs: list[Reference], value) -> torch.Tensor:
    """[N, L, H] from ``value(ref, layer, head)`` on the attention layers (NaN elsewhere: no head there)."""
    layers, heads = refs[0].model.config.num_hidden_layers, refs[0].heads
    out = torch.full((len(refs), layers, heads), float("nan"), dtype=torch.float64)
    for n, ref in enumerate(refs):
        for layer in ref.clean:
            for head in range(heads):
                out[n, layer, head] = value(ref, layer, head)
    return out


@pytest.mark.parametrize("family", [  # qwen3_next: 8-15 s on 2 cores, in the slow tier
    "afmoe", pytest.param("qwen3_next", marks=pytest.mark.slow)])
def test_baselines_replace_what_the_projection_reads(family, one_thread):
    lm = _model(family)
    heads = lm.model.config.num_attention_heads
    examples = counterfactual_examples(4, seed=5)
    refs = [Reference(lm, e, heads) for e in examples]
    attention = sorted(refs[0].clean)
    assert output_gated_layers(lm.model) == []  # before prepare: nothing known
    mean = headscore.mean_baseline(lm, examples, progress=False)
    assert output_gated_layers(lm.model) == attention and mixed_head_layers(lm.model) == []
    tokens = sum(r.ids.shape[1] for r in refs)
    want_mean = {layer: sum(r.clean[layer].sum(0) for r in refs) / tokens for layer in attention}
    _close(mean[attention], torch.stack([want_mean[layer] for layer in attention]), f"{family} mean baseline")

    score = headscore.score(lm, examples, baseline="mean", batch_size=3, progress=False)
    terms = {id(r): r.gradient_terms(want_mean) for r in refs}
    want = _per_head(refs, lambda r, layer, head: terms[id(r)][layer][head])
    _close(score.example_values.double(), want, f"{family} taylor against the mean")
    ablation = headscore.ablate(lm, examples, baseline="mean", batch_size=3, rows_per_pass=8, progress=False)
    want = _per_head(refs, lambda r, layer, head: r.replaced(layer, head, want_mean[layer][head]))
    _close(ablation.example_values.double(), want, f"{family} mean ablation")

    atp = headscore.score(lm, examples, baseline="corrupt", batch_size=3, progress=False)
    terms = {id(r): r.gradient_terms(r.corrupt) for r in refs}
    want = _per_head(refs, lambda r, layer, head: terms[id(r)][layer][head])
    _close(atp.example_values.double(), want, f"{family} AtP")
    patching = headscore.ablate(lm, examples, baseline="corrupt", batch_size=3, rows_per_pass=8, progress=False)
    want = _per_head(refs, lambda r, layer, head: r.replaced(layer, head, r.corrupt[layer][:, head]))
    _close(patching.example_values.double(), want, f"{family} activation patching")

    zero = headscore.ablate(lm, examples, batch_size=3, rows_per_pass=8, progress=False)
    want = _per_head(refs, lambda r, layer, head: r.replaced(layer, head, torch.zeros(())))
    _close(zero.example_values.double(), want, f"{family} zero ablation")


def test_patch_gates_at_the_projection_and_leaves_no_hook(one_thread):
    """After prepare, patch() gates an output-gated layer through a pre-hook on its o_proj: gate 0 on a head
    zeroes exactly that head's slice of the projection's input; the hook goes when the block ends, and the
    model's logits come back bitwise."""
    lm = _model("afmoe")
    headscore.prepare(lm, counterfactual_examples(1))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    proj = _projections(lm.model)[1]
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    seen = []
    with headscore.patch(lm.model) as gates, torch.no_grad():
        assert len(proj._forward_pre_hooks) == 1
        handle = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))  # after it
        lm.model(input_ids=ids)
        g = gates.ones(1)
        g[0, 1, 2] = 0
        with gates.using(g):
            lm.model(input_ids=ids)
        handle.remove()
    open_, closed = (x.unflatten(-1, (lm.model.config.num_attention_heads, -1)) for x in seen[-2:])
    assert (closed[..., 2, :] == 0).all() and open_[..., 2, :].abs().max() > 0
    torch.testing.assert_close(closed[..., [0, 1, 3], :], open_[..., [0, 1, 3], :], rtol=0, atol=0)
    assert not proj._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, before)


def test_heads_mixed_linearly_keep_the_gate_at_attention_and_refuse_baselines(one_thread):
    """A Llama whose layer 1 permutes its heads before o_proj (linear, but no slice of the projection's input is
    one head): the layer is 'mixed', the gate stays at the attention's output (gradients exact against the
    permuted reference), and the mean and corrupted baselines are refused."""
    lm = _model_with_permuted_heads()
    examples = counterfactual_examples(2, seed=7)
    got = headscore.score(lm, examples, batch_size=2, progress=False)
    assert mixed_head_layers(lm.model) == [1] and output_gated_layers(lm.model) == []
    heads = lm.model.config.num_attention_heads
    refs = [Reference(lm, e, heads) for e in examples]
    # the attention's head h lands in slice perm[h] of the projection's input
    terms = {id(r): r.gradient_terms({k: torch.zeros_like(v) for k, v in r.clean.items()}) for r in refs}
    want = _per_head(refs, lambda r, layer, head: terms[id(r)][layer][PERM[head] if layer == 1 else head])
    _close(got.example_values.double(), want, "permuted heads, zero baseline")
    for run, kwargs in ((headscore.score, {"baseline": "mean"}), (headscore.ablate, {"baseline": "corrupt"})):
        with pytest.raises(UnsupportedModelError, match=r"mixes the head outputs of layer\(s\) 1 before the output"):
            run(lm, examples, progress=False, **kwargs)


PERM = [2, 0, 3, 1]  # attention head h -> slice PERM[h] of layer 1's projection input


def _model_with_permuted_heads() -> headscore.LoadedModel:
    lm = _model("llama")
    config = lm.model.config
    assert config.num_attention_heads == len(PERM)
    proj = _projections(lm.model)[1]

    def permute(module, args):
        x = args[0].unflatten(-1, (len(PERM), -1))
        out = torch.empty_like(x)
        out[..., PERM, :] = x
        return (out.flatten(-2), *args[1:])
    proj.register_forward_pre_hook(permute)  # the model's own transform: registered before any of headscore's
    return lm


def test_hybrid_layers_without_attention_have_no_heads(monkeypatch, one_thread):
    """Qwen3-Next's layer 0 is linear attention (no registry call): after prepare its heads are absent (0 heads in
    the layout, NaN in every map) and ablation runs no row for them."""
    import headscore.api as api
    from headscore.patch import head_layout

    lm = _model("qwen3_next")
    assert head_layout(lm.model).heads_per_layer is None  # the config alone counts every layer
    rows: list[torch.Tensor] = []
    real = api.gated_losses

    def counted(model, heads, batch, gate_rows, *args, **kwargs):
        rows.append(gate_rows.clone())
        return real(model, heads, batch, gate_rows, *args, **kwargs)
    monkeypatch.setattr(api, "gated_losses", counted)
    got = headscore.ablate(lm, counterfactual_examples(2), mode="batched", progress=False)
    heads = lm.model.config.num_attention_heads
    assert head_layout(lm.model).heads_per_layer == (0, heads) and head_layout(lm.model).real_heads == heads
    assert got.values[:, 0].isnan().all() and got.values[:, 1].isfinite().all()
    changed = torch.cat(rows)
    assert changed.shape[0] == heads and (changed[:, 0] == 1).all()  # one row per head of layer 1, none for layer 0
    with pytest.raises(headscore.HeadscoreError, match=r"head \(0, 1\) is one layer 0 does not have \(it has 0 "
                                                       r"heads: no attention\)"):
        headscore.ablate_heads(lm, counterfactual_examples(1), [(1, 0), (0, 1)], progress=False)


def test_an_attention_outside_the_layers_is_refused(one_thread):
    """Zamba2's shared attention block calls itself layer -1: which layer's heads it holds is unknown (its gates
    would land in the last row whatever layer it runs in), so prepare refuses the model with the reason."""
    model = model_matrix.build_model("zamba2", seed=1)
    lm = headscore.LoadedModel(model, char_tokenizer(), "tiny-zamba2")
    with pytest.raises(UnsupportedModelError, match="calls itself layer -1, outside the model's 2 layers"):
        headscore.prepare(lm, counterfactual_examples(1))


@pytest.mark.parametrize("family", ["afmoe", "llama-permuted"])
def test_half_precision_finds_the_same_layers(family, one_thread):
    """In bfloat16 the projection's input is rounded to 8 bits of mantissa: the output gate is still found (each
    head's slice within 4 bfloat16 roundings of its own scale), a head permutation is still 'mixed'; after a cast
    back the check runs again (the report is kept per dtype)."""
    lm = _model("afmoe") if family == "afmoe" else _model_with_permuted_heads()
    lm.model.to(torch.bfloat16)
    examples = counterfactual_examples(2, seed=3)
    headscore.prepare(lm, examples)
    want = ([0, 1], []) if family == "afmoe" else ([], [1])
    assert (output_gated_layers(lm.model), mixed_head_layers(lm.model)) == want
    if family == "afmoe":
        assert headscore.ablate(lm, examples, baseline="mean", progress=False).values.isfinite().all()
    lm.model.to(torch.float64)
    headscore.prepare(lm, examples)
    assert (output_gated_layers(lm.model), mixed_head_layers(lm.model)) == want
