"""The command line with counterfactual examples: score/ablate --metric --baseline corrupt --per-position end to end
on a tiny saved model, and one line with exit code 2 for each kind of bad input."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_saved import save_tiny_model

from headscore.cli import main
from headscore.results import HeadScores

ROWS = [
    {"prompt": "When Ann and Bob went out, Bob gave it to ", "target": "Ann", "foil": "Bob", "task": "ioi",
     "corrupt": "When Cal and Dee went out, Eve gave it to "},
    {"prompt": "When Bob and Ann went out, Bob gave it to ", "target": "Ann", "foil": "Bob", "task": "ioi",
     "corrupt": "When Dee and Cal went out, Eve gave it to "},
    {"prompt": "Then Fay and Gus sat, Gus read to ", "target": "Fay", "foil": "Gus", "task": "short",
     "corrupt": "Then Hal and Ivy sat, Jon read to "},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_score_and_ablate_with_a_metric_and_the_corrupt_baseline(tmp_path, capsys, model_dir):
    data = write(tmp_path / "pairs.jsonl", ROWS)
    common = ["--tasks", data, "--model", model_dir, "--metric", "logit-diff", "--baseline", "corrupt",
              "--per-position", "--no-progress"]
    code, _, err = run(capsys, "score", *common, "--out", tmp_path / "s.hs")
    assert code == 0, err
    assert "aligned at their last token" in err  # the two tasks' prompts differ in length
    code, _, err = run(capsys, "ablate", *common, "--out", tmp_path / "a.hs")
    assert code == 0, err
    s, a = HeadScores.load(tmp_path / "s.hs"), HeadScores.load(tmp_path / "a.hs")
    assert (s.method, a.method) == ("atp-corrupt", "ablation-corrupt")
    assert s.extra["metric"] == a.extra["metric"] == "logit-diff"
    assert s.positions == a.positions and "end" in s.positions
    assert torch.allclose(s.position_values.sum(-1), s.values, atol=1e-5)
    code, out, err = run(capsys, "compare", tmp_path / "s.hs", tmp_path / "a.hs", "--misses", "2",
                         "--resamples", "0")
    assert code == 0, err
    assert "per (head, position)" in out and "largest |A - B|" in out
    code, _, err = run(capsys, "report", tmp_path / "s.hs", "--out", tmp_path / "report")
    assert code == 0, err
    assert (tmp_path / "report" / "positions.png").stat().st_size > 10_000
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "**Metric:** logit-diff (a positive score: drop in logit difference" in summary


def _edit(index: int, **changes):
    rows = [dict(r) for r in ROWS]
    rows[index].update(changes)
    return [{k: v for k, v in r.items() if v is not None} for r in rows]


@pytest.mark.parametrize("rows,argv,message", [
    (_edit(1, corrupt="When Dee and Cal went out, Eve gave it to me "), ["--baseline", "corrupt"],
     ":2 (ioi): the corrupted prompt has"),
    (_edit(0, foil="Ann"), [], ":1: foil 'Ann' equals the target"),
    (_edit(2, foil=None), ["--metric", "logit-diff"], "the logit-diff metric needs a 'foil' field in every example; "),
    (_edit(0, corrupt=None), ["--baseline", "corrupt"], "baseline 'corrupt' needs a 'corrupt' field"),
    (_edit(0, foil=3), [], ":1: field 'foil' must be a string"),
    (ROWS, ["--per-position", "--checkpoint-every", "1"], "--per-position supports neither"),
    (ROWS, ["--method", "probe", "--metric", "prob"], "--method probe takes no"),
    (ROWS, ["--method", "curvature", "--per-position"], "--method curvature has no per-position maps"),
    (ROWS, ["--method", "abs", "--per-position"], "--method abs has no per-position maps"),
    (ROWS, ["--method", "fisher", "--per-position"], "--method fisher has no per-position maps"),
])
def test_bad_counterfactual_input_one_line_exit_2(tmp_path, capsys, model_dir, rows, argv, message):
    data = write(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "s.hs"
    code, _, err = run(capsys, "score", "--tasks", data, "--model", model_dir, "--out", out, "--no-progress", *argv)
    assert code == 2, err
    assert message in err and err.startswith("headscore: error:") and err.count("\n") == 1, err
    assert not out.exists()


def test_ablate_refuses_per_position_with_a_head_set(tmp_path, capsys, model_dir):
    data = write(tmp_path / "pairs.jsonl", ROWS)
    code, _, err = run(capsys, "ablate", "--tasks", data, "--model", model_dir, "--heads", "0.1", "--per-position")
    assert code == 2 and "does not go with --heads" in err and err.count("\n") == 1


def test_ablate_heads_writes_a_strict_json_table_and_takes_the_printed_head_names(tmp_path, capsys, model_dir):
    from headscore.cli.scoring import parse_heads

    assert parse_heads("L1.H2, 0.3") == [(1, 2), (0, 3)]
    data = write(tmp_path / "pairs.jsonl", ROWS[:2])
    code, _, err = run(capsys, "ablate", "--tasks", data, "--model", model_dir, "--heads", "L0.H1",
                       "--out", tmp_path / "h.hs", "--no-progress")
    assert code == 2 and "give it a .json name" in err and not (tmp_path / "h.hs").exists()
    code, _, err = run(capsys, "ablate", "--tasks", data, "--model", model_dir, "--heads", "L0.H1,1.2",
                       "--out", tmp_path / "h.json", "--no-progress")
    assert code == 0, err
    text = (tmp_path / "h.json").read_text()
    table = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert all(set(e) >= {"delta", "stderr", "count"} for e in table.values())
