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


def _scores_file(path, *, values=None, counts=(5, 5), extra=None, edges=None):
    """A scores file of tasks a and b on 3 layers x 4 heads (``values`` default: random)."""
    import torch

    from headscore.results import HeadScores

    g = torch.Generator().manual_seed(len(str(path)))
    if values is None:
        values = torch.rand(2, 3, 4, generator=g, dtype=torch.float64)
    HeadScores(values, torch.rand(values.shape, generator=g, dtype=torch.float64), torch.tensor(counts), ["a", "b"],
               "taylor", "m", extra=extra or {}, edge_maps=edges).save(path)
    return str(path)


def _strict_json(path):
    """The file read as RFC 8259 JSON (JavaScript's JSON.parse): a bare NaN or Infinity fails."""
    def refuse(token):
        raise AssertionError(f"{path} is not JSON: {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_compare_json_writes_undefined_figures_as_null(tmp_path, capsys):
    import torch

    ok = _scores_file(tmp_path / "ok.hs")
    empty_b = torch.rand(2, 3, 4, dtype=torch.float64)
    empty_b[1] = float("nan")  # task b: no examples
    nan_task = _scores_file(tmp_path / "nan.hs", values=empty_b, counts=(5, 0))
    code, out, err = run(capsys, "compare", ok, nan_task, "--resamples", "0", "--json", str(tmp_path / "t.json"))
    assert code == 0 and err == "", err
    doc = _strict_json(tmp_path / "t.json")
    assert doc["b"] == {"spearman": None, "kendall": None, "topk_overlap": None, "k": 10}
    assert doc["a"]["topk_overlap"] is not None
    assert out.splitlines()[-1].split() == ["b", "n/a", "nan", "n/a"]  # n/a, not a top-10 overlap of 0.90


def test_compare_json_of_edge_scores_writes_undefined_figures_as_null(tmp_path, capsys):
    import torch

    from headscore.edge_maps import EdgeMaps
    from headscore.edges.graph import EdgeGraph

    graph = EdgeGraph(3, 4, 1)
    nan = torch.full((2, 3, 4), float("nan"), dtype=torch.float64)  # exact edge patching: edges only
    files = []
    for name, fill in (("x", None), ("y", 1.0)):
        edges = torch.rand(2, *graph.allowed.shape, dtype=torch.float64)
        if fill is not None:
            edges[0] = fill  # constant in task a: no rank correlation
        edges = edges.masked_fill(~graph.allowed, float("nan"))
        files.append(_scores_file(tmp_path / f"{name}.hs", values=nan,
                                  edges=EdgeMaps(graph.upstream, graph.downstream, edges, edges.clone())))
    code, _, err = run(capsys, "compare", *files, "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    doc = _strict_json(tmp_path / "e.json")["_edges"]
    assert doc["a"]["spearman"] is None and doc["a"]["kendall"] is None and doc["b"]["spearman"] is not None


def test_report_refuses_infinite_scores_naming_the_file(tmp_path, capsys):
    import torch

    ok = _scores_file(tmp_path / "ok.hs")
    values = torch.rand(2, 3, 4, dtype=torch.float64)
    values[0, 1, 2] = float("inf")
    inf = _scores_file(tmp_path / "inf.hs", values=values)
    for argv in ([inf], [ok, "--ablation", inf], [ok, "--compare", inf]):
        code, _, err = run(capsys, "report", *argv, "--out", str(tmp_path / "r"))
        assert code == 2 and err == (f"headscore: error: {inf}: head L1.H2 of task 'a' has the score inf; scores "
                                     "must be finite (NaN only marks a head its layer does not have)\n"), err
        assert not (tmp_path / "r").exists()


def test_compare_takes_a_metric_that_is_not_text(tmp_path, capsys):
    a = _scores_file(tmp_path / "a.hs", extra={"metric": ["nll"]})
    b = _scores_file(tmp_path / "b.hs", extra={"metric": {"name": "prob"}})
    code, out, err = run(capsys, "compare", a, b, "--resamples", "0")
    assert code == 0, err
    assert "note: the files measure different metrics (A ['nll'] vs B {'name': 'prob'})" in out
    code, out, err = run(capsys, "compare", b, a, "--resamples", "0")  # in the order given
    assert code == 0 and "(A {'name': 'prob'} vs B ['nll'])" in out, err
    code, out, err = run(capsys, "report", a, "--ablation", b, "--out", str(tmp_path / "rep"), "--resamples", "0")
    assert code == 0, err
    assert (tmp_path / "rep" / "scatter.png").is_file()
