"""The CLI on the embedded SmolLM2-135M model, and the README's Python example."""

import re
from pathlib import Path

import pytest
import torch

import headscore
from headscore.cli import main

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"


def test_cli_score_ablate_compare_report(tmp_path, capsys):
    scores, truth, report = tmp_path / "taylor.hs", tmp_path / "ablation.hs", tmp_path / "report"
    common = ["--max-examples", "1", "--no-progress"]
    assert main(["score", "--out", str(scores), "--export", str(tmp_path / "taylor.csv"), *common]) == 0
    assert main(["ablate", "--out", str(truth), "--batch-size", "8", *common]) == 0
    assert main(["compare", str(scores), str(truth)]) == 0
    assert main(["report", str(scores), "--ablation", str(truth), "--out", str(report)]) == 0
    out = capsys.readouterr().out
    s, t = headscore.HeadScores.load(scores), headscore.HeadScores.load(truth)
    assert s.values.shape == t.values.shape == (8, 30, 9)
    assert s.counts.tolist() == [1] * 8 and s.method == "taylor" and t.method == "ablation-zero"
    assert s.data_hash == t.data_hash
    rho = [float(x) for x in re.findall(r"^\S.*?\s(-?\d\.\d{3})\s+-?\d\.\d{3}\s+\d\.\d{2}$", out, re.M)]
    assert len(rho) == 8 and sum(rho) / 8 > 0.3, out  # one example per task: noisy, but clearly related
    for name in ("heatmaps.png", "heatmaps.pdf", "scatter.png", "summary.md"):
        assert (report / name).stat().st_size > 1000
    assert (tmp_path / "taylor.csv").read_text().count("\n") == 1 + 8 * 270


def test_readme_python_example(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["scores"], headscore.HeadScores)
    assert headscore.HeadScores.load(tmp_path / "scores.hs").values.shape == (2, 30, 9)
    assert torch.isfinite(namespace["truth"].values).all()
