"""HeadScores as pandas DataFrames and back (issue 26): every row checked against the tensors one cell at a time, ranks
against a sort written here, and ``from_pandas(to_pandas(s))`` equal to ``s``."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import headscore
from headscore.errors import HeadscoreError
from headscore.results import HeadScores

pd = pytest.importorskip("pandas")

TASKS = ["geo", "math", "caf\u00e9"]


def synthetic(*, exact: bool = True, nan_head: bool = False, positions: bool = False, examples: bool = False,
              seed: int = 0) -> HeadScores:
    g = torch.Generator().manual_seed(seed)
    t, num_layers, num_heads, p, n = len(TASKS), 3, 4, 2, 5
    values = torch.randn(t, num_layers, num_heads, generator=g, dtype=torch.float64)
    values[1, 0, 0] = values[1, 2, 3]  # a tie: ranks go in (layer, head) order
    if nan_head:
        values[:, 2, 3] = float("nan")  # a head the last layer does not have
    pos = {}
    if positions:
        pos = {"positions": ["end-1", "end"],
               "position_values": torch.randn(t, num_layers, num_heads, p, generator=g, dtype=torch.float64),
               "position_stderr": torch.rand(t, num_layers, num_heads, p, generator=g, dtype=torch.float64),
               "position_counts": torch.tensor([[2, 3], [1, 4], [0, 5]])}
    ex = {}
    if examples:
        ex = {"example_values": torch.randn(n, num_layers, num_heads, generator=g),
              "example_tasks": torch.tensor([0, 1, 0, 2, 1])}
    return HeadScores(values, torch.rand(t, num_layers, num_heads, generator=g, dtype=torch.float64),
                      torch.tensor([4, 7, 1]), list(TASKS), "taylor", "tiny", "abc123",
                      exact=(torch.rand(t, num_layers, num_heads, generator=g) < 0.3) if exact else None, **ex, **pos)


def reference_ranks(values: list[float]) -> list[int]:
    """1 = largest; ties by position; NaN last (the order of top_k)."""
    order = sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), -values[i] if not
                                                       math.isnan(values[i]) else 0.0, i))
    ranks = [0] * len(values)
    for r, i in enumerate(order, 1):
        ranks[i] = r
    return ranks


def test_heads_frame_row_by_row():
    s = synthetic(nan_head=True)
    df = s.to_pandas()
    assert list(df.columns) == ["task", "layer", "head", "score", "stderr", "count", "rank", "exact"]
    assert len(df) == 3 * 3 * 4 and df.attrs == {"method": "taylor", "model": "tiny", "data_hash": "abc123"}
    for row in df.itertuples(index=False):
        t = TASKS.index(row.task)
        value = float(s.values[t, row.layer, row.head])
        assert (math.isnan(row.score) and math.isnan(value)) or row.score == value
        assert row.stderr == float(s.stderr[t, row.layer, row.head]) and row.count == int(s.counts[t])
        assert row.exact == bool(s.exact[t, row.layer, row.head])
    for t, task in enumerate(TASKS):
        part = df[df.task == task]
        want = reference_ranks(s.values[t].flatten().tolist())
        assert part["rank"].tolist() == want
        top = part[part["rank"] == 1].iloc[0]
        assert s.top_k(1, task)[0][:2] == (top["layer"], top["head"])
    assert "exact" not in synthetic(exact=False).to_pandas().columns


@pytest.mark.parametrize("nan_head", [False, True])
def test_from_pandas_of_to_pandas_is_the_same_scores(nan_head):
    s = synthetic(nan_head=nan_head)
    back = HeadScores.from_pandas(s.to_pandas())
    if nan_head:  # NaN != NaN: compare the bits
        assert torch.equal(back.values.view(torch.int64), s.values.view(torch.int64))
    else:
        assert torch.equal(back.values, s.values)
    assert torch.equal(back.stderr, s.stderr) and torch.equal(back.counts, s.counts)
    assert torch.equal(back.exact, s.exact) and back.tasks == s.tasks
    assert (back.method, back.model, back.data_hash) == ("taylor", "tiny", "abc123")
    shuffled = s.to_pandas().sample(frac=1.0, random_state=0)  # the order of the rows does not matter
    shuffled.attrs = {}
    again = HeadScores.from_pandas(shuffled, method="ablation-zero", model="m")
    assert again.tasks != s.tasks and sorted(again.tasks) == sorted(s.tasks)  # in order of first appearance
    again = again.select(s.tasks)
    assert torch.equal(again.stderr, s.stderr) and torch.equal(again.exact, s.exact)
    assert again.method == "ablation-zero" and again.model == "m"


def test_from_pandas_of_a_hand_made_frame():
    df = pd.DataFrame({"task": ["a", "a", "b", "b"], "layer": [0, 0, 0, 0], "head": [1, 0, 0, 1],
                       "score": [2.0, 1.0, 3.0, 4.0]})
    s = HeadScores.from_pandas(df, method="mine", model="m")
    assert torch.equal(s.values, torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]], dtype=torch.float64))
    assert s.tasks == ["a", "b"] and s.counts.tolist() == [0, 0] and bool(s.stderr.isnan().all()) and s.exact is None
    with pytest.raises(HeadscoreError, match=r"from_pandas needs method= \(the frame's attrs do not say\)"):
        HeadScores.from_pandas(df)


@pytest.mark.parametrize("change,words", [
    (lambda df: df.drop(index=5), "from_pandas: task 'geo' has no row for layer 1, head 1"),
    (lambda df: pd.concat([df, df.iloc[[0]]]), "task 'geo' has 2 rows for layer 0, head 0"),
    (lambda df: df.assign(count=range(len(df))), "from_pandas: task 'geo' has counts 0, 1, 2"),
    (lambda df: df.drop(columns="score"), "from_pandas: the frame has no column 'score'"),
    (lambda df: df.assign(layer=df.layer - 1), "column 'layer' must hold whole numbers >= 0"),
    (lambda df: df.assign(position="end"), "from_pandas reads a frame of to_pandas('heads')"),
    (lambda df: df.assign(exact=None), "column 'exact' must hold True or False"),
])
def test_from_pandas_refuses_a_broken_frame(change, words):
    with pytest.raises(HeadscoreError) as info:
        HeadScores.from_pandas(change(synthetic().to_pandas()))
    assert words in str(info.value)


def test_positions_and_examples_frames():
    s = synthetic(positions=True, examples=True)
    df = s.to_pandas("positions")
    assert list(df.columns) == ["task", "layer", "head", "position", "score", "stderr", "count", "rank"]
    assert len(df) == 3 * 3 * 4 * 2
    for row in df.itertuples(index=False):
        t, p = TASKS.index(row.task), s.positions.index(row.position)
        assert row.score == float(s.position_values[t, row.layer, row.head, p])
        assert row.stderr == float(s.position_stderr[t, row.layer, row.head, p])
        assert row.count == int(s.position_counts[t, p])
    for (task, position), part in df.groupby(["task", "position"], sort=False):
        assert part["rank"].tolist() == reference_ranks(part["score"].tolist()), (task, position)
    ex = s.to_pandas("examples")
    assert list(ex.columns) == ["example", "task", "layer", "head", "score", "rank"] and len(ex) == 5 * 12
    for row in ex.itertuples(index=False):
        assert row.task == TASKS[int(s.example_tasks[row.example])]
        assert row.score == float(s.example_values[row.example, row.layer, row.head])
    plain = synthetic()
    with pytest.raises(HeadscoreError, match="no per-position maps"):
        plain.to_pandas("positions")
    with pytest.raises(HeadscoreError, match="keep no per-example values"):
        plain.to_pandas("examples")
    with pytest.raises(HeadscoreError, match="unknown kind 'cells'; choose one of heads, positions, examples"):
        plain.to_pandas("cells")


def test_without_pandas_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(HeadscoreError, match=r"^to_pandas needs pandas: pip install 'headscore\[notebook\]'$"):
        synthetic().to_pandas()


def test_compare_is_a_dict_that_shows_as_a_table():
    a, b = synthetic(seed=1), synthetic(seed=2)
    result = headscore.compare(a, b, k=3)
    assert type(result) is not dict and isinstance(result, dict) and list(result) == TASKS
    html = result._repr_html_()
    assert html.count("<tr>") == 1 + len(TASKS) and "caf\u00e9" in html
    for agreement in result.values():
        assert f"{agreement.spearman:.4g}" in html and f"{agreement.kendall:.4g}" in html
    df = result.to_pandas()
    assert df["task"].tolist() == TASKS and df["spearman"].tolist() == [x.spearman for x in result.values()]
