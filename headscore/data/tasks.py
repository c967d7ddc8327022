"""``load_tasks(spec)``: the examples a user names: ``builtin``, ``ioi``, ``cogqa:PATH`` or a JSONL file."""

from __future__ import annotations

from pathlib import Path

from .builtin import builtin_suite
from .cogqa import load_cogqa
from .examples import Example, load_jsonl
from .ioi import IOI_NAME, ioi_suite

COGQA_PREFIX = "cogqa:"


def task_source(spec: str) -> Path | None:
    """The file a task spec reads (None for ``builtin`` and ``ioi``), e.g. to keep outputs from overwriting it."""
    if spec in ("builtin", IOI_NAME):
        return None
    return Path(spec[len(COGQA_PREFIX):] if spec.startswith(COGQA_PREFIX) else spec)


def load_tasks(spec: str) -> list[Example]:
    """Examples from ``builtin`` (the built-in suite), ``ioi`` (the built-in indirect-object-identification
    suite with corrupted prompts and foils, :func:`~headscore.data.ioi.ioi_suite`), ``cogqa:PATH`` (a CogQA
    JSON file) or a JSONL path."""
    if spec == "builtin":
        return builtin_suite()
    if spec == IOI_NAME:
        return ioi_suite()
    if spec.startswith(COGQA_PREFIX):
        return list(load_cogqa(spec[len(COGQA_PREFIX):]))
    return load_jsonl(spec)
