"""HeadScores files, exports, accumulators and compare()."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import headscore
from headscore.accumulate import TaskAccumulator
from headscore.compare import agreement, topk_overlap
from headscore.results import HeadScores


def _scores(t=3, layers=5, heads=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return HeadScores(torch.randn(t, layers, heads, generator=g, dtype=torch.float64),
                      torch.rand(t, layers, heads, generator=g, dtype=torch.float64),
                      torch.tensor([3, 4, 5][:t]), [f"task {i}" for i in range(t)], "taylor", "tiny",
                      "abc123", extra={"seconds": 1.5})


def test_save_load_exact(tmp_path):
    s = _scores()
    path = s.save(tmp_path / "x.hs")
    back = HeadScores.load(path)
    assert torch.equal(back.values, s.values) and torch.equal(back.stderr, s.stderr)
    assert torch.equal(back.counts, s.counts)
    assert (back.tasks, back.method, back.model, back.data_hash, back.extra, back.versions) == \
        (s.tasks, s.method, s.model, s.data_hash, s.extra, s.versions)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_example_values_round_trip_select_and_checks(tmp_path):
    s = _scores()
    g = torch.Generator().manual_seed(1)
    values = torch.randn(12, 5, 4, generator=g)
    tasks = torch.tensor([0, 1, 2] * 4)
    s = HeadScores(s.values, s.stderr, s.counts, s.tasks, s.method, s.model, s.data_hash, example_values=values,
                   example_tasks=tasks)
    back = HeadScores.load(s.save(tmp_path / "x.hs"))
    assert back.has_examples and torch.equal(back.example_values, values) and torch.equal(back.example_tasks, tasks)
    sub = s.select(["task 2", "task 0"])
    assert torch.equal(sub.example_values, values[tasks != 1])
    assert sub.example_tasks.tolist() == [1, 0] * 4  # rows of the selected order
    assert not _scores().has_examples and not HeadScores.load(_scores().save(tmp_path / "y.hs")).has_examples
    for bad_values, bad_tasks, message in ((values[:, :2], tasks, "example_values must be"),
                                           (values, tasks[:5], "example_tasks must be"),
                                           (values, tasks + 3, "index the task rows"),
                                           (values, None, "come together")):
        with pytest.raises(ValueError, match=message):
            HeadScores(s.values, s.stderr, s.counts, s.tasks, "m", "x", example_values=bad_values,
                       example_tasks=bad_tasks)


def test_score_and_ablate_keep_each_examples_value():
    """Row i of example_values is example i's own value: scoring it alone gives the same map."""
    from tiny import random_examples, tiny_model

    lm = tiny_model("llama", dtype=torch.float64, layers=2)
    examples = random_examples(7)
    for run in (lambda ex: headscore.score(lm, ex, batch_size=3, progress=False),
                lambda ex: headscore.ablate(lm, ex, batch_size=3, progress=False)):
        full = run(examples)
        assert full.example_values.shape == (7, 2, 4) and full.example_values.dtype == torch.float32
        assert full.example_tasks.tolist() == [full.tasks.index(ex.task) for ex in examples]
        for i in (0, 4):
            alone = run([examples[i]])
            torch.testing.assert_close(full.example_values[i].double(), alone.values[0], rtol=1e-6, atol=1e-7)
        for t in range(len(full.tasks)):  # float32 storage: relative error 2^-24 per value
            torch.testing.assert_close(full.example_values[full.example_tasks == t].double().mean(0),
                                       full.values[t], rtol=1e-6, atol=1e-7)


def test_accumulator_stops_keeping_examples_beyond_the_cap(monkeypatch):
    import headscore.accumulate as accumulate

    monkeypatch.setattr(accumulate, "MAX_KEPT_VALUES", 50)
    acc = TaskAccumulator(["a"], 2, 3, keep_examples=True)
    acc.add(torch.zeros(8, dtype=torch.long), torch.randn(8, 2, 3))
    assert acc.examples[0].shape == (8, 2, 3)
    assert not acc.dropped
    with pytest.warns(UserWarning, match="per-example values are no longer kept: 9 examples of 6 values each pass 50"):
        acc.add(torch.zeros(1, dtype=torch.long), torch.randn(1, 2, 3))  # 9 * 6 = 54 values > 50
    assert acc.examples is None and int(acc.count[0]) == 9 and acc.dropped


def test_a_run_past_the_cap_says_so_and_compare_names_why(monkeypatch, tmp_path, capsys):
    """Per-example values dropped for their number: a warning during the run, the file's extra records it, and
    compare's note names it (it blamed the file's age or a multi-process run)."""
    from tiny import random_examples, tiny_model

    import headscore.accumulate as accumulate
    from headscore.cli import main

    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(9)
    monkeypatch.setattr(accumulate, "MAX_KEPT_VALUES", 5 * 3 * 4)  # five examples' worth of a 3 x 4 grid
    with pytest.warns(UserWarning, match="per-example values are no longer kept"):
        s = headscore.score(lm, examples, batch_size=3, progress=False)
    assert not s.has_examples and s.extra["example_values_dropped"] is True
    monkeypatch.setattr(accumulate, "MAX_KEPT_VALUES", 2**25)
    b = headscore.score(lm, examples, batch_size=3, progress=False, method="abs")
    assert b.has_examples
    assert main(["compare", str(s.save(tmp_path / "a.hs")), str(b.save(tmp_path / "b.hs"))]) == 0
    assert "no intervals: A kept no per-example values (A had more examples than per-example values are kept " \
           "for)" in capsys.readouterr().out


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.hs"
    bad.write_bytes(b"not a scores file")
    with pytest.raises(headscore.HeadscoreError, match="not a headscore scores file"):
        HeadScores.load(bad)
    with pytest.raises(headscore.HeadscoreError, match="no such file"):
        HeadScores.load(tmp_path / "missing.hs")


def test_exports(tmp_path):
    s = _scores()
    s.export(tmp_path / "x.csv")
    lines = (tmp_path / "x.csv").read_text().splitlines()
    assert lines[0] == "task,layer,head,value,stderr,count"
    assert len(lines) == 1 + 3 * 5 * 4
    task, layer, head, value, *_ = lines[1 + 1 * 20 + 2 * 4 + 3].split(",")
    assert (task, int(layer), int(head)) == ("task 1", 2, 3)
    assert float(value) == float(s.values[1, 2, 3])
    doc = json.loads(s.export(tmp_path / "x.json").read_text())
    assert np.array_equal(np.array(doc["values"]), s.values.numpy())
    with pytest.raises(headscore.HeadscoreError):
        s.export(tmp_path / "x.txt")


def test_top_k_finds_planted_heads():
    s = _scores()
    s.values[1, 3, 2] = 100.0
    s.values[1, 0, 1] = 50.0
    assert s.top_k(2, "task 1") == [(3, 2, 100.0), (0, 1, 50.0)]
    with pytest.raises(headscore.HeadscoreError, match="no task"):
        s.top_k(2, "nope")


def test_top_k_breaks_ties_in_head_order_as_the_report_does():
    from headscore.report.inputs import head_order

    values = torch.zeros(1, 4, 8, dtype=torch.float64)
    values[0, 3, 7], values[0, 2, 5:] = 2.0, 1.0  # a tie of three, then a tie of 29 zeros
    values[0, 1, 4] = math.nan
    s = headscore.HeadScores(values, torch.zeros_like(values), torch.tensor([2]), ["t"], "taylor", "m")
    got = [(layer, head) for layer, head, _ in s.top_k(8, "t")]
    assert got == [(3, 7), (2, 5), (2, 6), (2, 7), (0, 0), (0, 1), (0, 2), (0, 3)]
    ranked = head_order(values[0].flatten().numpy())
    assert got == [divmod(int(i), 8) for i in ranked[:8]]
    assert s.top_k(32, "t")[-1][:2] == (1, 4)  # NaN last


def test_accumulator_against_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 3, 2))
    tasks = rng.integers(0, 3, size=40)
    acc = TaskAccumulator(["a", "b", "c"], 3, 2)
    for start in range(0, 40, 7):  # uneven batches
        acc.add(torch.tensor(tasks[start:start + 7]), torch.tensor(values[start:start + 7], dtype=torch.float32))
    v32 = values.astype(np.float32).astype(np.float64)
    for t in range(3):
        sel = v32[tasks == t]
        np.testing.assert_allclose(acc.mean[t].numpy(), sel.mean(0), rtol=1e-12)
        np.testing.assert_allclose(acc.stderr[t].numpy(), sel.std(0, ddof=1) / np.sqrt(len(sel)), rtol=1e-9)
    other = TaskAccumulator(["a", "b", "c"], 3, 2)
    other.load_state_dict(acc.state_dict())
    other.merge(acc)
    np.testing.assert_allclose(other.mean.numpy(), acc.mean.numpy(), rtol=1e-12)
    assert torch.equal(other.count, 2 * acc.count)


def test_compare_against_scipy():
    a, b = _scores(seed=1), _scores(seed=2)
    b.values[0] = a.values[0] * 2 + 1  # same order in task 0
    table = headscore.compare(a, b, k=5)
    assert table["task 0"].spearman == pytest.approx(1.0) and table["task 0"].topk_overlap == 1.0
    x, y = a.values[2].flatten().numpy(), b.values[2].flatten().numpy()
    assert table["task 2"].spearman == pytest.approx(stats.spearmanr(x, y).statistic)
    assert table["task 2"].kendall == pytest.approx(stats.kendalltau(x, y).statistic)
    assert agreement(a.values[1], -a.values[1]).spearman == pytest.approx(-1.0)
    with pytest.raises(headscore.HeadscoreError):
        headscore.compare(a, _scores(layers=2))


def test_topk_overlap_counts_shared_heads():
    a = torch.arange(10.0)
    b = torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2, 10, 11])  # top-3 of b: 9, 8, 0; of a: 9, 8, 7
    assert topk_overlap(a, b, 3) == pytest.approx(2 / 3)


def _strict_json(text: str):
    """JSON as RFC 8259 and JavaScript's JSON.parse read it: NaN, Infinity and -Infinity are no JSON."""
    def refuse(token):
        raise AssertionError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def _nan_as_none(tensor: torch.Tensor) -> list:
    """The reference of a JSON export: the tensor's values with every non-finite one as None."""
    return np.where(np.isfinite(tensor.numpy()), tensor.numpy(), None).tolist()


def test_json_exports_write_non_finite_numbers_as_null():
    from headscore.edge_maps import EdgeMaps
    from headscore.edges.graph import EdgeGraph

    s = _scores()
    s.values[0, 1, 2] = float("nan")  # a head its layer does not have
    s.stderr[1] = float("nan")        # a task with one example
    graph = EdgeGraph(5, 4, 1)
    edges = torch.rand(3, *graph.allowed.shape, dtype=torch.float64).masked_fill(~graph.allowed, float("nan"))
    edge_stderr = edges.clone()
    edge_stderr[2] = float("inf")
    s = HeadScores(s.values, s.stderr, torch.tensor([3, 1, 5]), s.tasks, s.method, s.model, s.data_hash,
                   extra={"seconds": 1.5, "loss": float("-inf"), "nested": [[float("nan"), 2.0]]},
                   edge_maps=EdgeMaps(graph.upstream, graph.downstream, edges, edge_stderr))
    doc = _strict_json(s.export_bytes(".json").decode())
    assert doc["values"] == _nan_as_none(s.values) and doc["values"][0][1][2] is None
    assert doc["stderr"] == _nan_as_none(s.stderr) and doc["stderr"][1][0][0] is None
    assert doc["extra"] == {"seconds": 1.5, "loss": None, "nested": [[None, 2.0]]}
    assert doc["edges"]["values"] == _nan_as_none(edges) and doc["edges"]["stderr"] == _nan_as_none(edge_stderr)
    edge_doc = _strict_json(s.edge_export_bytes(".json").decode())
    assert edge_doc["values"] == _nan_as_none(edges) and edge_doc["stderr"][2][0][0] is None
    assert s.extra["loss"] == float("-inf")  # the scores themselves are left as they are


def test_json_bytes_reaches_as_deep_as_json():
    from headscore.results import json_bytes

    deep = json.loads("[" * 900 + "NaN" + "]" * 900)  # JSON (as Python reads it) nested 900 deep
    assert _strict_json(json_bytes(deep).decode()) == json.loads("[" * 900 + "null" + "]" * 900)


def _raw_scores_file(path, fields: dict) -> None:
    """A scores file holding ``fields`` as they are, written past HeadScores' own checks."""
    from headscore.checksum import checksummed

    meta = {"format": "headscore/1", "tasks": json.dumps(fields["tasks"]), "method": fields["method"],
            "model": fields["model"], "data_hash": "", "versions": "{}", "extra": "{}"}
    path.write_bytes(checksummed({k: fields[k] for k in ("values", "stderr", "counts")}, meta))


@pytest.mark.parametrize("change, message", [
    ({"tasks": ["a", "a"]}, "'tasks' must be distinct strings"),
    ({"counts": torch.tensor([-1, 3])}, "counts must not be negative, got -1"),
    ({"counts": torch.tensor([3.0, 3.0])}, "counts must be integers, one per task row, got torch.float32 [2]"),
    ({"values": torch.ones(2, 3, 4, dtype=torch.int64)}, "values must be a float [tasks, layers, heads] tensor"),
    ({"model": "m\ud800"}, "metadata 'model' holds a lone surrogate"),
    ({"method": "taylor\udfff"}, "metadata 'method' holds a lone surrogate"),
])
def test_what_can_be_built_can_be_saved_and_loaded(tmp_path, change, message):
    """Construction refuses what load refuses, with load's words: no HeadScores makes a file it cannot read."""
    g = torch.Generator().manual_seed(0)
    fields = {"values": torch.rand(2, 3, 4, generator=g, dtype=torch.float64),
              "stderr": torch.rand(2, 3, 4, generator=g, dtype=torch.float64),
              "counts": torch.tensor([3, 3]), "tasks": ["a", "b"], "method": "taylor", "model": "m"}
    good = HeadScores(**fields)
    assert torch.equal(HeadScores.load(good.save(tmp_path / "good.hs")).values, good.values)
    bad = {**fields, **change}
    with pytest.raises(ValueError) as built:
        HeadScores(**bad)
    assert message in str(built.value)
    if "\ud800" in bad["model"] or "\udfff" in bad["method"]:
        return  # no file can hold a lone surrogate (safetensors metadata is UTF-8)
    _raw_scores_file(tmp_path / "bad.hs", bad)
    with pytest.raises(headscore.HeadscoreError) as loaded:
        HeadScores.load(tmp_path / "bad.hs")
    assert str(loaded.value) == f"{tmp_path / 'bad.hs'}: broken scores file ({built.value})"


def test_select_and_provenance_are_checked_as_load_checks_them():
    s = _scores()
    with pytest.raises(ValueError, match="'tasks' must be distinct strings"):
        s.select(["task 0", "task 0"])
    for change, message in (({"extra": {"loss": torch.tensor(1.0)}}, "must hold JSON values only"),
                            ({"data_hash": None}, "'data_hash' must be a string, got NoneType"),
                            ({"extra": {"note": "x\ud800"}}, "metadata 'extra' holds a lone surrogate")):
        with pytest.raises(ValueError, match=message):
            HeadScores(s.values, s.stderr, s.counts, s.tasks, s.method, s.model, **{"data_hash": "", **change})


def test_accumulator_takes_an_empty_batch():
    rng = np.random.default_rng(0)
    values, tasks = rng.normal(size=(5, 2, 3)), np.array([0, 1, 1, 0, 1])
    for keep in (False, True):
        acc = TaskAccumulator(["a", "b"], 2, 3, keep_examples=keep)
        acc.add(torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, 3))
        acc.add(torch.tensor(tasks), torch.tensor(values))
        acc.add(torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, 3), torch.zeros(0, dtype=torch.long))
        assert acc.count.tolist() == [2, 3]
        for t in range(2):
            np.testing.assert_allclose(acc.mean[t].numpy(), values[tasks == t].mean(0), rtol=1e-12)
        if keep:
            kept, kept_tasks = acc.examples
            np.testing.assert_allclose(kept.numpy(), values.astype(np.float32))
            assert kept_tasks.tolist() == tasks.tolist()


@pytest.mark.parametrize("k", [0, -2, 1.5, True, None])
def test_k_must_be_a_whole_number_of_at_least_one(k):
    from headscore.compare import compare_edges, compare_positions
    from headscore.intervals import agreement_table

    a, b = _scores(seed=1), _scores(seed=2)
    for name, call in (("compare", lambda: headscore.compare(a, b, k=k)),
                       ("agreement_table", lambda: agreement_table(a, b, k)),
                       ("agreement", lambda: agreement(a.values[0], b.values[0], k)),
                       ("topk_overlap", lambda: topk_overlap(a.values[0], b.values[0], k)),
                       ("compare_edges", lambda: compare_edges(a, b, k)),
                       ("compare_positions", lambda: compare_positions(a, b, k))):
        with pytest.raises(headscore.HeadscoreError) as err:
            call()
        assert str(err.value) == f"{name} needs k >= 1 (a whole number), got {k!r}"


def test_agreement_with_a_map_without_values_is_nan(recwarn):
    """A task with no examples (all NaN in one file): no top-k overlap either (its top k would be arbitrary)."""
    a, b = _scores(seed=1), _scores(seed=2)
    b.values[1] = float("nan")
    b.counts[1] = 0
    table = headscore.compare(a, b, k=10)
    assert all(np.isnan([table["task 1"].spearman, table["task 1"].kendall, table["task 1"].topk_overlap]))
    x, y = a.values[0].flatten().numpy(), b.values[0].flatten().numpy()
    assert table["task 0"].kendall == pytest.approx(stats.kendalltau(x, y).statistic)
    assert table["task 0"].topk_overlap == len(set(np.argsort(-x)[:10]) & set(np.argsort(-y)[:10])) / 10
    assert np.isnan(topk_overlap(torch.full((3, 4), float("nan")), a.values[0], 5))
    assert np.isnan(topk_overlap(a.values[0], torch.full((3, 4), float("nan")), 5))
    assert np.isnan(topk_overlap(torch.zeros(0), torch.zeros(0), 5))  # no heads at all (no division by zero)
    assert not recwarn.list  # scipy's "sample too small" warning is not passed on


def test_topk_overlap_and_ranks_break_ties_as_top_k():
    """Tied heads, NaN and -inf: the top-k overlap counts the heads top_k lists (torch.topk's order of ties is
    its own: two maps with the same top_k lists overlapped 0.0), and the frames' rank follows top_k."""
    tied = torch.zeros(2, 4)
    tied[0, 0], tied[0, 1] = 3.0, 2.0
    other = tied.clone()
    other[1, 3] = 0.0  # the same map
    assert topk_overlap(tied, other, 2) == 1.0
    assert topk_overlap(torch.zeros(2, 8), torch.zeros(2, 8), 3) == 1.0  # all tied: the first three heads
    values = torch.tensor([[[math.nan, -math.inf, 1.0]]], dtype=torch.float64)
    s = HeadScores(values, torch.zeros_like(values), torch.tensor([2]), ["t"], "taylor", "m")
    assert [(layer, head) for layer, head, _ in s.top_k(3, "t")] == [(0, 2), (0, 1), (0, 0)]  # NaN after -inf
    pytest.importorskip("pandas")
    assert s.to_pandas()["rank"].tolist() == [3, 2, 1]


def test_extra_keys_storage_and_gradients(tmp_path):
    """What is built saves and loads back the same: extra's keys must be text (JSON writes 1 as '1', and 1 and
    '1' merged); values and stderr may be one tensor (safetensors refused shared memory); values that track
    gradients convert to a frame."""
    s = _scores()
    with pytest.raises(ValueError, match="'extra' and 'versions' must have text keys only, got int 1"):
        HeadScores(s.values, s.stderr, s.counts, s.tasks, s.method, s.model, extra={1: "a", "1": "b"})
    with pytest.raises(ValueError, match="text keys only"):
        HeadScores(s.values, s.stderr, s.counts, s.tasks, s.method, s.model, extra={"a": [{2: "x"}]})
    same = HeadScores(s.values, s.values, s.counts, s.tasks, s.method, s.model)
    loaded = HeadScores.load(same.save(tmp_path / "same.hs"))
    assert torch.equal(loaded.values, s.values) and torch.equal(loaded.stderr, s.values)
    tracked = HeadScores(s.values.clone().requires_grad_(True), s.stderr, s.counts, s.tasks, s.method, s.model)
    pytest.importorskip("pandas")
    assert tracked.to_pandas()["score"].tolist() == s.to_pandas()["score"].tolist()
