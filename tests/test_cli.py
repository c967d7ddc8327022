"""The command line: bad input gets one clear line, exit code 2, and no output file."""

import json

import pytest

from headscore.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "The capital of France is", "target": " Paris", "task": "Knowledge Recall"})


@pytest.mark.parametrize("content,message", [
    ([GOOD, "{not json"], ":2: malformed JSON"),
    ([GOOD, json.dumps({"prompt": "x", "task": "t"})], ":2: missing field(s) target"),
    ([json.dumps({"prompt": "x", "target": "  ", "task": "t"})], ":1: empty target"),
    ([json.dumps({"prompt": "x", "target": "y", "task": ""})], ":1: empty task"),
    ([json.dumps({"prompt": 3, "target": "y", "task": "t"})], ":1: field 'prompt' must be a string"),
    ([json.dumps(["a", "b"])], ":1: expected a JSON object"),
    ([], "no examples"),
])
def test_bad_jsonl(tmp_path, capsys, content, message):
    data = write(tmp_path / "tasks.jsonl", content)
    out = tmp_path / "scores.hs"
    code, _, err = run(capsys, "score", "--tasks", str(data), "--out", str(out), "--model", "no-such-model")
    assert code == 2
    assert message in err and err.startswith("headscore: error:") and err.count("\n") == 1
    assert not out.exists()


def test_missing_file(tmp_path, capsys):
    code, _, err = run(capsys, "score", "--tasks", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "s.hs"))
    assert code == 2 and "no such file" in err


def test_unknown_model(tmp_path, capsys):
    data = write(tmp_path / "tasks.jsonl", [GOOD])
    code, _, err = run(capsys, "score", "--tasks", str(data), "--out", str(tmp_path / "s.hs"),
                       "--model", "nobody/no-such-model-xyz")
    assert code == 2 and "unknown model 'nobody/no-such-model-xyz'" in err
    assert not (tmp_path / "s.hs").exists()


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--export", "x.txt"], "needs a .csv or .json"),
    (["--device", "cuda:7"], "device 'cuda:7' is not available"),
])
def test_bad_options(tmp_path, capsys, argv, message):
    data = write(tmp_path / "tasks.jsonl", [GOOD])
    code, _, err = run(capsys, "score", "--tasks", str(data), "--out", str(tmp_path / "s.hs"), *argv)
    assert code == 2 and message in err


def test_output_directory_must_exist(tmp_path, capsys):
    code, _, err = run(capsys, "score", "--out", str(tmp_path / "missing" / "s.hs"))
    assert code == 2 and "does not exist" in err


def test_ablate_heads_syntax(tmp_path, capsys):
    code, _, err = run(capsys, "ablate", "--heads", "3-4")
    assert code == 2 and "'3-4' is not LAYER.HEAD" in err


def test_compare_and_report_reject_non_scores_files(tmp_path, capsys):
    bad = tmp_path / "x.hs"
    bad.write_text("hello")
    assert run(capsys, "compare", str(bad), str(bad))[0] == 2
    code, _, err = run(capsys, "report", str(bad), "--out", str(tmp_path / "r"))
    assert code == 2 and "not a headscore scores file" in err


def test_argparse_errors_exit_2_with_one_line(capsys):
    assert main(["score", "--method", "bogus", "--out", "x.hs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("headscore: error: argument --method: invalid choice") and err.count("\n") == 1
