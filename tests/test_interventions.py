"""Interventions: loss changes equal ablate_heads, greedy exact match equals a hand-rolled generate loop."""

import math
import warnings

import pytest
import torch
from tiny import ByteTokenizer, random_examples, tiny_model

import headscore
from headscore import stats
from headscore.cogqa.interventions import intervene, random_head_sets
from headscore.data.examples import Example
from headscore.patch import head_layout

pytestmark = pytest.mark.usefixtures("one_thread")


class DecodingByteTokenizer(ByteTokenizer):
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 2) for i in ids if i >= 2)


def hand_rolled_greedy(lm, prompt_ids, n, gate_row):
    """Greedy decoding without a cache: one full forward pass per new token."""
    ids = list(prompt_ids)
    with headscore.patch(lm.model) as heads, heads.using(gate_row[None].to(torch.float64)), torch.no_grad():
        for _ in range(n):
            ids.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


@pytest.fixture(scope="module")
def setup():
    lm = tiny_model("llama", dtype=torch.float64)
    lm.tokenizer = DecodingByteTokenizer()
    examples = random_examples(6)
    # make some targets the clean model's own greedy answer, so exact match is sometimes true
    fixed = []
    for i, ex in enumerate(examples):
        if i % 2 == 0:
            prompt = lm.tokenizer(ex.prompt)["input_ids"]
            ids = hand_rolled_greedy(lm, prompt, 3, torch.ones(3, 4))
            text = lm.tokenizer.decode(ids)
            if lm.tokenizer(text, add_special_tokens=False)["input_ids"] == ids and text.strip():
                ex = Example(ex.prompt, text, ex.task)
        fixed.append(ex)
    scores = headscore.score(lm, fixed, batch_size=4, progress=False)
    return lm, fixed, scores


def test_loss_changes_equal_ablate_heads(setup):
    lm, examples, scores = setup
    res = intervene(lm, examples, scores, k=2, seeds=(0, 5), scale=2.0, progress=False)
    for name in ("ablate:alpha", "scale:beta", "random:5"):
        heads = res.head_sets[name]
        gate = 2.0 if name.startswith("scale:") else 0.0
        ref = headscore.ablate_heads(lm, examples, heads, gate=gate, batch_size=4, progress=False)
        for task, eff in ref.items():
            assert res.delta[name][task] == pytest.approx(eff.delta, abs=1e-6)
    for row in res.rows:
        f = row["function"]
        assert row["own_dloss"] == res.delta[f"ablate:{f}"][f]
        assert row["random_dloss"] == pytest.approx(sum(res.delta[f"random:{s}"][f] for s in (0, 5)) / 2)
        assert row["heads"] == [[layer, head] for layer, head, _ in scores.top_k(2, f)]
    assert res.rows[0]["others_dloss"] == pytest.approx(
        (res.delta["ablate:alpha"]["beta"] + res.delta["ablate:alpha"]["gamma"]) / 2)


def test_exact_match_equals_hand_rolled_loop(setup):
    lm, examples, scores = setup
    res = intervene(lm, examples, scores, k=3, seeds=(1,), scale=3.0, progress=False)
    tok = lm.tokenizer
    settings = {"clean": ([], 1.0), "ablate:beta": (res.head_sets["ablate:beta"], 0.0),
                "scale:gamma": (res.head_sets["scale:gamma"], 3.0)}
    for name, (heads, gate) in settings.items():
        row = torch.ones(3, 4)
        for layer, head in heads:
            row[layer, head] = gate
        hits = {t: [] for t in ("alpha", "beta", "gamma")}
        for ex in examples:
            prompt = tok(ex.prompt)["input_ids"]
            n = len(tok(ex.target, add_special_tokens=False)["input_ids"])
            text = tok.decode(hand_rolled_greedy(lm, prompt, n, row))
            hits[ex.task].append(text.strip() == ex.target.strip())
        for task, h in hits.items():
            assert res.accuracy[name][task] == pytest.approx(sum(h) / len(h))
    assert any(v > 0 for v in res.accuracy["clean"].values())  # the planted answers are found


def test_random_head_sets():
    sets = random_head_sets(30, 9, 5, [0, 1, 2])
    assert sets == random_head_sets(30, 9, 5, [0, 1, 2])
    absent = torch.zeros(3, 4, dtype=torch.bool)
    absent[0] = True  # a layer without attention
    absent[2, 2:] = True  # a layer with two heads
    drawn = random_head_sets(3, 4, 6, range(40), absent)  # 6 = every head there is
    assert all(sorted(s) == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)] for s in drawn)
    assert random_head_sets(3, 4, 2, [0], torch.zeros(3, 4, dtype=torch.bool)) == random_head_sets(3, 4, 2, [0])
    with pytest.raises(headscore.HeadscoreError, match="between 1 and 6"):
        random_head_sets(3, 4, 7, [0], absent)
    assert all(len(set(s)) == 5 and all(0 <= layer < 30 and 0 <= h < 9 for layer, h in s) for s in sets)
    assert sets[0] != sets[1]
    with pytest.raises(headscore.HeadscoreError, match="k must be"):
        random_head_sets(2, 2, 5, [0])


def test_table_outputs(setup, tmp_path):
    lm, examples, scores = setup
    res = intervene(lm, examples, scores, k=1, seeds=(0,), scale=None, functions=["beta"], progress=False)
    assert [r["function"] for r in res.rows] == ["beta"] and "scale:beta" not in res.head_sets
    md = res.to_markdown()
    assert md.count("\n| beta |") == 1 and "own/random" in md
    import json
    doc = json.loads(res.to_json(tmp_path / "iv.json").read_text())
    assert doc["table"][0]["function"] == "beta" and doc["k"] == 1
    with pytest.raises(headscore.HeadscoreError, match="no scores or no examples"):
        intervene(lm, examples, scores, functions=["nope"], progress=False)


def test_cli_errors_and_arguments(tmp_path, capsys):
    from headscore.cli import build_parser, main

    def _parser():
        return build_parser()[0]

    assert main(["intervene", "--scores", str(tmp_path / "none.hs"), "--tasks", "builtin"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["reproduce-cogqa", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]) == 2
    assert "no such CogQA file" in capsys.readouterr().err
    args = _parser().parse_args(["reproduce-cogqa", "f.json", "--out", "d", "--max-per-function", "4",
                                 "--ablation-per-function", "0"])
    assert args.max_per_function == 4 and args.ablation_per_function == 0 and args.k == 5
    assert (args.others_per_function, args.seeds, args.resamples, args.level) == (2, 5, 1000, 0.95)
    args = _parser().parse_args(["intervene", "--scores", "s.hs", "--others-per-function", "1"])
    assert args.others_per_function == 1 and args.resamples == 1000
    assert main(["reproduce-cogqa", "f.json", "--out", str(tmp_path / "o"), "--level", "1.5"]) == 2
    assert "must be between 0 and 1" in capsys.readouterr().err
    assert _parser().parse_args(["score", "--method", "probe", "--out", "x.hs"]).method == "probe"


def test_several_sources_partial_measurement_and_intervals(setup):
    """Three sources share the random sets; a function's sets are measured on its own examples and on the first
    example of every other function only; every figure gets an interval and a permutation p-value."""
    lm, examples, scores = setup
    other = headscore.HeadScores(-scores.values, scores.stderr, scores.counts, scores.tasks, "negated", scores.model)
    # two examples per function: a 50% interval is the most they hold (stats.min_examples_for)
    res = intervene(lm, examples, {"taylor": scores, "negated": other}, k=2, seeds=(0, 1, 2), scale=2.0,
                    others_per_function=1, resamples=200, level=0.5, progress=False)
    assert res.sources == ["taylor", "negated"]
    assert "ablate:negated:alpha" in res.head_sets and "scale:taylor:alpha" in res.head_sets
    assert "scale:negated:alpha" not in res.head_sets  # amplification: first source only
    names = ["clean", *res.head_sets]
    first_of = {t: next(i for i, ex in enumerate(examples) if ex.task == t) for t in ("alpha", "beta", "gamma")}
    row = res.change[names.index("ablate:negated:alpha")]
    for i, ex in enumerate(examples):
        measured = ex.task == "alpha" or i == first_of[ex.task]
        assert bool(torch.isfinite(row[i])) == measured, (i, ex.task)
    assert torch.isfinite(res.change[names.index("random:1")]).all()
    # greedy answers are decoded for a function's own examples only
    assert math.isnan(res.accuracy["ablate:negated:alpha"]["beta"])
    assert not math.isnan(res.accuracy["ablate:negated:alpha"]["alpha"])
    # the measured changes equal ablate_heads on those examples
    heads = res.head_sets["ablate:negated:alpha"]
    ref = headscore.ablate_heads(lm, [examples[first_of["beta"]]], heads, batch_size=4, progress=False)
    assert float(row[first_of["beta"]]) == pytest.approx(ref["beta"].delta, abs=1e-9)
    assert res.delta["ablate:negated:alpha"]["beta"] == pytest.approx(ref["beta"].delta, abs=1e-9)
    table = {(r["function"], r["source"]): r for r in res.rows}
    assert len(table) == 6
    r = table["alpha", "negated"]
    own = row[[i for i, ex in enumerate(examples) if ex.task == "alpha"]]
    rnd = torch.stack([res.change[names.index(f"random:{s}")] for s in (0, 1, 2)]).mean(0)
    rnd = rnd[[i for i, ex in enumerate(examples) if ex.task == "alpha"]]
    assert r["own_dloss"] == pytest.approx(float(own.mean()))
    assert r["others_dloss"] == pytest.approx((float(row[first_of["beta"]]) + float(row[first_of["gamma"]])) / 2)
    assert r["selectivity"] == pytest.approx(r["own_dloss"] - r["others_dloss"])
    assert r["own_dloss_ci"][0] <= r["own_dloss"] <= r["own_dloss_ci"][1]
    # one example of each other function: each is a resampled group of its own, below the floor of 2 that a 50%
    # interval needs, so others and selectivity have no interval (pooled, the 2 examples passed the floor, and a
    # resample could hold one function twice and the other not at all)
    assert all(math.isnan(c) for key in ("others_dloss_ci", "selectivity_ci") for c in r[key])
    assert r["p_own_vs_random"] == pytest.approx(stats.sign_flip_pvalue(own - rnd))
    summary = res.source_summary()
    mean_own = sum(table[f, "negated"]["own_dloss"] for f in ("alpha", "beta", "gamma")) / 3
    assert summary["sources"]["negated"]["own"]["value"] == pytest.approx(mean_own)
    diff = summary["differences"]["taylor - negated"]["selectivity"]["value"]
    assert diff == pytest.approx(summary["sources"]["taylor"]["selectivity"]["value"]
                                 - summary["sources"]["negated"]["selectivity"]["value"])
    md = res.to_markdown()
    assert "| alpha | negated |" in md and "[" in md and "sign-flip" in md


def test_loss_only_settings_equal_the_decoding_path(setup):
    """Sets measured on other functions' examples skip greedy decoding: the same loss from one forward pass."""
    from headscore.cogqa.interventions import evaluate_settings, setting_losses

    lm, examples, _ = setup
    rows = torch.ones(3, 3, 4, dtype=torch.float64)
    rows[1, 0, 1] = 0.0
    rows[2, 2, :2] = 2.0
    tok = lm.tokenizer
    with headscore.patch(lm.model) as heads:
        for ex in examples[:3]:
            prompt = tok(ex.prompt)["input_ids"]
            target = tok(ex.target, add_special_tokens=False)["input_ids"]
            want, _ = evaluate_settings(lm.model, heads, prompt, target, rows)
            got = setting_losses(lm.model, heads, prompt, target, rows)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _measured_like_references(lm, examples, scores, res, row_shape):
    """Every set's loss changes equal ``ablate_heads`` (full passes, no cache) and the clean and first ablated
    set's exact-match accuracy equals a greedy loop of full passes."""
    for name, heads in res.head_sets.items():
        gate = 2.0 if name.startswith("scale:") else 0.0
        for task, eff in headscore.ablate_heads(lm, examples, heads, gate=gate, batch_size=4,
                                                progress=False).items():
            assert res.delta[name][task] == pytest.approx(eff.delta, abs=1e-6), (name, task)
    tok = lm.tokenizer
    first = next(name for name in res.head_sets if name.startswith("ablate:"))
    for name, heads in (("clean", []), (first, res.head_sets[first])):
        row = torch.ones(row_shape)
        for layer, head in heads:
            row[layer, head] = 0.0
        hits = {t: [] for t in res.counts}
        for ex in examples:
            prompt = tok(ex.prompt)["input_ids"]
            n = len(tok(ex.target, add_special_tokens=False)["input_ids"])
            hits[ex.task].append(tok.decode(hand_rolled_greedy(lm, prompt, n, row)).strip() == ex.target.strip())
        for task, h in hits.items():
            assert res.accuracy[name][task] == pytest.approx(sum(h) / len(h)), (name, task)


def test_a_cache_that_differs_from_full_passes_is_not_used(setup):
    """A model whose cached passes differ from full ones (planted: the embeddings shift in every pass that
    continues a cache) is decoded with full passes, with a warning: the loss changes and accuracies equal the
    references. Without the plant the cache is used, silently."""
    from headscore.cogqa.interventions import cached_decoding_works

    lm, examples, scores = setup
    tok = lm.tokenizer
    prompt = tok(examples[0].prompt)["input_ids"]
    target = tok(examples[0].target, add_special_tokens=False)["input_ids"]
    rows = torch.ones(2, 3, 4, dtype=torch.float64)
    rows[1, 1, 2] = 0.0
    with headscore.patch(lm.model) as heads, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cached_decoding_works(lm.model, heads, prompt, target, rows)
    state = {}

    def note(module, args, kwargs):
        state["cached"] = any(kwargs.get(key) is not None for key in ("cache", "past_key_values"))

    top = lm.model.register_forward_pre_hook(note, with_kwargs=True)
    shift = lm.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: out + 0.5 if state.get("cached") else None)
    try:
        with pytest.warns(UserWarning, match="does not reproduce full passes"):
            res = intervene(lm, examples, scores, k=2, seeds=(3,), scale=2.0, progress=False)
        _measured_like_references(lm, examples, scores, res, (3, 4))
    finally:
        top.remove()
        shift.remove()


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["jamba", "bamba", "lfm2", "granitemoehybrid"])
def test_hybrid_families_measure_like_full_passes(family):
    """Hybrid families keep recurrent states in their cache: intervene crashed on Jamba, Bamba and
    GraniteMoeHybrid (IndexError from a plain DynamicCache; Qwen3-Next too, whose reference linear attention
    takes 15 s here: not among these; LFM2 ran), and Jamba's and Bamba's cached continuation differs from a full
    pass in transformers 5.24 (LFM2's and GraniteMoeHybrid's does not: their cache is used). Loss changes and
    accuracies equal the references (float64 models)."""

    import model_matrix
    from tiny_saved import char_tokenizer

    lm = headscore.LoadedModel(model_matrix.build_model(family, seed=1), char_tokenizer(), family)
    examples = random_examples(6)
    headscore.prepare(lm, examples)  # marks the layers without attention, as intervene does
    layout = head_layout(lm.model)
    shape = (layout.num_layers, layout.num_heads)
    planted = []
    for i, ex in enumerate(examples):  # the clean model's own greedy answer as some targets
        if i % 2 == 0:
            text = lm.tokenizer.decode(hand_rolled_greedy(lm, lm.tokenizer(ex.prompt)["input_ids"], 2,
                                                          torch.ones(shape)), skip_special_tokens=True)
            if text.strip() and lm.tokenizer(text, add_special_tokens=False)["input_ids"] and len(text) == 2:
                ex = Example(ex.prompt, text, ex.task)
        planted.append(ex)
    scores = headscore.score(lm, planted, batch_size=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning, where the family's cache differs
        res = intervene(lm, planted, scores, k=2, seeds=(0,), scale=2.0, progress=False)
    _measured_like_references(lm, planted, scores, res, shape)
    assert any(v > 0 for v in res.accuracy["clean"].values())


def test_others_resample_each_function_on_its_own_and_the_seed_sets_the_intervals(monkeypatch, tmp_path, capsys):
    """The others and selectivity figures resample each other function's examples as a group of its own (sizes
    [own, 3, 3], not [own, 6]), so every resample holds every function; ``seed`` (``intervene --seed``) sets the
    intervals and is kept in the JSON (it was accepted and ignored); the header's star follows the level."""
    from tiny_saved import save_tiny_model

    lm = tiny_model("llama", dtype=torch.float64)
    lm.tokenizer = DecodingByteTokenizer()
    examples = random_examples(12)  # 4 per function
    scores = headscore.score(lm, examples, batch_size=6, progress=False)
    sizes = []
    real = stats.bootstrap

    def recording(statistic, group_sizes, **kwargs):
        sizes.append(list(group_sizes))
        return real(statistic, group_sizes, **kwargs)

    monkeypatch.setattr(stats, "bootstrap", recording)
    res = intervene(lm, examples, scores, k=1, seeds=(0,), scale=None, others_per_function=3, resamples=200,
                    level=0.5, progress=False)
    assert [3, 3] in sizes and [4, 3, 3] in sizes and [6] not in sizes and [4, 6] not in sizes
    r = res.rows[0]
    assert r["others_dloss_ci"][0] <= r["others_dloss"] <= r["others_dloss_ci"][1]
    monkeypatch.setattr(stats, "bootstrap", real)
    again = {seed: intervene(lm, examples, scores, k=1, seeds=(0,), scale=None, functions=["alpha"], resamples=200,
                             level=0.5, seed=seed, progress=False) for seed in (0, 7)}
    assert again[0].rows[0]["own_dloss"] == again[7].rows[0]["own_dloss"]
    assert again[0].rows[0]["own_dloss_ci"] != again[7].rows[0]["own_dloss_ci"]
    assert again[7].as_dict()["bootstrap_seed"] == 7
    md = again[7].to_markdown()
    assert "seed 7" in md and "* = the 50% interval excludes 0" in md and "5% level" not in md
    # the command line passes --seed through
    from headscore.cli import main

    model = save_tiny_model(tmp_path / "model")
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(f'{{"prompt": "{ex.prompt}", "target": "{ex.target}", "task": "{ex.task}"}}\n'
                            for ex in random_examples(12)))
    saved = headscore.HeadScores(scores.values, scores.stderr, scores.counts, scores.tasks, "taylor", "m")
    saved.save(tmp_path / "s.hs")
    seen = {}
    for seed in ("0", "7"):
        out = tmp_path / f"iv{seed}.md"
        assert main(["intervene", "--model", str(model), "--tasks", str(data), "--scores", str(tmp_path / "s.hs"),
                     "--k", "1", "--seeds", "1", "--resamples", "100", "--level", "0.5", "--seed", seed,
                     "--no-progress", "--out", str(out)]) == 0
        import json
        doc = json.loads(out.with_suffix(".json").read_text())
        seen[seed] = (doc["bootstrap_seed"], [row["own_dloss_ci"] for row in doc["table"]])
    capsys.readouterr()
    assert seen["0"][0] == 0 and seen["7"][0] == 7 and seen["0"][1] != seen["7"][1]
