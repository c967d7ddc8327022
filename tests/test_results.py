"""HeadScores files, exports, accumulators and compare()."""

import json

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
    acc.add(torch.zeros(1, dtype=torch.long), torch.randn(1, 2, 3))  # 9 * 6 = 54 values > 50
    assert acc.examples is None and int(acc.count[0]) == 9


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
