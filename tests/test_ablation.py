"""Ablation: prefix reuse, batched and naive modes agree, and all equal an independent hook-based ablation."""

import warnings

import pytest
import torch
import transformers
from tiny import VOCAB, ByteTokenizer, random_examples, tiny_model

import headscore
from headscore.methods import ablation
from headscore.models import LoadedModel
from headscore.patch import patch

pytestmark = pytest.mark.numerics


def hooked_loss(model, tokenizer, ex, zero_heads, num_heads, baseline=None):
    """Loss of one unpadded example with the listed (layer, head) slices of the o_proj input replaced."""
    p = tokenizer(ex.prompt)["input_ids"]
    t = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
    handles = []
    for layer_idx, layer in enumerate(model.model.layers):
        heads_here = [h for (lay, h) in zero_heads if lay == layer_idx]
        if not heads_here:
            continue

        def hook(module, args, heads_here=heads_here, layer_idx=layer_idx):
            x = args[0].clone().view(*args[0].shape[:-1], num_heads, -1)
            for h in heads_here:
                x[..., h, :] = 0.0 if baseline is None else baseline[layer_idx, h]
            return (x.view_as(args[0]),)
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + t])).logits[0].double()
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits, -1)
    return -torch.stack([logp[len(p) - 1 + i, tok] for i, tok in enumerate(t)]).mean()


@pytest.mark.parametrize("family,kv_heads,batch_size", [pytest.param("llama", 2, 3, marks=pytest.mark.slow),
                                                         ("qwen2", 1, 4), ("mistral", 4, 5)])
def test_batched_equals_sequential(family, kv_heads, batch_size):
    lm = tiny_model(family, kv_heads=kv_heads)
    examples = random_examples(8)
    kw = dict(batch_size=batch_size, progress=False)
    batched = headscore.ablate(lm, examples, mode="batched", rows_per_pass=16, **kw)
    prefix = headscore.ablate(lm, examples, mode="prefix", rows_per_pass=16, **kw)
    sequential = headscore.ablate(lm, examples, mode="sequential", **kw)
    assert batched.method == "ablation-zero"
    assert prefix.extra["mode"] == "prefix" and sequential.extra["mode"] == "naive"
    assert batched.values.abs().max() > 1e-3
    torch.testing.assert_close(batched.values, sequential.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(prefix.values, sequential.values, rtol=0, atol=1e-5)


def tiny_gpt2(layers: int = 3, heads: int = 4, seed: int = 0) -> LoadedModel:
    """GPT-2 keeps its layers in ``transformer.h`` and its attention in ``attn.c_proj``: no Llama names."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=heads * 8, n_layer=layers, n_head=heads,
                                     n_positions=256, pad_token_id=0, bos_token_id=1, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return LoadedModel(model.double().eval(), ByteTokenizer(), "tiny-gpt2")


# qwen2 (MQA) and qwen3 in the fast tier; the rest (30-80 s each in a shared CI run) in the slow one
PREFIX_CASES = [("qwen2", 1, 4), ("qwen3", 2, 5)] + [
    pytest.param(*case, marks=pytest.mark.slow) for case in [("llama", 2, 3), ("mistral", 4, 2), ("gemma2", 2, 3),
                                                             ("gpt2", 4, 3)]]


def _float64_model(family, kv_heads):
    if family == "gpt2":
        return tiny_gpt2(layers=4)
    return tiny_model(family, kv_heads=kv_heads, layers=4, dtype=torch.float64)


@pytest.mark.parametrize("family,kv_heads,batch_size", PREFIX_CASES)
def test_prefix_reuse_equals_naive_sweep_float64(family, kv_heads, batch_size):
    """Every head, zero and mean baselines, padded batches, GQA and MQA: prefix reuse equals the plain sweep."""
    lm = _float64_model(family, kv_heads)
    examples = random_examples(7, seed=3)
    kw = dict(batch_size=batch_size, progress=False)
    for baseline in ("zero", "mean"):
        naive = headscore.ablate(lm, examples, mode="naive", baseline=baseline, **kw)
        prefix = headscore.ablate(lm, examples, mode="prefix", baseline=baseline, rows_per_pass=7, **kw)
        assert prefix.extra["mode"] == "prefix"
        assert naive.values.abs().max() > 1e-2
        torch.testing.assert_close(prefix.values, naive.values, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_reuse_any_gate_rows(family):
    """Rows that change several layers, gates above 1 and a custom baseline: each row's own first changed
    layer decides what is replayed."""
    lm = _float64_model(family, 2)
    examples = random_examples(5, seed=4)
    prep = headscore.prepare(lm, examples)
    g = torch.Generator().manual_seed(0)
    with patch(lm.model) as heads:
        layout = heads.layout
        rows = torch.ones(12, layout.num_layers, layout.num_heads, dtype=torch.float64)
        for r in range(11):  # row 11 changes nothing: all its layers are replayed
            layer = r % layout.num_layers
            rows[r, layer:] = torch.where(torch.rand(layout.num_layers - layer, layout.num_heads, generator=g) < 0.3,
                                          torch.rand(layout.num_layers - layer, layout.num_heads, generator=g) * 3,
                                          1.0)
            rows[r, layer, r % layout.num_heads] = 2.5
        base = torch.randn(layout.num_layers, layout.num_heads, layout.head_dim, generator=g, dtype=torch.float64)
        for batch in prep.batches(3, progress=False):
            naive = ablation.gated_losses(lm.model, heads, batch, rows, base, mode="naive")
            prefix = ablation.gated_losses(lm.model, heads, batch, rows, base, mode="prefix", max_rows=9)
            torch.testing.assert_close(prefix, naive, rtol=1e-6, atol=1e-9)
            clean = ablation.clean_losses(lm.model, heads, batch)
            torch.testing.assert_close(prefix[11], clean, rtol=1e-6, atol=1e-9)
    assert ablation.first_changed_layer(rows).tolist() == [r % layout.num_layers for r in range(11)] + [
        layout.num_layers]


def test_prefix_passes_group_rows_by_first_changed_layer():
    rows = ablation.single_head_gates(3, 9)
    passes = ablation._passes(rows, 8, prefix=True)
    assert [(len(idx), depth) for idx, depth in passes] == [(5, 0), (4, 0), (5, 1), (4, 1), (5, 2), (4, 2)]
    assert sorted(torch.cat([idx for idx, _ in passes]).tolist()) == list(range(27))
    assert [len(idx) for idx, _ in ablation._passes(rows, 8, prefix=False)] == [8, 8, 8, 3]


@pytest.mark.parametrize(("family", "prefix", "per_example"), [("llama", True, False), ("gpt2", True, True),
                                                               ("qwen2", False, True)])
def test_selected_losses_equal_every_row_on_every_example(family, prefix, per_example):
    """Chosen (example, gate row) pairs, in any order and with repeats, give what running every row on every
    example gives; the recording pass's losses are the losses with every gate at 1."""
    lm = _float64_model(family, 2)
    prep = headscore.prepare(lm, random_examples(5, seed=7))
    g = torch.Generator().manual_seed(1)
    with patch(lm.model) as heads:
        layout = heads.layout
        rows = ablation.single_head_gates(layout.num_layers, layout.num_heads)
        for batch in prep.batches(4, progress=False):
            width = batch.input_ids.shape[1]
            base = (torch.randn(layout.num_layers, batch.size, width, layout.num_heads, layout.head_dim,
                                generator=g, dtype=torch.float64) if per_example else
                    torch.randn(layout.num_layers, layout.num_heads, layout.head_dim, generator=g,
                                dtype=torch.float64))
            every = ablation.gated_losses(lm.model, heads, batch, rows, base, mode="naive")  # [K, B]
            n = 3 * rows.shape[0]
            example = torch.randint(0, batch.size, (n,), generator=g)
            which = torch.randint(0, rows.shape[0], (n,), generator=g)
            passes = []
            clean, losses = ablation.selected_losses(lm.model, heads, batch, example, rows[which], base,
                                                     prefix=prefix, max_rows=5, on_pass=passes.append)
            torch.testing.assert_close(losses, every[which, example], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(clean, ablation.clean_losses(lm.model, heads, batch), rtol=1e-9, atol=1e-12)
            assert sum(passes) == n and max(passes) <= 5


@pytest.mark.parametrize("seed", range(6))
def test_cheapest_passes_are_optimal(seed):
    """The cut of rows sorted by depth is as cheap as the best of every partition into passes (brute force on
    7 rows), every row in exactly one pass, each pass skipping the layers below its shallowest row."""
    g = torch.Generator().manual_seed(seed)
    depths = torch.randint(0, 12, (7,), generator=g)
    layers, max_rows, tokens = 12, 3, int(torch.randint(4, 200, (1,), generator=g))

    def cost(part):
        low = min(int(depths[i]) for i in part)
        return (layers - low + 1) * (len(part) * tokens + ablation.LAYER_COST_TOKENS) + ablation.PASS_COST_TOKENS

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for part in partitions(rest):
            for i in range(len(part)):
                yield part[:i] + [[first, *part[i]]] + part[i + 1:]
            yield [[first], *part]

    best = min(sum(map(cost, p)) for p in partitions(list(range(7))) if all(len(x) <= max_rows for x in p))
    passes = ablation.cheapest_passes(depths, layers, max_rows, tokens)
    assert sorted(torch.cat([idx for idx, _ in passes]).tolist()) == list(range(7))
    assert all(len(idx) <= max_rows and depth == int(depths[idx].min()) for idx, depth in passes)
    assert sum(cost(idx.tolist()) for idx, _ in passes) == pytest.approx(best)


def test_prefix_reuse_falls_back_when_layers_pass_hidden_state():
    """A model whose layers share state outside their outputs (here: the last layer reads how many layers ran
    in this forward pass) cannot be replayed: the first batch's check sees it, warns, and the ablation runs
    batched, correctly."""
    lm = tiny_model("llama", layers=3, dtype=torch.float64)
    layers = lm.model.model.layers
    calls = {"n": 0}
    lm.model.model.register_forward_pre_hook(lambda module, args: calls.update(n=0))

    def counting(layer, last):
        forward = layer.forward

        def run(*args, **kwargs):
            calls["n"] += 1
            out = forward(*args, **kwargs)
            return out + 0.1 * calls["n"] if last else out
        return run

    for i, layer in enumerate(layers):
        layer.forward = counting(layer, i == len(layers) - 1)
    examples = random_examples(4)
    with pytest.warns(UserWarning, match="does not reproduce the full pass"):
        got = headscore.ablate(lm, examples, mode="prefix", batch_size=4, progress=False)
    assert got.extra["mode"] == "batched"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = headscore.ablate(lm, examples, mode="batched", batch_size=4, progress=False)
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=0)


@pytest.mark.parametrize("in_place", [False, True], ids=["returns-new-output", "in-place"])
@pytest.mark.parametrize("hooked", [1, 2])
def test_prefix_reuse_with_a_steering_hook_on_a_decoder_layer(in_place, hooked):
    """A forward hook that adds a vector to one decoder layer's output (steering) acts once per pass, whether
    the layer runs or is replayed: prefix reuse (and verify, which replays too) equals the plain sweep."""
    lm = tiny_model("llama", layers=4, dtype=torch.float64)
    layers = lm.model.model.layers
    vector = torch.randn(lm.model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def steer(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if in_place:
            hidden.add_(vector)
            return None
        hidden = hidden + vector
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layers[hooked].register_forward_hook(steer)
    try:
        examples = random_examples(6, seed=2)
        kw = dict(batch_size=3, progress=False)
        naive = headscore.ablate(lm, examples, mode="naive", **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            prefix = headscore.ablate(lm, examples, mode="prefix", rows_per_pass=5, **kw)
            verified = headscore.score(lm, examples, verify=4, **kw)
        unsteered = None
    finally:
        handle.remove()
    unsteered = headscore.ablate(lm, examples, mode="naive", **kw)
    assert (naive.values - unsteered.values).abs().max() > 1e-2  # the hook matters
    assert prefix.extra["mode"] == "prefix" and verified.extra["verify_mode"] == "prefix"
    torch.testing.assert_close(prefix.values, naive.values, rtol=1e-6, atol=1e-9)
    exact = verified.exact
    assert exact.sum() >= 4 * len(verified.tasks)
    torch.testing.assert_close(verified.values[exact], naive.values[exact], rtol=1e-6, atol=1e-9)


def test_prefix_check_covers_every_layer_boundary():
    """State handed from layer 1 to layer 2 outside their outputs (a side channel set while layer 1's MLP runs,
    read before layer 2 runs) is wrong only in passes that replay layer 1 and run layer 2: the check's row for
    layer 2 sees it (a check on the last layer alone would not), warns, and the ablation runs batched."""
    lm = tiny_model("llama", layers=4, dtype=torch.float64)
    layers = lm.model.model.layers
    channel = {}

    def send(module, args, output):
        channel["scale"] = 1.0 + output.abs().mean((1, 2), keepdim=True)  # per row: batching changes nothing

    def receive(module, args):
        return (args[0] * channel["scale"], *args[1:])

    handles = [layers[1].mlp.register_forward_hook(send), layers[2].register_forward_pre_hook(receive)]
    try:
        examples = random_examples(4)
        with pytest.warns(UserWarning, match="a changed head of layer 2 does not reproduce the full pass"):
            got = headscore.ablate(lm, examples, mode="prefix", batch_size=4, progress=False)
        want = headscore.ablate(lm, examples, mode="batched", batch_size=4, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert got.extra["mode"] == "batched"
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=0)


def test_boundaries_to_check():
    """The deepest boundary of each kind (pair of layer classes), and every boundary next to a hooked layer."""
    from headscore.methods.prefix import boundaries_to_check

    class Other(torch.nn.Linear):
        pass

    layers = [torch.nn.Linear(2, 2) for _ in range(6)]
    assert boundaries_to_check(layers) == [5]
    assert boundaries_to_check(layers, [True] * 5 + [False]) == [4]
    assert boundaries_to_check(layers[:1]) == []
    mixed = layers[:2] + [Other(2, 2)] + layers[3:]  # Linear, Linear, Other, Linear, Linear, Linear
    assert boundaries_to_check(mixed) == [2, 3, 5]
    hooked = [torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(6)]
    handle = hooked[2][0].register_forward_pre_hook(lambda module, args: None)  # inside layer 2
    try:
        assert boundaries_to_check(hooked) == [2, 3, 5]
    finally:
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        assert boundaries_to_check(hooked) == [1, 2, 3, 4, 5]
    finally:
        handle.remove()


def test_prefix_reuse_falls_back_without_decoder_layers(monkeypatch):
    lm = tiny_model("llama", layers=2, dtype=torch.float64)
    monkeypatch.setattr(ablation, "decoder_layers", lambda model, n: None)
    with pytest.warns(UserWarning, match="no ModuleList of decoder layers"):
        got = headscore.ablate(lm, random_examples(3), batch_size=3, progress=False)
    assert got.extra["mode"] == "batched"


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(headscore.HeadscoreError, match="unknown ablation mode 'fast'; choose one of prefix"):
        headscore.ablate(tiny_model("llama", layers=1), random_examples(2), mode="fast", progress=False)


@pytest.mark.slow  # 60 s in a shared CI run: every head against a hooked reference, twice
def test_ablation_matches_hooked_reference_zero_and_mean():
    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(6)
    mean = headscore.mean_baseline(lm, examples, batch_size=4, progress=False)
    for baseline, base in (("zero", None), ("mean", mean.double())):
        got = headscore.ablate(lm, examples, baseline=baseline, batch_size=4, progress=False)
        tasks = got.tasks
        for layer in range(3):
            for head in range(4):
                per_task = {t: [] for t in tasks}
                for ex in examples:
                    d = hooked_loss(lm.model, lm.tokenizer, ex, [(layer, head)], 4, base) - \
                        hooked_loss(lm.model, lm.tokenizer, ex, [], 4)
                    per_task[ex.task].append(float(d))
                for ti, t in enumerate(tasks):
                    ref = sum(per_task[t]) / len(per_task[t])
                    assert abs(float(got.values[ti, layer, head]) - ref) < 1e-8, (baseline, layer, head, t)


def test_mean_baseline_matches_token_average():
    lm = tiny_model("llama", dtype=torch.float64, layers=2)
    examples = random_examples(5)
    got = headscore.mean_baseline(lm, examples, batch_size=2, progress=False)
    captured = {0: [], 1: []}
    handles = [lm.model.model.layers[i].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a, i=i: captured[i].append(a[0][0].detach())) for i in captured]
    for ex in examples:
        ids = lm.tokenizer(ex.prompt)["input_ids"] + lm.tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        lm.model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    ref = torch.stack([torch.cat(captured[i]).mean(0).view(4, 8) for i in captured])
    assert got.dtype == torch.float64  # a float64 model's mean is not rounded to float32
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # and the runs that take the mean get the float64 mean's numbers
    for run in (headscore.score, headscore.ablate):
        torch.testing.assert_close(run(lm, examples, baseline="mean", batch_size=2, progress=False).values,
                                   run(lm, examples, baseline=ref, batch_size=2, progress=False).values,
                                   rtol=1e-10, atol=1e-12)


def test_head_set_ablation_and_amplification():
    lm = tiny_model("qwen3", dtype=torch.float64)
    examples = random_examples(6)
    heads = [(0, 1), (2, 3)]
    effects = headscore.ablate_heads(lm, examples, heads, batch_size=4, progress=False)
    for task, eff in effects.items():
        exs = [e for e in examples if e.task == task]
        ref = sum(float(hooked_loss(lm.model, lm.tokenizer, e, heads, 4)
                        - hooked_loss(lm.model, lm.tokenizer, e, [], 4)) for e in exs) / len(exs)
        assert abs(eff.delta - ref) < 1e-8
        assert eff.count == len(exs)
    scaled = headscore.ablate_heads(lm, examples, heads, gate=2.0, batch_size=4, progress=False)
    assert all(abs(s.delta - effects[t].delta) > 1e-6 for t, s in scaled.items())
    with pytest.raises(headscore.HeadscoreError, match="outside"):
        headscore.ablate_heads(lm, examples, [(9, 0)], progress=False)


def test_means_over_tokens_leave_out_padding_that_eager_sliding_windows_make_nan():
    """Eager sliding-window attention gives NaN at a padded position whose window holds only padding; the mean
    baseline (heads, and the edges' writers) and the probe's activations are taken over real tokens only, so a
    batch of mixed lengths gives what one example at a time gives (it gave NaN, and ablate(baseline='mean') then
    failed blaming the examples)."""
    from model_matrix import build_model

    from headscore.cogqa.probe import collect_activations
    from headscore.data.examples import Example
    from headscore.edges.attribution import mean_writer_outputs
    from headscore.edges.residual import residual_model

    lm = LoadedModel(build_model("granite_swa", seed=1), ByteTokenizer(), "tiny-granite-swa")
    assert lm.model.config._attn_implementation == "eager" and lm.model.dtype == torch.float64
    examples = [Example("ab", "c", "alpha"), Example("abcdefghijklmn", "c", "alpha"), Example("abcdefgh", "cd", "b")]
    prep = headscore.prepare(lm, examples)
    batch = next(prep.batches(3, progress=False))
    assert batch.attention_mask.min() == 0  # the batch has padding
    means = [headscore.mean_baseline(lm, examples, batch_size=b, progress=False) for b in (3, 1)]
    assert torch.isfinite(means[0]).all()
    # float64 but for the eager attention's softmax, which runs in float32 (sums of other lengths: other rounding)
    torch.testing.assert_close(means[0], means[1], rtol=1e-6, atol=1e-6 * float(means[1].abs().max()))
    with patch(lm.model) as gates:
        rm = residual_model(lm.model)
        mixed = mean_writer_outputs(lm.model, gates, rm, [batch])
        one = mean_writer_outputs(lm.model, gates, rm, list(prep.batches(1, progress=False)))
    for a, b in zip([mixed.emb, *mixed.heads, *mixed.mlp], [one.emb, *one.heads, *one.mlp], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    acts = [collect_activations(prep, batch_size=b, progress=False) for b in (3, 1)]
    assert torch.isfinite(acts[0]).all()
    torch.testing.assert_close(acts[0], acts[1], rtol=1e-6, atol=1e-6)  # kept in float32
    ablated = [headscore.ablate(lm, examples, baseline="mean", batch_size=b, progress=False).values for b in (3, 1)]
    torch.testing.assert_close(ablated[0], ablated[1], rtol=1e-5, atol=1e-5 * float(ablated[1].abs().max()))


def test_nan_that_padding_brings_into_real_tokens_is_refused_with_the_remedy():
    """Where a tiny sliding window makes the model itself NaN at real tokens of padded rows (Gemma 2 eager: NaN
    values at padded keys times their zero weights), the mean baseline is refused, and a loss names the remedy
    (sdpa or batch_size=1) instead of only the examples; one example at a time runs."""
    from model_matrix import build_model

    from headscore.data.examples import Example
    from headscore.loss import NonFiniteLoss

    lm = LoadedModel(build_model("gemma2", seed=1), ByteTokenizer(), "tiny-gemma2")
    assert lm.model.config._attn_implementation == "eager" and lm.model.config.sliding_window < 14
    examples = [Example("ab", "c", "alpha"), Example("abcdefghijklmn", "c", "alpha"), Example("abcdefgh", "cd", "b")]
    with pytest.raises(headscore.HeadscoreError, match="mean head outputs are not finite.*attn_implementation='sdpa'"):
        headscore.mean_baseline(lm, examples, batch_size=3, progress=False)
    with pytest.raises(NonFiniteLoss, match="their batch had padding: if batch_size=1 gives finite losses, the "
                                            "model's attention gives NaN on padded positions"):
        headscore.ablate(lm, examples, batch_size=3, progress=False)
    assert torch.isfinite(headscore.mean_baseline(lm, examples, batch_size=1, progress=False)).all()
    assert torch.isfinite(headscore.ablate(lm, examples, batch_size=1, progress=False).values).all()
