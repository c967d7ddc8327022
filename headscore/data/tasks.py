"""``load_tasks(spec)``: the examples a user names: ``builtin``, ``ioi``, ``cogqa:PATH``, a JSONL, CSV or Parquet
file, or a ``datasets`` directory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import HeadscoreError
from .builtin import builtin_suite
from .cogqa import load_cogqa
from .examples import Example, load_jsonl
from .ioi import IOI_NAME, ioi_suite
from .tables import TABLE_SUFFIXES, is_dataset_dir, load_csv, load_dataset_dir, load_parquet

COGQA_PREFIX = "cogqa:"


def task_source(spec: str) -> Path | None:
    """The file a task spec reads (None for ``builtin`` and ``ioi``), e.g. to keep outputs from overwriting it."""
    if spec in ("builtin", IOI_NAME):
        return None
    return Path(spec[len(COGQA_PREFIX):] if spec.startswith(COGQA_PREFIX) else spec)


def load_tasks(spec: str, columns: Mapping[str, str] | None = None) -> list[Example]:
    """Examples from ``builtin`` (the built-in suite), ``ioi`` (the built-in indirect-object-identification
    suite with corrupted prompts and foils, :func:`~headscore.data.ioi.ioi_suite`), ``cogqa:PATH`` (a CogQA
    JSON file), a ``.csv``, ``.tsv`` or ``.parquet`` file or a ``datasets`` directory (``Dataset.save_to_disk``;
    see :mod:`~headscore.data.tables`), or else a JSON Lines file (a ``.json`` file may also hold one JSON array of
    the same objects).

    ``columns`` maps fields to a table's columns of other names (``{"prompt": "question"}``); only for a
    CSV, Parquet or ``datasets`` source (HeadscoreError for the others)."""
    path = Path(spec)
    special = spec in ("builtin", IOI_NAME) or spec.startswith(COGQA_PREFIX)
    table = not special and (is_dataset_dir(path) or (path.suffix.lower() in TABLE_SUFFIXES and not path.is_dir()))
    if columns is not None and not table:
        raise HeadscoreError(f"--columns names the columns of a .csv or .parquet file or a datasets directory; "
                             f"--tasks {spec} is none of these")
    if spec == "builtin":
        return builtin_suite()
    if spec == IOI_NAME:
        return ioi_suite()
    if spec.startswith(COGQA_PREFIX):
        return list(load_cogqa(spec[len(COGQA_PREFIX):]))
    if is_dataset_dir(path):
        return load_dataset_dir(path, columns)
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES and not path.is_dir():
        if suffix == ".parquet":
            return load_parquet(path, columns)
        return load_csv(path, columns, delimiter="\t" if suffix == ".tsv" else ",")
    return load_jsonl(spec)
