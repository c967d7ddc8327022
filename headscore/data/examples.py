"""Task examples: (prompt, target, task), and the JSONL loader."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HeadscoreError
from .text_files import read_utf8

REQUIRED_FIELDS = ("prompt", "target", "task")


@dataclass(frozen=True)
class Example:
    """One scored example: the loss is the mean NLL of ``target``'s tokens given ``prompt``.

    ``where`` (keyword only, optional) says where the example came from, e.g. ``tasks.jsonl:12``;
    errors about the example name it. It takes no part in equality or the data hash.
    """

    prompt: str
    target: str
    task: str
    where: str | None = field(default=None, kw_only=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in REQUIRED_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise HeadscoreError(f"Example {name} must be a string, got {type(value).__name__} {value!r:.40}")

    def describe(self, index: int) -> str:
        """How errors name this example: its source location, else its position in the input."""
        return self.where or f"example {index}"


def validate_examples(examples: Sequence[Example], *, source: str = "examples") -> list[Example]:
    """Check that there is data and that every example has a non-empty target and task."""
    examples = list(examples)
    if not examples:
        raise HeadscoreError(f"{source}: no examples")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise HeadscoreError(f"{source}: item {i} is {type(ex).__name__}, expected headscore.Example")
        where = ex.where or f"{source}: example {i}"
        if not ex.target.strip():
            raise HeadscoreError(f"{where}: empty target")
        if not ex.task.strip():
            raise HeadscoreError(f"{where}: empty task")
    return examples


def task_names(examples: Iterable[Example]) -> list[str]:
    """Task names in order of first appearance."""
    return list(dict.fromkeys(ex.task for ex in examples))


def _example_from_record(record: object, where: str) -> Example:
    if not isinstance(record, dict):
        raise HeadscoreError(f"{where}: expected a JSON object with {', '.join(REQUIRED_FIELDS)}")
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise HeadscoreError(f"{where}: missing field(s) {', '.join(missing)}")
    values = {k: record[k] for k in REQUIRED_FIELDS}
    for k, v in values.items():
        if not isinstance(v, str):
            raise HeadscoreError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
    if not values["target"].strip():
        raise HeadscoreError(f"{where}: empty target")
    if not values["task"].strip():
        raise HeadscoreError(f"{where}: empty task")
    return Example(**values, where=where)


def load_jsonl(path: str | Path) -> list[Example]:
    """Read examples from a JSON Lines file: one ``{"prompt", "target", "task"}`` object per line.

    The file must be UTF-8 (a byte-order mark is allowed). Blank lines are skipped. Errors
    name the file and line number, and so do later errors about an example (``Example.where``).
    """
    path = Path(path)
    if not path.is_file():
        raise HeadscoreError(f"{path}: no such file")
    examples = []
    for lineno, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HeadscoreError(f"{where}: malformed JSON ({exc.msg})") from None
        examples.append(_example_from_record(record, where))
    return validate_examples(examples, source=str(path))


def save_jsonl(examples: Iterable[Example], path: str | Path) -> None:
    """Write examples as JSON Lines (the format :func:`load_jsonl` reads)."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"prompt": ex.prompt, "target": ex.target, "task": ex.task}) + "\n")


def limit_per_task(examples: Sequence[Example], max_examples: int | None) -> list[Example]:
    """Keep at most ``max_examples`` examples of each task (first ones first)."""
    if max_examples is None:
        return list(examples)
    if max_examples < 1:
        raise HeadscoreError(f"max examples must be at least 1, got {max_examples}")
    seen: Counter[str] = Counter()
    kept = []
    for ex in examples:
        if seen[ex.task] < max_examples:
            seen[ex.task] += 1
            kept.append(ex)
    return kept

