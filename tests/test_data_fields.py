"""Unknown fields of task files and tables: a name close to a field's (``traget``, ``corupt``, ``Foil``) is refused
with a suggestion, in one line naming the file, the line (or the column) and the field; any other name is kept
out of the examples and allowed (users keep ids and sources beside their examples)."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import pytest

from headscore.data.examples import Example, load_jsonl
from headscore.data.tables import examples_from_table, load_csv
from headscore.data.tasks import load_tasks
from headscore.errors import HeadscoreError

GOOD = {"prompt": "The capital of France is", "target": " Paris", "task": "geo"}


def jsonl(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("record, typo, field", [
    ({"prompt": "a b", "traget": " c", "task": "t"}, "traget", "target"),
    ({**GOOD, "corupt": "The capital of Spain is"}, "corupt", "corrupt"),
    ({**GOOD, "corrupted": "The capital of Spain is"}, "corrupted", "corrupt"),
    ({**GOOD, "Foil": " Rome"}, "Foil", "foil"),
    ({"promt": "a b", "target": " c", "task": "t"}, "promt", "prompt"),
    ({"text": "good film", "lable": 1, "task": "sentiment"}, "lable", "label"),
])
def test_a_misspelled_field_is_refused_with_a_suggestion(tmp_path, record, typo, field):
    assert difflib.get_close_matches(typo.lower(), [field], 1, 0.75) == [field]  # the typo is close to the field
    path = jsonl(tmp_path / "t.jsonl", GOOD, record)
    with pytest.raises(HeadscoreError) as info:
        load_tasks(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:2: unknown field {typo!r}; did you mean {field!r}?"), message


def test_other_fields_are_metadata_and_change_nothing(tmp_path):
    plain = load_jsonl(jsonl(tmp_path / "plain.jsonl", GOOD, {**GOOD, "corrupt": "The capital of Spain is"}))
    extra = {"id": 7, "source": "atlas", "meta": {"k": [1]}, "notes": None, "answer_id": "x", "context": "c"}
    withmeta = load_jsonl(jsonl(tmp_path / "meta.jsonl", {**GOOD, **extra},
                                {**GOOD, "corrupt": "The capital of Spain is", **extra}))
    assert withmeta == plain  # equal examples (and so an equal data hash)
    assert withmeta[1].corrupt == "The capital of Spain is"
    # a name close to a field the line already has is no typo of it (the field is there)
    both = load_jsonl(jsonl(tmp_path / "both.jsonl", {**GOOD, "targets": [" Paris", " paris"]}))
    assert both == [Example(GOOD["prompt"], GOOD["target"], GOOD["task"])]


def test_a_csv_column_close_to_a_field_is_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,target,task,corupt\na b, c,t,x y\n", encoding="utf-8")
    with pytest.raises(HeadscoreError, match=re.escape(f"{path}:1: column 'corupt' is no field; did you mean "
                                                       "'corrupt'?")) as info:
        load_csv(path)
    assert "\n" not in str(info.value) and "--columns corrupt=corupt" in str(info.value)
    # mapped to the field, the same column is read as it
    [ex] = load_csv(path, {"corrupt": "corupt"})
    assert ex.corrupt == "x y"
    ok = tmp_path / "ok.csv"
    ok.write_text("id,prompt,target,task,source\n1,a b, c,t,web\n", encoding="utf-8")
    assert load_csv(ok) == [Example("a b", " c", "t")]


def test_a_dataframe_column_close_to_a_field_is_refused():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"prompt": ["a b"], "target": [" c"], "task": ["t"], "Foil": [" d"], "id": [3]})
    with pytest.raises(HeadscoreError, match=re.escape("DataFrame: column 'Foil' is no field; did you mean 'foil'? "
                                                       "(rename the column, or map it: columns={'foil': 'Foil'}")):
        examples_from_table(df)
    [ex] = examples_from_table(df, {"foil": "Foil"})
    assert ex.foil == " d"
    assert examples_from_table(df.drop(columns=["Foil"])) == [Example("a b", " c", "t")]


def test_columns_naming_a_misspelled_field_suggests_the_field():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"question": ["a b"], "target": [" c"], "task": ["t"]})
    with pytest.raises(HeadscoreError, match=re.escape("columns: unknown field 'promt'; did you mean 'prompt'?")):
        examples_from_table(df, {"promt": "question"})
    with pytest.raises(HeadscoreError, match=re.escape("columns: unknown field 'question' (columns maps a field")):
        examples_from_table(df, {"question": "prompt"})  # not close to any field: the message as before
