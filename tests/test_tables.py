"""Tasks from tables (issue 26): CSV, Parquet, a ``datasets`` directory, and DataFrames and Datasets in Python give
the examples of the same JSONL file, and so bitwise the same scores; bad cells are one line naming row and column.

The files are written here with the standard library's csv module, pyarrow and datasets directly, not with
headscore, so a loader that misreads its format cannot agree with a writer sharing its mistake.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tiny_saved import save_tiny_model

import headscore
from headscore.cli import main
from headscore.data.tables import examples_from_table
from headscore.data.tasks import load_tasks
from headscore.errors import HeadscoreError
from headscore.results import HeadScores

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

FIELDS = ("prompt", "target", "task", "corrupt", "foil")
RECORDS = [
    {"prompt": "The capital of France is", "target": " Paris", "task": "geo"},
    {"prompt": "2 + 2 =", "target": " 4", "task": "math", "foil": "5"},
    {"prompt": "The capital of Italy is", "target": " Rome", "task": "geo", "corrupt": "The capital of Spain is"},
    {"prompt": 'He said "hi,\nthere" and', "target": " left", "task": "caf\u00e9", "foil": "stayed"},
    {"prompt": "3 + 4 =", "target": " 7", "task": "math"},
    {"prompt": "Un caf\u00e9 est", "target": " chaud", "task": "caf\u00e9"},
]


def rows(records=RECORDS) -> list[dict]:
    """Every record with every field, None where it has none (a table's null cell)."""
    return [{f: r.get(f) for f in FIELDS} for r in records]


def write_jsonl(path: Path, records=RECORDS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, records=RECORDS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows(records))
    return path


def write_tsv(path: Path, records=RECORDS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, delimiter="\t")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows(records))
    return path


def write_json_array(path: Path, records=RECORDS) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")  # pretty-printed: one object spans lines
    return path


def write_parquet(path: Path, records=RECORDS) -> Path:
    pq.write_table(pa.Table.from_pylist(rows(records)), path)
    return path


def write_dataset(path: Path, records=RECORDS) -> Path:
    datasets.Dataset.from_list(rows(records)).save_to_disk(str(path))
    return path


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "tsv": write_tsv, "json": write_json_array,
           "parquet": write_parquet, "dataset": write_dataset}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sources")
    return {name: write(d / (f"tasks.{name}" if name != "dataset" else "tasks-dataset")) for name, write in
            WRITERS.items()}


def test_every_source_gives_the_examples_of_jsonl(sources):
    reference = load_tasks(str(sources["jsonl"]))
    assert [ex.prompt for ex in reference] == [r["prompt"] for r in RECORDS]  # the reference itself is right
    for name, path in sources.items():
        examples = load_tasks(str(path))
        assert examples == reference, name
        assert [(ex.corrupt, ex.foil) for ex in examples] == [(r.get("corrupt"), r.get("foil")) for r in RECORDS]
    lines = [ex.where for ex in load_tasks(str(sources["csv"]))]
    assert lines == [f"{sources['csv']}:{n}" for n in (2, 3, 4, 5, 7, 8)]  # row 4's prompt spans lines 5 and 6
    assert load_tasks(str(sources["parquet"]))[3].where == f"{sources['parquet']}: row 3"
    assert load_tasks(str(sources["json"]))[3].where == f"{sources['json']}[3]"
    assert [ex.where for ex in load_tasks(str(sources["tsv"]))] == [f"{sources['tsv']}:{n}" for n in (2, 3, 4, 5, 7, 8)]
    in_memory = {"DataFrame": pd.DataFrame(rows()), "Dataset": datasets.Dataset.from_list(rows()),
                 "Table": pa.Table.from_pylist(rows())}
    for name, table in in_memory.items():
        examples = examples_from_table(table)
        assert examples == reference and examples[2].where == f"{name}: row 2", name


def test_a_dataset_keeps_its_selected_row_order(tmp_path):
    ds = datasets.Dataset.from_list(rows()).select([4, 0]).with_format("torch")
    assert [ex.prompt for ex in examples_from_table(ds)] == [RECORDS[4]["prompt"], RECORDS[0]["prompt"]]


def test_columns_of_other_names_and_labelled_rows(tmp_path):
    df = pd.DataFrame({"question": ["a b", "c d"], "answer": [" x", " y"], "kind": ["t1", "t2"]})
    got = examples_from_table(df, {"prompt": "question", "target": "answer", "task": "kind"})
    assert got == [headscore.Example("a b", " x", "t1"), headscore.Example("c d", " y", "t2")]
    path = tmp_path / "cls.csv"
    path.write_text("text,label,task\ngood film,1,sentiment\nbad film,0,sentiment\nfine,0.5,score\n")
    assert load_tasks(str(path)) == [headscore.Example.labelled("good film", 1, "sentiment"),
                                     headscore.Example.labelled("bad film", 0, "sentiment"),
                                     headscore.Example.labelled("fine", 0.5, "score")]
    assert isinstance(load_tasks(str(path))[0].label, int)
    table = pa.Table.from_pylist([{"text": "good film", "label": 1, "task": "s"}])
    assert examples_from_table(table) == [headscore.Example.labelled("good film", 1, "s")]


def test_columns_of_a_headerless_dataframe_by_integer_label():
    df = pd.DataFrame([["a b", " x", "t1"], ["c d", " y", "t2"]])  # no header row: columns 0, 1, 2
    expected = [headscore.Example("a b", " x", "t1"), headscore.Example("c d", " y", "t2")]
    assert examples_from_table(df, {"prompt": 0, "target": 1, "task": 2}) == expected
    assert examples_from_table(df, {"prompt": "0", "target": "1", "task": "2"}) == expected
    with pytest.raises(HeadscoreError, match="columns maps 'prompt' to 3, which is no column"):
        examples_from_table(df, {"prompt": 3, "target": 1, "task": 2})
    with pytest.raises(HeadscoreError, match="columns maps 'prompt' to True"):
        examples_from_table(df, {"prompt": True, "target": 1, "task": 2})


@pytest.mark.parametrize("table,columns,words", [
    ({"prompt": ["p"], "target": [" x"]}, None, "DataFrame: no column 'task'; its columns are prompt, target "
                                                "(name yours with columns={'task': 'your column'})"),
    ({"q": ["p"], "target": [" x"], "task": ["t"]}, {"question": "q"}, "columns: unknown field 'question'"),
    ({"q": ["p"], "target": [" x"], "task": ["t"]}, {"prompt": "Q"}, "columns maps 'prompt' to 'Q', which is no "
                                                                       "column of the table; its columns are q"),
    ({"prompt": ["p", "p"], "target": [" x", None], "task": ["t", "t"]}, None,
     "DataFrame: row 1, column 'target': empty cell; every example needs a target"),
    ({"prompt": ["p", 7], "target": [" x", " y"], "task": ["t", "t"]}, None,
     "DataFrame: row 1, column 'prompt': must be a string, got int 7"),
    ({"prompt": ["p"], "target": ["  "], "task": ["t"]}, None, "DataFrame: row 0, column 'target': empty target"),
    ({"prompt": ["p"], "target": [" x"], "task": ["t"], "foil": [" x"]}, None,
     "DataFrame: row 0, column 'foil': foil ' x' equals the target"),
    ({"prompt": ["p"], "target": [" x"], "task": ["t"], "foil": [3.5]}, None,
     "DataFrame: row 0, column 'foil': must be a string, got float 3.5"),
    ({"text": ["good"], "label": ["pos"], "task": ["t"]}, None,
     "DataFrame: row 0, column 'label': must be a number (a class index, or a float for regression), got str"),
    ({"prompt": ["p"], "target": [" x"], "task": ["t"], "label": [1]}, None,
     "DataFrame: row 0: a text/label example has no prompt, target"),
    ({"prompt": [], "target": [], "task": []}, None, "DataFrame: no examples"),
])
def test_bad_cells_are_one_line_naming_row_and_column(table, columns, words):
    with pytest.raises(HeadscoreError) as info:
        examples_from_table(pd.DataFrame(table), columns)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_bad_table_files(tmp_path):
    mismatched = tmp_path / "m.csv"
    mismatched.write_text("prompt,target,task\np, x,t\np, x\n")
    with pytest.raises(HeadscoreError, match=r"m.csv:3: 2 cells, but the header \(line 1\) names 3 columns"):
        load_tasks(str(mismatched))
    dupes = tmp_path / "d.csv"
    dupes.write_text("prompt,target,task,task\np, x,t,u\n")
    with pytest.raises(HeadscoreError, match="d.csv:1: column 'task' appears more than once"):
        load_tasks(str(dupes))
    bad_label = tmp_path / "l.csv"
    bad_label.write_text("text,label,task\ngood,one,t\n")
    with pytest.raises(HeadscoreError, match="l.csv:2, column 'label': must be a number"):
        load_tasks(str(bad_label))
    split = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows()), "test": datasets.Dataset.from_list(rows())}
                         ).save_to_disk(str(split))
    with pytest.raises(HeadscoreError, match=r"holds a DatasetDict \(splits test, train\); give one split's"):
        load_tasks(str(split))
    assert load_tasks(str(split / "train")) == load_tasks(str(write_jsonl(tmp_path / "t.jsonl")))
    with pytest.raises(HeadscoreError, match="a DatasetDict .* pass one split"):
        examples_from_table(datasets.load_from_disk(str(split)))
    with pytest.raises(HeadscoreError, match="columns= names a table's columns"):
        headscore.prepare(None, [headscore.Example("p", " x", "t")], columns={"prompt": "q"})


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch, sources):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(HeadscoreError, match=r"needs pyarrow: pip install 'headscore\[notebook\]'"):
        load_tasks(str(sources["parquet"]))
    assert load_tasks(str(sources["csv"]))  # CSV needs nothing beyond the standard library


# ------------------------------------------------------------------------------------- the same scores


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_every_source_scores_bitwise_the_same(tmp_path, sources, model_dir, capsys):
    """The command line on each file, and score() on a DataFrame and a Dataset with renamed columns."""
    results = {}
    for name, path in sources.items():
        out = tmp_path / f"{name}.hs"
        code = main(["score", "--model", str(model_dir), "--tasks", str(path), "--out", str(out), "--no-progress"])
        assert code == 0 and capsys.readouterr().err == "", name  # --no-progress: no bar of datasets' either
        results[name] = HeadScores.load(out)
    lm = headscore.load_model(str(model_dir))
    renamed = pd.DataFrame(rows()).rename(columns={"prompt": "question", "task": "category"})
    columns = {"prompt": "question", "task": "category"}
    results["DataFrame"] = headscore.score(lm, renamed, columns=columns, progress=False)
    results["Dataset"] = headscore.score(lm, datasets.Dataset.from_pandas(renamed), columns=columns,
                                         progress=False)
    reference = results.pop("jsonl")
    assert reference.tasks == ["geo", "math", "caf\u00e9"] and bool(reference.values.abs().sum() > 0)
    for name, got in results.items():
        assert got.tasks == reference.tasks, name
        assert torch.equal(got.values, reference.values), name
        assert torch.equal(got.stderr, reference.stderr), name
        assert torch.equal(got.example_values, reference.example_values), name
        assert torch.equal(got.counts, reference.counts) and got.data_hash == reference.data_hash, name


RENAMES = {"prompt": "question", "target": "answer", "task": "kind"}


def renamed_rows(records=RECORDS) -> list[dict]:
    """The records with three fields under other column names (as a user's own table has them)."""
    return [{RENAMES.get(k, k): v for k, v in r.items()} for r in rows(records)]


def test_files_with_other_column_names_read_with_columns(tmp_path, sources):
    reference = load_tasks(str(sources["jsonl"]))
    csv_path = tmp_path / "renamed.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(renamed_rows()[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in renamed_rows())
    parquet_path = tmp_path / "renamed.parquet"
    pq.write_table(pa.Table.from_pylist(renamed_rows()), parquet_path)
    dataset_path = tmp_path / "renamed-dataset"
    datasets.Dataset.from_list(renamed_rows()).save_to_disk(str(dataset_path))
    for path in (csv_path, parquet_path, dataset_path):
        with pytest.raises(HeadscoreError, match=r"no column 'prompt'.*--columns prompt=COLUMN"):
            load_tasks(str(path))
        got = load_tasks(str(path), RENAMES)
        assert [(e.prompt, e.target, e.task, e.corrupt, e.foil) for e in got] == \
            [(e.prompt, e.target, e.task, e.corrupt, e.foil) for e in reference], path
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("review,stars,task\ngood film,1,s\nfine,0.5,s\n")
    assert load_tasks(str(labelled), {"text": "review", "label": "stars"}) == \
        [headscore.Example.labelled("good film", 1, "s"), headscore.Example.labelled("fine", 0.5, "s")]
    for spec in ("builtin", "ioi", str(sources["jsonl"]), "cogqa:x.csv"):
        with pytest.raises(HeadscoreError, match="--columns names the columns of a .csv or .parquet file"):
            load_tasks(spec, RENAMES)


@pytest.mark.parametrize("value,words", [
    ("prompt", "'prompt' is not FIELD=COLUMN"),
    ("prompt=", "'prompt=' is not FIELD=COLUMN"),
    ("question=prompt", "unknown field 'question' (the fields are prompt, target, task"),
    ("promt=question", "unknown field 'promt'; did you mean 'prompt'? (the fields are prompt, target, task"),
    ("prompt=a,prompt=b", "field 'prompt' is named twice"),
])
def test_a_bad_columns_flag_is_one_usage_line(value, words, sources, capsys):
    code = main(["score", "--tasks", str(sources["csv"]), "--columns", value, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"argument --columns: {words}" in err and err.count("\n") <= 2  # usage + one line


def test_columns_naming_no_column_of_the_file_exits_2(sources, capsys, tmp_path):
    code = main(["score", "--tasks", str(sources["csv"]), "--columns", "prompt=question", "--no-progress",
                 "--out", str(tmp_path / "s.hs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "columns maps 'prompt' to 'question', which is no column of the table" in err
    assert "\n" not in err


def test_columns_on_the_command_line_and_in_ablate(tmp_path, sources, model_dir, capsys):
    """``--columns`` gives the JSONL file's scores bitwise; ``ablate``/``ablate_heads`` take a table with columns."""
    renamed = tmp_path / "renamed.parquet"
    pq.write_table(pa.Table.from_pylist(renamed_rows()), renamed)
    outs = {}
    for name, extra in (("jsonl", ["--tasks", str(sources["jsonl"])]),
                        ("renamed", ["--tasks", str(renamed), "--columns", "prompt=question,target=answer,task=kind"])):
        outs[name] = tmp_path / f"{name}.hs"
        assert main(["score", "--model", str(model_dir), *extra, "--out", str(outs[name]), "--no-progress"]) == 0
    capsys.readouterr()
    reference, got = HeadScores.load(outs["jsonl"]), HeadScores.load(outs["renamed"])
    assert got.tasks == reference.tasks and torch.equal(got.values, reference.values)
    assert got.data_hash == reference.data_hash
    lm = headscore.load_model(str(model_dir))
    frame = pd.DataFrame(renamed_rows())
    truth = headscore.ablate(lm, load_tasks(str(sources["jsonl"])), progress=False)
    from_frame = headscore.ablate(lm, frame, columns=RENAMES, progress=False)
    assert torch.equal(from_frame.values, truth.values) and from_frame.tasks == truth.tasks
    assert bool(truth.values.abs().sum() > 0)
    sets = headscore.ablate_heads(lm, frame, [(0, 0)], columns=RENAMES, progress=False)
    assert sets == headscore.ablate_heads(lm, load_tasks(str(sources["jsonl"])), [(0, 0)], progress=False)
    with pytest.raises(HeadscoreError, match="no column 'prompt'"):
        headscore.ablate(lm, frame, progress=False)


def test_a_json_array_and_jsonl_named_json_and_their_errors(tmp_path):
    """A .json file is one JSON array of example objects (was 'malformed JSON' at line 1), or JSON Lines under
    that name; errors name the element."""
    lines = write_jsonl(tmp_path / "lines.json")
    assert load_tasks(str(lines)) == load_tasks(str(write_jsonl(tmp_path / "t.jsonl")))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([RECORDS[0], {"prompt": "x", "task": "t"}]), encoding="utf-8")
    with pytest.raises(HeadscoreError, match=r"bad\.json\[1\]: missing field\(s\) target"):
        load_tasks(str(bad))
    bad.write_text('[{"prompt": "x",\n "target": }]', encoding="utf-8")
    with pytest.raises(HeadscoreError, match=r"bad\.json:2: malformed JSON"):
        load_tasks(str(bad))


def test_a_csv_cell_as_long_as_a_jsonl_line_may_be(tmp_path):
    """A cell of 200,000 characters (a long-context prompt) loads (csv's default limit is 128 KiB: 'malformed
    CSV'); one over 1 MiB, the JSONL line limit, is one line saying so; the csv module's limit is left as it was."""
    before = csv.field_size_limit()
    path = write_csv(tmp_path / "long.csv", [{**RECORDS[0], "prompt": "word " * 40_000}])
    assert len(load_tasks(str(path))[0].prompt) == 200_000
    path = write_csv(tmp_path / "huge.csv", [{**RECORDS[0], "prompt": "w" * ((1 << 20) + 1)}])
    with pytest.raises(HeadscoreError, match=r"huge\.csv:2: a cell longer than 1 MiB"):
        load_tasks(str(path))
    assert csv.field_size_limit() == before
