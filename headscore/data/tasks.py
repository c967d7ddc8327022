"""``load_tasks(spec)``: the examples a user names: ``builtin``, ``cogqa:PATH`` or a JSONL file."""

from __future__ import annotations

from pathlib import Path

from .builtin import builtin_suite
from .cogqa import load_cogqa
from .examples import Example, load_jsonl

COGQA_PREFIX = "cogqa:"


def task_source(spec: str) -> Path | None:
    """The file a task spec reads (None for ``builtin``), e.g. to keep outputs from overwriting it."""
    if spec == "builtin":
        return None
    return Path(spec[len(COGQA_PREFIX):] if spec.startswith(COGQA_PREFIX) else spec)


def load_tasks(spec: str) -> list[Example]:
    """Examples from ``builtin`` (the built-in suite), ``cogqa:PATH`` (a CogQA JSON file) or a JSONL path."""
    if spec == "builtin":
        return builtin_suite()
    if spec.startswith(COGQA_PREFIX):
        return list(load_cogqa(spec[len(COGQA_PREFIX):]))
    return load_jsonl(spec)
