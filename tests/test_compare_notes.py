"""``headscore compare`` says what the numbers are: files made under different baselines or metrics are noted
(text and ``--json``), intervals are shown only from enough examples to hold their level, and an output
directory's missing parent is refused before any work, as ``score --out`` refuses it."""

import json
import math

import pytest
import torch

from headscore.cli import main
from headscore.results import HeadScores

TASKS = ["a", "b"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def scores_file(path, *, method="taylor", extra=None, examples=(8, 8), seed=0, data_hash="h"):
    """A scores file of tasks a and b on 3 layers x 4 heads that kept ``examples[i]`` per-example values of task i;
    its values are their means, as a real run's are."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(examples)])
    per_example = torch.rand(len(labels), 3, 4, generator=g, dtype=torch.float64)
    values = torch.stack([per_example[labels == i].mean(0) for i in range(len(examples))])
    HeadScores(values, torch.zeros_like(values), torch.tensor(examples), list(TASKS), method, "m", data_hash,
               extra=extra or {}, example_values=per_example.float(), example_tasks=labels).save(path)
    return path


# -- different baselines and metrics are noted ------------------------------------------------------------------


@pytest.mark.parametrize("method,extra,want", [
    ("taylor", {"baseline": "zero"}, "zero"),
    ("atp-mean", {"baseline": "mean"}, "mean"),
    ("atp-corrupt", {"baseline": "corrupt"}, "corrupt"),
    ("ablation-zero", {}, "zero"),            # ablate records its baseline in the method name only
    ("ablation-mean", {}, "mean"),
    ("ablation-corrupt", {}, "corrupt"),
    ("abs-corrupt", {}, "corrupt"),
    ("ig-inputs-corrupt", {}, "corrupt"),
    ("taylor", {}, None),                     # an older file that does not say
    ("probe", {}, None),
    ("nnsight-attribution", {}, None),
])
def test_baseline_of_reads_the_provenance_then_the_method_name(tmp_path, method, extra, want):
    from headscore.compare import baseline_of

    path = scores_file(tmp_path / "s.hs", method=method, extra=extra, examples=(1, 1))
    assert baseline_of(HeadScores.load(path)) == want


def test_compare_notes_different_baselines_in_text_and_json(tmp_path, capsys):
    zero = scores_file(tmp_path / "zero.hs", extra={"baseline": "zero", "metric": "nll"}, seed=1)
    mean = scores_file(tmp_path / "mean.hs", method="ablation-mean", extra={"metric": "nll"}, seed=2)
    corrupt = scores_file(tmp_path / "corrupt.hs", method="atp-corrupt", extra={"baseline": "corrupt"}, seed=3)
    code, out, err = run(capsys, "compare", zero, mean, "--resamples", "0", "--json", tmp_path / "zm.json")
    assert code == 0 and err == "", err
    assert "note: the files use different baselines (A zero vs B mean)" in out
    doc = json.loads((tmp_path / "zm.json").read_text())
    assert doc["_differences"] == {"baseline": {"A": "zero", "B": "mean"}}
    assert doc["a"]["spearman"] is not None  # the comparison itself runs: a note, not a refusal
    code, out, _ = run(capsys, "compare", corrupt, zero, "--resamples", "0")  # in the order given
    assert code == 0 and "note: the files use different baselines (A corrupt vs B zero)" in out
    same = scores_file(tmp_path / "abl0.hs", method="ablation-zero", seed=4)
    code, out, _ = run(capsys, "compare", zero, same, "--resamples", "0", "--json", tmp_path / "same.json")
    assert code == 0 and "note:" not in out
    assert "_differences" not in json.loads((tmp_path / "same.json").read_text())


def test_compare_json_notes_different_metrics(tmp_path, capsys):
    a = scores_file(tmp_path / "a.hs", extra={"metric": "nll", "baseline": "corrupt"}, seed=1)
    b = scores_file(tmp_path / "b.hs", method="ablation-corrupt", extra={"metric": "logit-diff"}, seed=2)
    code, out, err = run(capsys, "compare", a, b, "--resamples", "0", "--json", tmp_path / "t.json")
    assert code == 0 and err == "", err
    assert "note: the files measure different metrics (A nll vs B logit-diff)" in out and "baselines" not in out
    assert json.loads((tmp_path / "t.json").read_text())["_differences"] == {
        "metric": {"A": "nll", "B": "logit-diff"}}


def test_compare_of_edge_patching_notes_different_baselines(tmp_path, capsys):
    """Exact edge patching files hold edges only; their comparison notes the baselines as well."""
    from headscore.edge_maps import EdgeMaps
    from headscore.edges.graph import EdgeGraph

    graph = EdgeGraph(3, 4, 1)
    nan = torch.full((2, 3, 4), float("nan"), dtype=torch.float64)
    files = []
    for name, baseline in (("x", "zero"), ("y", "mean")):
        edges = torch.rand(2, *graph.allowed.shape, dtype=torch.float64).masked_fill(~graph.allowed, float("nan"))
        HeadScores(nan, nan.clone(), torch.tensor([5, 5]), list(TASKS), f"edge-patching-{baseline}", "m",
                   extra={"baseline": baseline},
                   edge_maps=EdgeMaps(graph.upstream, graph.downstream, edges, edges.clone())).save(tmp_path / name)
        files.append(tmp_path / name)
    code, out, err = run(capsys, "compare", *files, "--json", tmp_path / "e.json")
    assert code == 0, err
    assert "note: the files use different baselines (A zero vs B mean)" in out
    assert json.loads((tmp_path / "e.json").read_text())["_differences"] == {"baseline": {"A": "zero", "B": "mean"}}


# -- intervals only from enough examples ------------------------------------------------------------------------


def range_coverage(n: int) -> float:
    """P(the range of n draws of a continuous symmetric distribution holds its centre), by enumerating which side
    of the centre each draw falls on (each side with probability 1/2): the range misses only when all fall on one."""
    patterns = torch.arange(2 ** n)[:, None].bitwise_right_shift(torch.arange(n)).bitwise_and(1)
    one_side = (patterns.sum(1) == 0) | (patterns.sum(1) == n)
    return 1.0 - float(one_side.double().mean())


@pytest.mark.parametrize("level", [0.5, 0.75, 0.8, 0.9, 0.95, 0.99, 0.999])
def test_min_examples_is_the_fewest_whose_range_can_hold_the_level(level):
    from headscore.stats import min_examples_for

    n = min_examples_for(level)
    assert n >= 2 and range_coverage(n) >= level
    assert n == 2 or range_coverage(n - 1) < level
    assert min_examples_for(0.95) == 6


def cis(doc: dict) -> dict:
    return {t: (row.get("spearman_ci"), row.get("topk_overlap_ci")) for t, row in doc.items() if not t.startswith("_")}


@pytest.mark.parametrize("n", [1, 2, 5])
def test_compare_shows_no_interval_from_too_few_examples(tmp_path, capsys, n):
    """With n = 1 there is no spread at all; with n = 2 (and up to 5 at 95%) a bootstrap interval, which never
    leaves the range of its resamples, cannot hold its level: none is shown, and the output says why."""
    a = scores_file(tmp_path / "a.hs", examples=(n, n), seed=1)
    b = scores_file(tmp_path / "b.hs", method="ablation-zero", examples=(n, n), seed=2)
    code, out, err = run(capsys, "compare", a, b, "--resamples", "50", "--json", tmp_path / "t.json")
    assert code == 0 and err == "", err
    assert "bootstrap intervals over examples" not in out and "[" not in out.split("task", 1)[1], out
    assert f"no interval for a (A {n}, B {n}), b (A {n}, B {n}): a 95% bootstrap interval needs at least 6 " \
           "examples of a task in each file" in out
    doc = json.loads((tmp_path / "t.json").read_text())
    assert cis(doc) == {"a": (None, None), "b": (None, None)}
    assert doc["a"]["examples"] == [n, n] and doc["a"]["min_examples"] == 6 and "paired" not in doc["a"]


def test_compare_shows_intervals_where_a_task_has_enough_examples(tmp_path, capsys):
    """Task a has 6 examples in each file (an interval), task b 2 (none); unpaired files need enough in each."""
    a = scores_file(tmp_path / "a.hs", examples=(6, 2), seed=1)
    b = scores_file(tmp_path / "b.hs", method="ablation-zero", examples=(6, 2), seed=2)
    code, out, err = run(capsys, "compare", a, b, "--resamples", "50", "--json", tmp_path / "t.json")
    assert code == 0 and err == "", err
    assert "95% bootstrap intervals over examples (50 resamples, seed 0; paired: same examples)" in out
    assert "no interval for b (A 2, B 2): a 95% bootstrap interval needs at least 6" in out
    doc = json.loads((tmp_path / "t.json").read_text())
    low, high = doc["a"]["spearman_ci"]
    assert low <= doc["a"]["spearman"] <= high and doc["a"]["examples"] == [6, 6] and doc["a"]["paired"]
    assert cis(doc)["b"] == (None, None)
    # files of different examples are resampled each on its own: the smaller one decides
    other = scores_file(tmp_path / "c.hs", method="ablation-zero", examples=(20, 20), seed=3, data_hash="other")
    code, out, _ = run(capsys, "compare", other, a, "--resamples", "50", "--json", tmp_path / "u.json")
    doc = json.loads((tmp_path / "u.json").read_text())
    assert code == 0 and doc["a"]["spearman_ci"] is not None and cis(doc)["b"] == (None, None)
    assert doc["b"]["examples"] == [20, 2] and "files resampled independently" in out
    # a lower level needs fewer: 5 examples hold 90% (1 - 2**-4 = 0.9375), not 95%
    five = scores_file(tmp_path / "d.hs", examples=(5, 5), seed=4)
    code, out, _ = run(capsys, "compare", five, five, "--resamples", "50", "--level", "0.9", "--json",
                       tmp_path / "v.json")
    doc = json.loads((tmp_path / "v.json").read_text())
    assert code == 0 and all(ci[0] is not None for ci in cis(doc).values()) and "no interval" not in out


def noisy_pair(tmp_path):
    """Two files of different examples (40 of each task): task 'noisy' shares its signal, and its maps of 270 heads
    carry noise 4x that signal, so their resampled Spearman falls below the figure in almost every resample (an
    uncorrectable bias); task 'unrelated' has maps of independent signals (a Spearman near 0, which resampling
    does not pull to one side)."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(30, 9, generator=g, dtype=torch.float64)
    paths = []
    for name in ("a", "b"):
        labels = torch.arange(2).repeat_interleave(40)
        signal = torch.stack([shared, torch.randn(30, 9, generator=g, dtype=torch.float64)])
        per_example = signal[labels] + 4.0 * torch.randn(80, 30, 9, generator=g, dtype=torch.float64)
        values = torch.stack([per_example[labels == i].mean(0) for i in range(2)])
        HeadScores(values, torch.zeros_like(values), torch.tensor([40, 40]), ["noisy", "unrelated"], "taylor", "m",
                   f"h{name}", example_values=per_example.float(), example_tasks=labels).save(tmp_path / f"{name}.hs")
        paths.append(tmp_path / f"{name}.hs")
    return paths


def test_compare_gives_no_interval_where_the_resamples_fall_on_one_side(tmp_path, capsys):
    """Where almost every resample's figure falls on one side of the figure, there is no interval (the plain
    percentile interval shown before lay wholly below it): the value alone, a line that says why, ``biased`` in
    the JSON; a task without that bias keeps its interval."""
    a, b = noisy_pair(tmp_path)
    code, out, err = run(capsys, "compare", a, b, "--resamples", "200", "--json", tmp_path / "t.json")
    assert code == 0 and err == "", err
    assert "no interval for noisy (Spearman): almost every resample fell on one side of the figure, a bias the " \
           "bootstrap cannot correct" in out
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["noisy"]["biased"] == ["spearman"] and doc["noisy"]["spearman_ci"] == [None, None]
    low, high = doc["unrelated"]["spearman_ci"]
    assert low <= doc["unrelated"]["spearman"] <= high and "biased" not in doc["unrelated"]
    row = next(line for line in out.splitlines() if line.startswith("noisy"))
    assert f"{doc['noisy']['spearman']:.3f}" in row and row.split()[1] == f"{doc['noisy']['spearman']:.3f}"


def test_the_library_table_keeps_its_default(tmp_path):
    """``agreement_table`` without ``min_examples`` (the report's call) leaves it to the bootstrap, which gives no
    interval (NaN ends) from 2 examples at 95% either; with it, the entry says why instead."""
    from headscore.intervals import agreement_table
    from headscore.stats import min_examples_for

    a = HeadScores.load(scores_file(tmp_path / "a.hs", examples=(2, 2), seed=1))
    b = HeadScores.load(scores_file(tmp_path / "b.hs", examples=(2, 2), seed=2))
    table = agreement_table(a, b, 5, resamples=20)
    assert all(math.isnan(row["spearman_ci"][0]) for row in table.values())
    table = agreement_table(a, b, 5, resamples=20, level=0.5)  # 2 examples hold a 50% interval
    assert all(math.isfinite(row["spearman_ci"][0]) for row in table.values())
    table = agreement_table(a, b, 5, resamples=20, min_examples=min_examples_for(0.95))
    assert all("spearman_ci" not in row and row["examples"] == [2, 2] for row in table.values())


# -- an output directory's parent must exist, as a file's must ---------------------------------------------------


def test_report_refuses_a_missing_parent_directory_before_work(tmp_path, capsys):
    a = scores_file(tmp_path / "a.hs", examples=(2, 2))
    out = tmp_path / "typo" / "deeper" / "rep"
    code, _, err = run(capsys, "report", a, "--out", out)
    assert code == 2 and err == f"headscore: error: --out {out}: directory {out.parent} does not exist\n", err
    assert not (tmp_path / "typo").exists()
    code, _, err = run(capsys, "compare", a, a, "--json", out / "t.json")  # as a file output always was
    assert code == 2 and err == f"headscore: error: --json {out / 't.json'}: directory {out} does not exist\n"
    code, _, err = run(capsys, "score", "--out", out / "s.hs")
    assert code == 2 and err == f"headscore: error: --out {out / 's.hs'}: directory {out} does not exist\n"
    assert not (tmp_path / "typo").exists()


def test_every_output_directory_needs_its_parent(tmp_path, capsys):
    """circuit, bench and reproduce-cogqa check their directory the same way, before loading anything."""
    a = scores_file(tmp_path / "a.hs", examples=(2, 2))
    cogqa = tmp_path / "c.json"
    cogqa.write_text("[]")
    out = tmp_path / "missing" / "d"
    for argv in (["circuit", a, "--out", out], ["bench", "--out", out], ["reproduce-cogqa", cogqa, "--out", out]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err == f"headscore: error: --out {out}: directory {out.parent} does not exist\n", err
    assert not (tmp_path / "missing").exists()


def test_a_new_report_directory_in_an_existing_one_is_made(tmp_path, capsys):
    a = scores_file(tmp_path / "a.hs", examples=(2, 2))
    code, _, err = run(capsys, "report", a, "--out", tmp_path / "rep", "--resamples", "0")
    assert code == 0 and (tmp_path / "rep" / "index.html").is_file(), err


def test_sections_that_cannot_be_compared_and_task_names_the_json_keeps(tmp_path, capsys):
    """Per-position maps without a position in common: the head table stands and the JSON is written, one line
    says why (the command stopped with exit 2 after printing the table). A task named like a key of the JSON
    (``_exact``) is refused with --json (its row was overwritten)."""
    def file(path, tasks, seed, position):
        g = torch.Generator().manual_seed(seed)
        values = torch.randn(len(tasks), 2, 3, generator=g, dtype=torch.float64)
        pv = torch.randn(len(tasks), 2, 3, 1, generator=g, dtype=torch.float64)
        HeadScores(values, values.abs(), torch.full((len(tasks),), 3), tasks, "taylor", "m", positions=[position],
                   position_values=pv, position_stderr=pv.abs(), position_counts=torch.full((len(tasks), 1), 3)
                   ).save(path)
        return path

    a, b = file(tmp_path / "a.hs", ["t"], 0, "end"), file(tmp_path / "b.hs", ["t"], 1, "end-1")
    code, out, err = run(capsys, "compare", a, b, "--k", "2", "--json", tmp_path / "o.json")
    assert code == 0, err
    assert "per (head, position): not compared (no position in common: ['end'] vs ['end-1'])" in out
    doc = json.loads((tmp_path / "o.json").read_text())
    assert set(doc) == {"t"}  # the head table; no per-position section
    a, b = file(tmp_path / "a2.hs", ["_exact", "x"], 0, "end"), file(tmp_path / "b2.hs", ["_exact", "x"], 1, "end")
    code, out, err = run(capsys, "compare", a, b, "--json", tmp_path / "o2.json")
    assert code == 2 and "--json: task '_exact' has the name of a key the JSON keeps for itself" in err
    assert not (tmp_path / "o2.json").exists()
    assert run(capsys, "compare", a, b)[0] == 0  # without --json nothing clashes


@pytest.mark.slow  # 5-9 s on 2 cores: a whole report
def test_report_says_which_tasks_an_ablation_file_lacks(tmp_path, capsys):
    """``report --ablation`` shows the tasks both files have; the ones it leaves out are named (they went without
    a word)."""
    scores = scores_file(tmp_path / "s.hs")
    ablation = tmp_path / "a.hs"
    HeadScores.load(scores_file(tmp_path / "a0.hs", seed=1)).select(["a"]).save(ablation)
    code, out, err = run(capsys, "report", scores, "--ablation", ablation, "--out", tmp_path / "rep")
    assert code == 0
    assert f"headscore: warning: --ablation {ablation} has no b: the report shows the tasks both files have" in err
    code, out, err = run(capsys, "report", scores, "--ablation", scores_file(tmp_path / "a1.hs", seed=2),
                         "--out", tmp_path / "rep2")
    assert code == 0 and "warning" not in err
