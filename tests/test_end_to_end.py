"""The CLI on the embedded SmolLM2-135M model, and the README's Python example."""

import json
import re
from pathlib import Path

import pytest
import torch

import headscore
import headscore.data.examples
from headscore.cli import main

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"


SHORT = [("The capital of France is", " Paris", "Knowledge Recall"),
         ("The capital of Italy is", " Rome", "Knowledge Recall"),
         ("3 + 4 =", " 7", "Math Calculation"), ("2 + 2 =", " 4", "Math Calculation")]


def test_cli_on_the_builtin_suite(tmp_path, capsys):
    scores = tmp_path / "taylor.hs"
    assert main(["score", "--max-examples", "1", "--no-progress", "--out", str(scores),
                 "--export", str(tmp_path / "taylor.csv")]) == 0
    s = headscore.HeadScores.load(scores)
    assert s.values.shape == (8, 30, 9) and s.counts.tolist() == [1] * 8 and s.method == "taylor"
    assert (tmp_path / "taylor.csv").read_text().count("\n") == 1 + 8 * 270
    assert main(["report", str(scores), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "heatmaps.png").stat().st_size > 10_000


def test_cli_score_ablate_compare_report(tmp_path, capsys):
    data = tmp_path / "short.jsonl"
    headscore.data.examples.save_jsonl([headscore.Example(*row) for row in SHORT], data)
    scores, truth, report = tmp_path / "taylor.hs", tmp_path / "ablation.hs", tmp_path / "report"
    common = ["--tasks", str(data), "--no-progress"]
    assert main(["score", "--out", str(scores), *common]) == 0
    assert main(["ablate", "--out", str(truth), *common]) == 0
    capsys.readouterr()
    assert main(["compare", str(scores), str(truth), "--resamples", "200"]) == 0  # 2 examples per task: at 95%,
    assert ("no interval for Knowledge Recall (A 2, B 2), Math Calculation (A 2, B 2): a 95% bootstrap interval "
            "needs at least 6 examples of a task in each file") in capsys.readouterr().out  # none
    assert main(["compare", str(scores), str(truth), "--json", str(tmp_path / "agree.json"), "--resamples",
                 "200", "--level", "0.5"]) == 0  # what 2 examples can hold
    out = capsys.readouterr().out
    assert "50% bootstrap intervals over examples (200 resamples, seed 0; paired: same examples)" in out
    assert main(["report", str(scores), "--ablation", str(truth), "--out", str(report)]) == 0
    s, t = headscore.HeadScores.load(scores), headscore.HeadScores.load(truth)
    assert s.values.shape == t.values.shape == (2, 30, 9) and t.method == "ablation-zero"
    assert s.data_hash == t.data_hash
    table = json.loads((tmp_path / "agree.json").read_text())
    rho = [row["spearman"] for row in table.values()]
    assert len(rho) == 2 and min(rho) > 0.5, out  # measured 0.82 and 0.87 on this data
    for row in table.values():
        low, high = row["spearman_ci"]
        assert -1 <= low <= high <= 1 and row["paired"] and row["resamples"] == 200
        assert f"{row['spearman']:.3f} [{low:.3f}, {high:.3f}]" in out
    for name in ("heatmaps.png", "heatmaps.pdf", "scatter.png", "summary.md"):
        assert (report / name).stat().st_size > 1000


def test_readme_python_example(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["scores"], headscore.HeadScores)
    assert headscore.HeadScores.load(tmp_path / "scores.hs").values.shape == (2, 30, 9)
    assert torch.isfinite(namespace["truth"].values).all()
