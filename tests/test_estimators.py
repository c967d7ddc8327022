"""ig, curvature and verified mode against independent float64 references (o_proj hooks, real ablation)."""

import numpy as np
import pytest
import torch
from tiny import random_examples, tiny_model

import headscore
from headscore.errors import HeadscoreError
from headscore.loss import Metric
from headscore.methods.ablation import selected_losses as selected
from headscore.methods.gradient import CURVATURE_STEP, probe_signs

pytestmark = pytest.mark.numerics

LAYERS, HEADS = 3, 4


def reference(lm, ex, gates):
    """Loss and dL/dg [L, H] of one example (unpadded) with every head's o_proj input scaled by ``gates``."""
    model, tok = lm.model, lm.tokenizer
    p, t = tok(ex.prompt)["input_ids"], tok(ex.target, add_special_tokens=False)["input_ids"]
    g = gates.clone().double().requires_grad_(True)
    handles = []
    for li, layer in enumerate(model.model.layers):
        def hook(module, args, li=li):
            x = args[0].view(*args[0].shape[:-1], HEADS, -1)
            return ((g[li][:, None] * x).view_as(args[0]),)
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
    try:
        logits = model(input_ids=torch.tensor([p + t])).logits[0].double()
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits, -1)
    loss = -torch.stack([logp[len(p) - 1 + i, k] for i, k in enumerate(t)]).mean()
    return float(loss.detach()), torch.autograd.grad(loss, g)[0]


def task_means(values, examples, tasks):
    return torch.stack([values[[i for i, ex in enumerate(examples) if ex.task == t]].mean(0) for t in tasks])


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", dtype=torch.float64)


@pytest.fixture(scope="module")
def examples():
    return random_examples(6)


@pytest.mark.parametrize(("steps", "fraction"), [(1, 1.0), (3, 0.2), (4, 1.0), (2, None)])
def test_ig_is_the_mean_gradient_along_the_gate_path(lm, examples, steps, fraction):
    scores = headscore.score(lm, examples, method="ig", steps=steps, path_fraction=fraction, batch_size=4,
                             progress=False)
    fraction = 0.2 if fraction is None else fraction  # the gate path's default
    points = [1 - fraction * (k + 0.5) / steps for k in range(steps)]
    ref = torch.stack([-torch.stack([reference(lm, ex, torch.full((LAYERS, HEADS), a, dtype=torch.float64))[1]
                                     for a in points]).mean(0) for ex in examples])
    torch.testing.assert_close(scores.values, task_means(ref, examples, scores.tasks), rtol=1e-8, atol=1e-11)
    assert scores.method == "ig" and scores.extra["passes_per_batch"] == steps
    assert scores.extra["steps"] == steps and scores.extra["path_fraction"] == fraction


def test_ig_with_many_steps_is_the_integral_of_the_path(lm, examples):
    """Against Gauss-Legendre quadrature of the reference gradient (a different rule), and completeness: the
    heads' ig values times the path length sum to the real loss change of moving every gate together."""
    fraction = 0.6
    scores = headscore.score(lm, examples, method="ig", steps=100, path_fraction=fraction, batch_size=6,
                             progress=False)
    nodes, weights = np.polynomial.legendre.leggauss(16)
    alphas = 1 - fraction / 2 * (nodes + 1)
    ref = torch.stack([-sum(w / 2 * reference(lm, ex, torch.full((LAYERS, HEADS), float(a), dtype=torch.float64))[1]
                            for a, w in zip(alphas, weights, strict=True)) for ex in examples])
    torch.testing.assert_close(scores.values, task_means(ref, examples, scores.tasks), rtol=1e-3, atol=5e-5)
    heads = [(layer, h) for layer in range(LAYERS) for h in range(HEADS)]
    moved = headscore.ablate_heads(lm, examples, heads, gate=1 - fraction, batch_size=6, progress=False)
    for t, task in enumerate(scores.tasks):
        assert float(scores.values[t].sum()) * fraction == pytest.approx(moved[task].delta, rel=5e-4, abs=1e-7)


def test_curvature_is_taylor_plus_half_the_hutchinson_diagonal(lm, examples):
    scores = headscore.score(lm, examples, method="curvature", batch_size=4, progress=False)
    ref = []
    for i, ex in enumerate(examples):
        v = probe_signs(torch.tensor([i]), (LAYERS, HEADS))[0]
        _, g1 = reference(lm, ex, torch.ones(LAYERS, HEADS))
        _, g2 = reference(lm, ex, 1 - CURVATURE_STEP * v)
        ref.append(-g1 + 0.5 * v * (g1 - g2) / CURVATURE_STEP)
    torch.testing.assert_close(scores.values, task_means(torch.stack(ref), examples, scores.tasks),
                               rtol=1e-7, atol=1e-10)
    assert scores.extra["passes_per_batch"] == 2


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_verified_heads_equal_ablation_and_the_rest_stay_estimates(lm, examples, baseline):
    taylor = headscore.score(lm, examples, baseline=baseline, batch_size=4, progress=False)
    verified = headscore.score(lm, examples, baseline=baseline, batch_size=4, progress=False, verify=2)
    truth = headscore.ablate(lm, examples, baseline=baseline, batch_size=4, progress=False)
    assert verified.exact is not None and verified.exact.sum((1, 2)).tolist() == [4, 4, 4]
    mask = verified.exact
    torch.testing.assert_close(verified.values[mask], truth.values[mask], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(verified.stderr[mask], truth.stderr[mask], rtol=1e-7, atol=1e-12)
    assert torch.equal(verified.values[~mask], taylor.values[~mask])
    for t in range(len(verified.tasks)):  # the top 2 by |taylor| are among the exact ones
        top = taylor.values[t].abs().flatten().topk(2).indices
        assert mask[t].flatten()[top].all()
    rows = verified.example_tasks
    ex_mask = mask[rows]
    torch.testing.assert_close(verified.example_values[ex_mask], truth.example_values[ex_mask].float())
    assert verified.extra["verify_top"] == 2 and set(verified.extra["verify_flagged"].values()) == {2}
    assert verified.extra["passes_per_batch"] == 1  # the flag's mass comes from taylor's own backward pass
    with_ig = headscore.score(lm, examples, baseline=baseline, batch_size=4, progress=False, verify=2, method="ig")
    assert with_ig.extra["passes_per_batch"] == 3  # 2 steps, and a pass at gates = 1 for the mass


@pytest.mark.parametrize("baseline", ["zero", "mean", "corrupt"])
def test_mass_from_the_gradient_pass_equals_the_per_position_terms(baseline):
    """The first-order mass collected in taylor's own backward pass equals sum_t |term_t| of a per-position
    gate-gradient pass, and collecting it leaves the gate gradients bitwise as they were."""
    from headscore.methods.baseline import corrupt_head_outputs
    from headscore.methods.gradient import gate_gradients
    from headscore.methods.verify import MassCollector, first_order_mass
    from headscore.patch import patch

    lm = tiny_model("qwen2", dtype=torch.float64)
    examples = [headscore.Example(ex.prompt, ex.target, ex.task, corrupt=ex.prompt[::-1])
                for ex in random_examples(5, seed=2)]
    prep = headscore.prepare(lm, examples)
    g = torch.Generator().manual_seed(0)
    with patch(lm.model) as heads:
        layout = heads.layout
        static = torch.randn(layout.num_layers, layout.num_heads, layout.head_dim, generator=g, dtype=torch.float64)
        for batch in prep.batches(3, progress=False):
            base = {"zero": None, "mean": static,
                    "corrupt": corrupt_head_outputs(lm.model, heads, batch)}[baseline]
            collector = MassCollector(batch.size, layout.num_layers, layout.num_heads)
            with heads.observing_gradients(collector):
                _, grad = gate_gradients(lm.model, heads, batch, base)
            _, plain = gate_gradients(lm.model, heads, batch, base)
            _, per_position = gate_gradients(lm.model, heads, batch, base, per_position=True)
            assert torch.equal(grad, plain)
            mass = first_order_mass(per_position)
            assert mass.abs().max() > 1e-3
            torch.testing.assert_close(collector.values, mass, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("budget", [None, 0])
def test_verify_with_corrupt_baseline_equals_patching(budget, monkeypatch):
    """The exact passes reuse the scoring pass's corrupted runs (one per batch, not two); with no memory for
    them (budget 0) they run them again; either way the values are activation patching's."""
    import headscore.api as api
    import headscore.methods.verify as verify_module

    runs = []
    real = api.corrupt_head_outputs
    monkeypatch.setattr(api, "corrupt_head_outputs", lambda *a, **k: runs.append(1) or real(*a, **k))
    if budget is not None:
        monkeypatch.setattr(api, "KeptBaselines", lambda: verify_module.KeptBaselines(budget))
    lm = tiny_model("qwen2", dtype=torch.float64)
    examples = [headscore.Example(ex.prompt, ex.target, ex.task, corrupt=ex.prompt[::-1])
                for ex in random_examples(4)]
    verified = headscore.score(lm, examples, baseline="corrupt", batch_size=2, progress=False, verify=3)
    assert len(runs) == (2 if budget is None else 4)  # 2 batches
    truth = headscore.ablate(lm, examples, baseline="corrupt", batch_size=2, progress=False)
    torch.testing.assert_close(verified.values[verified.exact], truth.values[verified.exact], rtol=1e-9,
                               atol=1e-12)


def test_kept_baselines_count_each_kept_tensor_once(lm, examples):
    """The budget's account: a batch kept twice counts once; one handed out, or found to be of another shape
    (then run again), no longer counts."""
    from headscore.methods.verify import KeptBaselines

    batch = next(iter(headscore.prepare(lm, examples).batches(3, progress=False)))
    base = torch.zeros(LAYERS, batch.size, batch.input_ids.shape[1], HEADS, 8)
    nbytes = base.numel() * base.element_size()
    kept = KeptBaselines(budget=2 * nbytes)
    kept.keep(batch, base)
    kept.keep(batch, base.clone())
    assert kept.size == nbytes
    ran = []
    assert kept.get(batch, lambda b: ran.append(b)) is not None and not ran and kept.size == 0
    kept.keep(batch, base[:, :, :-1])  # a baseline of other width: not this batch's
    assert kept.get(batch, lambda b: ran.append(b)) is None and ran == [batch] and kept.size == 0
    assert not kept.kept
    small = KeptBaselines(budget=nbytes - 1)
    small.keep(batch, base)  # over the budget: not kept
    assert small.size == 0 and not small.kept


def test_verify_without_prefix_reuse_runs_every_layer_and_agrees(lm, examples, monkeypatch):
    """A model whose layers cannot be replayed (the check fails): the exact passes run every layer for every
    pair, the mode says so, and the values are ablate's."""
    import headscore.methods.verify as verify_module

    monkeypatch.setattr(verify_module, "prefix_reuse_works", lambda *args, **kwargs: False)
    replays = []
    monkeypatch.setattr(verify_module, "selected_losses", lambda *args, **kwargs: replays.append(kwargs["prefix"])
                        or selected(*args, **kwargs))
    verified = headscore.score(lm, examples, batch_size=4, progress=False, verify=3)
    truth = headscore.ablate(lm, examples, batch_size=4, progress=False)
    assert verified.extra["verify_mode"] == "batched" and replays and not any(replays)
    torch.testing.assert_close(verified.values[verified.exact], truth.values[verified.exact], rtol=1e-9,
                               atol=1e-12)


def test_flag_finds_a_planted_nonlinear_head():
    """Pairs of identical prompts with a loss that flips sign between the two, exp(+-(u - u_clean)) (u: a logit
    at the answer position): every head's gradient cancels over the pair, so every estimate is 0, but
    ablation changes the loss by about cosh(c) - 1 for a head that moves u by c. The head planted with the
    largest c (its o_proj slice scaled up) must be flagged, verified, and come out on top."""
    lm1 = tiny_model("llama", layers=1, heads=4, kv_heads=2, head_dim=8, dtype=torch.float64, seed=3)
    planted = 2
    with torch.no_grad():
        lm1.model.model.layers[0].self_attn.o_proj.weight[:, planted * 8:(planted + 1) * 8] *= 4
    base = random_examples(2, tasks=("t",))
    examples = [ex for ex in base for _ in range(2)]
    clean: dict[int, float] = {}

    def loss(logits, batch):
        answer = batch.target_mask.float().argmax(1) - 1
        u = logits[torch.arange(len(answer)), answer, 5].double()
        sign = 1.0 - 2.0 * (batch.example_index % 2).to(u)
        ref = torch.tensor([clean.setdefault(int(i), float(x)) for i, x in zip(batch.example_index, u, strict=True)],
                           dtype=u.dtype)
        return torch.exp(sign * (u - ref))

    headscore.score(lm1, examples, metric=Metric("u", fn=loss), batch_size=4, progress=False)  # records u_clean
    metric = Metric("u", fn=loss)
    plain = headscore.score(lm1, examples, metric=metric, batch_size=4, progress=False)
    assert plain.values.abs().max() < 1e-12  # every estimate cancels
    truth = headscore.ablate(lm1, examples, metric=metric, batch_size=4, progress=False)
    assert int(truth.values[0, 0].argmax()) == planted and float(truth.values[0, 0, planted]) > 0.1
    verified = headscore.score(lm1, examples, metric=metric, batch_size=4, progress=False, verify=1)
    assert bool(verified.exact[0, 0, planted]) and int(verified.values[0, 0].argmax()) == planted
    assert verified.top_k(1)[0][:2] == (0, planted)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "ig", "steps": 0}, "steps must be a whole number of at least 1"),
    ({"method": "ig", "path_fraction": 0.0}, "path_fraction must be in (0, 1]"),
    ({"method": "ig", "path_fraction": 1.5}, "path_fraction must be in (0, 1]"),
    ({"verify": 13}, "the model has 12 heads"),
    ({"verify": 0}, "verify takes a number of heads of at least 1"),
    ({"method": "abs", "verify": 2}, "no exact counterpart"),
    ({"method": "fisher", "verify": True}, "no exact counterpart"),
    ({"method": "curvature", "per_position": True}, "no per-position maps"),
    ({"method": "abs", "per_position": True}, "abs of a head is not the sum of its tokens' terms"),
    ({"method": "fisher", "per_position": True}, "fisher of a head is not the sum of its tokens' terms"),
    ({"verify": 2, "checkpoint": "x.ckpt"}, "without checkpoints"),
])
def test_bad_estimator_settings(lm, examples, kwargs, message):
    with pytest.raises(HeadscoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        headscore.score(lm, examples, progress=False, **kwargs)


@pytest.fixture
def forward_passes(lm):
    """Every forward pass of the model from here to the end of the test."""
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *args: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"verify": 13}, "verify 13: the model has 12 heads"),
    ({"verify": 0}, "verify takes a number of heads of at least 1"),
    ({"verify": -3}, "verify takes a number of heads of at least 1"),
    ({"verify": 2.5}, "verify takes a number of heads of at least 1"),
    ({"verify": 2, "rows_per_pass": 0}, "rows_per_pass must be a whole number of at least 1, got 0"),
    ({"rows_per_pass": -4}, "rows_per_pass must be a whole number of at least 1, got -4"),
])
def test_bad_verify_refused_before_any_forward_pass(lm, examples, forward_passes, kwargs, message):
    with pytest.raises(HeadscoreError, match=message):
        headscore.score(lm, examples, progress=False, **kwargs)
    assert not forward_passes


@pytest.mark.parametrize("entry", ["ablate", "ablate_edges"])
def test_rows_per_pass_below_one_refused_before_any_forward_pass(lm, examples, forward_passes, entry):
    with pytest.raises(HeadscoreError, match="rows_per_pass must be a whole number of at least 1, got 0"):
        getattr(headscore, entry)(lm, examples, rows_per_pass=0, progress=False)
    assert not forward_passes


def test_circuit_rows_per_pass_below_one_refused_before_any_forward_pass(lm, examples, forward_passes):
    scores = headscore.score(lm, examples, edges=True, batch_size=4, progress=False)
    before = len(forward_passes)
    with pytest.raises(HeadscoreError, match="rows_per_pass must be a whole number of at least 1, got 0"):
        headscore.circuit(lm, examples, scores, edges=5, rows_per_pass=0, progress=False)
    assert len(forward_passes) == before


def test_verify_refused_in_a_process_group_unless_not_distributed(lm, examples, forward_passes, monkeypatch):
    """With distributed=None a two-rank group would shard the data: each rank would verify its own heads on its
    own share, and the first-order mass would not be reduced. Refused before scoring; distributed=False runs."""
    import headscore.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "rank_and_world", lambda distributed=None: (0, 1 if distributed is False else 2))
    with pytest.raises(HeadscoreError, match="a process group of 2 ranks is initialised; pass distributed=False"):
        headscore.score(lm, examples, batch_size=4, progress=False, verify=2)
    assert not forward_passes
    alone = headscore.score(lm, examples, batch_size=4, progress=False, verify=2, distributed=False)
    assert alone.exact.any() and "world_size" not in alone.extra
