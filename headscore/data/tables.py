"""Examples from tables: CSV and Parquet files, a Hugging Face ``datasets`` directory (``save_to_disk``), and in
Python a pandas DataFrame, a ``datasets.Dataset`` or a pyarrow Table.

Every source becomes the same thing, columns of Python values, and one function, :func:`examples_from_columns`,
turns those into :class:`~headscore.data.examples.Example` objects with the checks of the JSON Lines loader: the
columns ``prompt``, ``target``, ``task`` (a row with a ``label`` is a sequence classifier's ``text``, ``label``,
``task``), optionally ``corrupt`` and ``foil``; an empty (null) optional cell is the same as no value, as
``null`` is in JSONL. Errors are one line naming the source, the row and the column:
``data.parquet: row 3, column 'prompt': must be a string, got int``. Rows count from 0, as ``df.iloc[i]`` and
``dataset[i]`` do; a CSV file's rows are named by their line in the file (``data.csv:4``, the header is line 1),
as a JSONL file's are.

CSV needs nothing beyond the standard library; Parquet needs pyarrow, a ``datasets`` directory the ``datasets``
package (both in the ``notebook`` extra: ``pip install 'headscore[notebook]'``).
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import HeadscoreError
from .examples import (
    KNOWN_FIELDS,
    LABELLED_FIELDS,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    Example,
    did_you_mean,
    misspelled_field,
    validate_examples,
)
from .text_files import MAX_LINE_BYTES, read_utf8

FIELDS = KNOWN_FIELDS
"""The fields a table's columns can fill: prompt, target, task, corrupt, foil, and text, label (classifiers). Other
columns are ignored, but one named close to a field the table lacks is refused (:func:`check_column_names`)."""
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
"""Task files read as tables (by suffix, any case); every other file is read as JSON Lines."""
INSTALL_HINT = "pip install 'headscore[notebook]'"

Columns = dict[str, list]
"""A table as Python lists, one per column, all of one length."""


def _is_null(value: object) -> bool:
    """None, NaN (pandas' missing float and string), pandas' NA and NaT: an empty cell."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        type(value).__name__ in ("NAType", "NaTType")


def _table_kind(obj: object) -> str | None:
    """``pandas``, ``datasets`` or ``arrow`` for the tables headscore reads, None for anything else
    (modules never imported cannot have made ``obj``, so none is imported here)."""
    pd, ds, pa = (sys.modules.get(name) for name in ("pandas", "datasets", "pyarrow"))
    if pd is not None and isinstance(obj, pd.DataFrame):
        return "pandas"
    if ds is not None and isinstance(obj, ds.Dataset):
        return "datasets"
    if ds is not None and isinstance(obj, ds.DatasetDict):
        splits = ", ".join(obj)
        raise HeadscoreError(f"a DatasetDict (splits {splits}) holds several tables; pass one split, e.g. "
                             f"dataset[{next(iter(obj), 'train')!r}]")
    if ds is not None and isinstance(obj, (ds.IterableDataset, ds.IterableDatasetDict)):
        raise HeadscoreError("an IterableDataset (streaming) cannot be scored as it streams; load it as a Dataset "
                             "(streaming=False) or take rows with Dataset.from_list(list(ds.take(n)))")
    if pa is not None and isinstance(obj, pa.Table):
        return "arrow"
    return None


def is_table(obj: object) -> bool:
    """Whether ``obj`` is a table :func:`examples_from_table` reads (a DataFrame, a Dataset, a pyarrow Table)."""
    return _table_kind(obj) is not None


def _arrow_columns(table: Any) -> Columns:
    names = [str(n) for n in table.column_names]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise HeadscoreError(f"column {dupes[0]!r} appears more than once")
    return {name: table.column(i).to_pylist() for i, name in enumerate(names)}


def table_columns(table: Any) -> Columns:
    """The columns of a pandas DataFrame, a ``datasets.Dataset`` or a pyarrow Table as Python lists."""
    kind = _table_kind(table)
    if kind == "pandas":
        names = [str(c) for c in table.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise HeadscoreError(f"DataFrame: column {dupes[0]!r} appears more than once")
        return {name: table.iloc[:, i].tolist() for i, name in enumerate(names)}
    if kind == "datasets":  # the arrow format keeps Dataset.select/shuffle's row order, whatever format is set
        return _arrow_columns(table.with_format("arrow")[:])
    if kind == "arrow":
        return _arrow_columns(table)
    raise HeadscoreError(f"expected a pandas DataFrame, a datasets.Dataset or a pyarrow Table, got "
                         f"{type(table).__name__}")


def _column_map(columns: Mapping[str, str] | None, present: Sequence[str], source: str) -> dict[str, str]:
    """Field -> column name: ``columns`` over the identity, checked against the fields and the table."""
    mapping = {f: f for f in FIELDS}
    if columns is None:
        return mapping
    if not isinstance(columns, Mapping):
        raise HeadscoreError(f"columns must map fields to column names, e.g. {{'prompt': 'question'}}, got "
                             f"{type(columns).__name__}")
    for field, column in columns.items():
        if field not in FIELDS:
            hint = did_you_mean(field, FIELDS)
            raise HeadscoreError(f"columns: unknown field {field!r}{hint} (columns maps a field to your column, "
                                 f"e.g. {{'prompt': 'question'}}); the fields are {', '.join(FIELDS)}")
        # a DataFrame's integer labels (no header row) are read as their text, like every column name
        name = str(column) if isinstance(column, int) and not isinstance(column, bool) else column
        if not isinstance(name, str) or name not in present:
            raise HeadscoreError(f"{source}: columns maps {field!r} to {column!r}, which is no column of the "
                                 f"table; its columns are {', '.join(present) or '(none)'}")
        mapping[field] = name
    return mapping


def check_column_names(names: Sequence[str], col: Mapping[str, str], header: str, in_python: bool) -> None:
    """HeadscoreError for a column no field reads whose name looks like a misspelling of a field the table has
    no column for (:func:`~headscore.data.examples.misspelled_field`); ``col`` maps fields to columns, ``header``
    names the table's header in the message."""
    used = set(col.values())
    typo = misspelled_field([n for n in names if n not in used], [f for f in FIELDS if col[f] in names])
    if typo is None:
        return
    name, field = typo
    mapping = f"columns={{{field!r}: {name!r}}}" if in_python else f"--columns {field}={name}, or columns= in Python"
    raise HeadscoreError(f"{header}: column {name!r} is no field; did you mean {field!r}? (rename the column, or map "
                         f"it: {mapping}; other columns are ignored, but not one this close to a field's name)")


def examples_from_columns(columns: Columns, *, source: str, where: Callable[[int], str] | None = None,
                          mapping: Mapping[str, str] | None = None, in_python: bool = False,
                          header: str | None = None) -> list[Example]:
    """Examples from a table's columns (equally long lists of Python values), one per row.

    Args:
        columns: column name -> its cells.
        source: how errors name the table (a file name, ``DataFrame``).
        where: how errors and ``Example.where`` name row ``i`` (default ``f"{source}: row {i}"``).
        mapping: field -> column name for the fields whose column has another name (``{"prompt": "question"}``).
        in_python: the table came from Python (errors about a missing column then say how to map one).
        header: how errors about a column's name name the table (default ``source``; ``data.csv:1``).

    A row whose ``label`` cell holds a value (or any row of a table with ``text`` and no ``prompt`` column) is a
    sequence classifier's example (``text``, ``label``, ``task``); every other row needs ``prompt``, ``target``
    and ``task`` strings, and may have ``corrupt`` and ``foil``. Other columns are ignored (ids, sources), but
    one named close to a field the table has no column for (``corupt``, ``Target``) is refused, with the field.
    HeadscoreError naming the row and the column for a missing column, an empty cell where a value is needed, a
    value of the wrong type, an empty target or task, a foil equal to the target.
    """
    names = list(columns)
    col = _column_map(mapping, names, source)
    check_column_names(names, col, header or source, in_python)
    where = where or (lambda i: f"{source}: row {i}")
    n = len(next(iter(columns.values()), []))

    def has(field: str) -> bool:
        return col[field] in columns

    def cell(field: str, i: int) -> object:
        value = columns[col[field]][i] if has(field) else None
        return None if _is_null(value) else value

    def need(field: str, i: int, *, kind: str = "string") -> object:
        if not has(field):
            shown = col[field] if col[field] == field else f"{col[field]} (for {field})"
            raise HeadscoreError(f"{source}: no column {shown!r}; its columns are {', '.join(names) or '(none)'}"
                                 f"{_rename_hint(field, in_python)}")
        value = cell(field, i)
        if value is None:
            raise HeadscoreError(f"{where(i)}, column {col[field]!r}: empty cell; every example needs a {field}")
        return _checked(value, field, kind, f"{where(i)}, column {col[field]!r}")

    labelled_table = not has("prompt") and has("text")
    examples = []
    for i in range(n):
        if labelled_table or cell("label", i) is not None:
            extra = [col[f] for f in ("prompt", "target", *OPTIONAL_FIELDS) if cell(f, i) is not None]
            if extra:
                raise HeadscoreError(f"{where(i)}: a text/label example has no {', '.join(extra)} (a value in "
                                     f"column 'label' makes the row a sequence classifier's example)")
            text, label, task = (need(f, i, kind="number" if f == "label" else "string") for f in LABELLED_FIELDS)
            _nonblank(text, "text", where(i), col)
            _nonblank(task, "task", where(i), col)
            examples.append(Example.labelled(text, label, task, where=where(i)))
            continue
        values = {f: need(f, i) for f in REQUIRED_FIELDS}
        for f in OPTIONAL_FIELDS:
            value = cell(f, i)
            if value is not None:
                values[f] = _checked(value, f, "string", f"{where(i)}, column {col[f]!r}")
        _nonblank(values["target"], "target", where(i), col)
        _nonblank(values["task"], "task", where(i), col)
        if "foil" in values and values["foil"].strip() == values["target"].strip():
            raise HeadscoreError(f"{where(i)}, column {col['foil']!r}: foil {values['foil']!r} equals the target")
        examples.append(Example(**values, where=where(i)))
    return validate_examples(examples, source=source)


def _rename_hint(field: str, in_python: bool) -> str:
    if in_python:
        return f" (name yours with columns={{{field!r}: 'your column'}})"
    return f" (name yours with --columns {field}=COLUMN, or columns= in Python)"


def _checked(value: object, field: str, kind: str, where: str) -> object:
    """``value`` if it is a string (``kind="string"``) or a number (a label), else a one-line error."""
    if kind == "string":
        if not isinstance(value, str):
            raise HeadscoreError(f"{where}: must be a string, got {type(value).__name__} {value!r:.40}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HeadscoreError(f"{where}: must be a number (a class index, or a float for regression), got "
                             f"{type(value).__name__} {value!r:.40}")
    return value


def _nonblank(value: str, field: str, where: str, col: Mapping[str, str]) -> None:
    if not value.strip():
        raise HeadscoreError(f"{where}, column {col[field]!r}: empty {field}")


def examples_from_table(table: Any, columns: Mapping[str, str] | None = None, *,
                        source: str | None = None) -> list[Example]:
    """Examples from a pandas DataFrame, a ``datasets.Dataset`` or a pyarrow Table, one per row.

    ``columns`` maps a field to the table's column of another name, e.g. ``{"prompt": "question", "target":
    "answer", "task": "category"}``; the fields are :data:`FIELDS`. Checks and errors: see
    :func:`examples_from_columns` (``source`` names the table in them; default its kind: ``DataFrame``).
    """
    kind = _table_kind(table)
    source = source or {"pandas": "DataFrame", "datasets": "Dataset", "arrow": "Table"}.get(kind or "", "table")
    return examples_from_columns(table_columns(table), source=source, mapping=columns, in_python=True)


def as_examples(examples: Any, columns: Mapping[str, str] | None = None) -> Any:
    """``examples`` as Examples when it is a table (:func:`examples_from_table`), else unchanged (a list of
    Examples, None); HeadscoreError when ``columns`` comes without a table."""
    if is_table(examples):
        return examples_from_table(examples, columns)
    if columns is not None:
        raise HeadscoreError(f"columns= names a table's columns; the examples are a {type(examples).__name__}, "
                             "not a pandas DataFrame or a datasets.Dataset")
    return examples


# ------------------------------------------------------------------------------------------------------ files

_INTEGER = re.compile(r"[+-]?\d+")


def _csv_label(text: str, where: str) -> int | float:
    """A CSV cell of the ``label`` column as a number: an integer is a class, anything else a float."""
    text = text.strip()
    try:
        return int(text) if _INTEGER.fullmatch(text) else float(text)
    except ValueError:
        raise HeadscoreError(f"{where}, column 'label': must be a number (a class index, or a float for "
                             f"regression), got {text!r:.40}") from None


def load_csv(path: str | Path, columns: Mapping[str, str] | None = None, *, delimiter: str = ",") -> list[Example]:
    """Examples from a CSV file (UTF-8, comma-separated, a header row naming the columns; quoted cells may
    span lines), or with ``delimiter="\\t"`` a TSV file. An empty cell is an empty (null) cell; cells of a ``label``
    column are numbers. Errors name the line a row starts on: ``data.csv:4, column 'target': empty cell; every
    example needs a target``. ``columns`` maps fields to columns of other names, as in
    :func:`examples_from_table`."""
    path = Path(path)
    text = read_utf8(path)
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[list[str]] = []
    starts: list[int] = []
    header: list[str] | None = None
    header_line = line = 0
    limit = csv.field_size_limit()
    try:
        csv.field_size_limit(max(limit, MAX_LINE_BYTES))  # a cell as long as a JSONL line may be (the default: 128 KiB)
        for row in reader:
            start, line = line + 1, reader.line_num
            if not row:  # a blank line
                continue
            if header is None:
                header, header_line = row, start
                continue
            if len(row) != len(header):
                raise HeadscoreError(f"{path}:{start}: {len(row)} cells, but the header (line {header_line}) names "
                                     f"{len(header)} columns")
            rows.append(row)
            starts.append(start)
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise HeadscoreError(f"{path}:{reader.line_num}: a cell longer than {MAX_LINE_BYTES >> 20} MiB (or a quote "
                                 "that is never closed)") from None
        raise HeadscoreError(f"{path}:{reader.line_num}: malformed {kind} ({exc})") from None
    finally:
        csv.field_size_limit(limit)
    if header is None:
        raise HeadscoreError(f"{path}: no examples")
    dupes = sorted({n for n in header if header.count(n) > 1})
    if dupes:
        raise HeadscoreError(f"{path}:{header_line}: column {dupes[0]!r} appears more than once in the header")
    table: Columns = {}
    for j, name in enumerate(header):
        cells: list = [row[j] if row[j] != "" else None for row in rows]
        if name == (columns or {}).get("label", "label"):
            cells = [None if c is None else _csv_label(c, f"{path}:{s}") for c, s in zip(cells, starts, strict=True)]
        table[name] = cells
    return examples_from_columns(table, source=str(path), where=lambda i: f"{path}:{starts[i]}", mapping=columns,
                                 header=f"{path}:{header_line}")


def _import(module: str, what: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise HeadscoreError(f"{what} needs {module.split('.')[0]}: {INSTALL_HINT}") from None


def load_parquet(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Example]:
    """Examples from a Parquet file (read with pyarrow); errors name the row (from 0) and the column.
    ``columns`` as in :func:`load_csv`."""
    path = Path(path)
    if not path.exists():
        raise HeadscoreError(f"{path}: no such file")
    pq = _import("pyarrow.parquet", f"reading {path}")
    try:
        table = pq.read_table(path)
    except OSError as exc:
        raise HeadscoreError(f"{path}: cannot read it as Parquet ({_one_line(exc)})") from None
    except Exception as exc:  # pyarrow.lib.ArrowInvalid and kin: not Parquet, or damaged
        raise HeadscoreError(f"{path}: not a Parquet file, or a damaged one ({_one_line(exc)})") from None
    return _file_examples(path, _arrow_columns, table, columns)


def is_dataset_dir(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    return path.is_dir() and any((path / name).is_file() for name in
                                 ("state.json", "dataset_info.json", "dataset_dict.json"))


def load_dataset_dir(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Example]:
    """Examples from a ``datasets`` directory (``Dataset.save_to_disk``); a DatasetDict's directory holds one
    directory per split: give one of those. ``columns`` as in :func:`load_csv`."""
    path = Path(path)
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise HeadscoreError(f"{path} holds a DatasetDict (splits {', '.join(splits) or 'none'}); give one split's "
                             f"directory, e.g. {path / (splits[0] if splits else 'train')}")
    datasets = _import("datasets", f"reading {path}")
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError, a damaged arrow file, a state.json of another version
        raise HeadscoreError(f"{path}: cannot load it as a datasets directory ({_one_line(exc)})") from None
    if not isinstance(dataset, datasets.Dataset):
        raise HeadscoreError(f"{path} holds a {type(dataset).__name__}; give one split's directory")
    return _file_examples(path, table_columns, dataset, columns)


def _file_examples(path: Path, read_columns, data, columns: Mapping[str, str] | None) -> list[Example]:
    """Examples from ``read_columns(data)``, a column problem named with the file ``path``."""
    try:
        table = read_columns(data)
    except HeadscoreError as exc:
        raise HeadscoreError(f"{path}: {exc}") from None
    return examples_from_columns(table, source=str(path), mapping=columns)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__
