"""Task examples: (prompt, target, task), optionally a corrupted prompt and a foil, and the JSONL loader."""

from __future__ import annotations

import difflib
import json
import math
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HeadscoreError
from ..text import lone_surrogate
from .text_files import parse_json, read_lines, read_utf8

REQUIRED_FIELDS = ("prompt", "target", "task")
OPTIONAL_FIELDS = ("corrupt", "foil")
"""JSONL fields an example may have beyond :data:`REQUIRED_FIELDS` (strings when present)."""
LABELLED_FIELDS = ("text", "label", "task")
"""JSONL fields of an example for a sequence classifier (an encoder such as BERT): text, its label, task."""
KNOWN_FIELDS = (*REQUIRED_FIELDS, *OPTIONAL_FIELDS, "text", "label")
"""Every field an example (JSONL line, table column) can fill; any other name is metadata, ignored, unless
:func:`misspelled_field` finds it too close to one of these."""
SIMILARITY = 0.75
"""How close (``difflib`` ratio, case ignored) an unknown name must be to a field the example lacks to be taken
for its misspelling: ``traget``, ``corupt``, ``corrupted``, ``Foil``, ``lable`` are; ``id``, ``source``,
``context``, ``output``, ``level`` are not."""

@dataclass(frozen=True)
class Example:
    """One scored example: by default the loss is the mean NLL of ``target``'s tokens given ``prompt``.

    Keyword-only, optional:

    - ``corrupt``: a corrupted version of the prompt with the same number of tokens (e.g. other
      names), whose head outputs are the baseline of ``baseline="corrupt"`` (attribution patching
      and activation patching);
    - ``foil``: a wrong answer, for contrastive metrics (``metric="logit-diff"``);
    - ``label``: for a sequence classifier (BERT, ModernBERT, ...): the class index (an int; a float for a
      regression head) of ``prompt``, the text; ``target`` is then empty and the loss is the classifier's
      own loss on the label. :meth:`labelled` builds one;
    - ``where`` says where the example came from, e.g. ``tasks.jsonl:12``; errors about the example
      name it. It takes no part in equality or the data hash.

    Every text must be valid Unicode (no lone surrogate); ``task`` is normalised to NFC and stripped of
    surrounding whitespace, so that ``café`` typed with a combining accent (NFD) and with ``é`` (NFC), or
    ``"geo "`` from a spreadsheet and ``"geo"``, name one task. Prompts and targets are kept as they are (the
    tokenizer sees what was written).
    """

    prompt: str
    target: str
    task: str
    corrupt: str | None = field(default=None, kw_only=True)
    foil: str | None = field(default=None, kw_only=True)
    label: int | float | None = field(default=None, kw_only=True)
    where: str | None = field(default=None, kw_only=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in REQUIRED_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise HeadscoreError(f"Example {name} must be a string, got {type(value).__name__} {value!r:.40}")
        for name in OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise HeadscoreError(f"Example {name} must be a string or None, got {type(value).__name__} "
                                     f"{value!r:.40}")
        for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
            value = getattr(self, name)
            bad = None if value is None else lone_surrogate(value)
            if bad:
                shown = "text" if name == "prompt" and self.label is not None else name
                if self.where is None:
                    raise HeadscoreError(f"Example {shown} has a lone surrogate ({bad}), which is not text")
                raise HeadscoreError(f"{self.where}: field {shown!r} has a lone surrogate ({bad}), which is not "
                                     "text; fix that \\u escape (a surrogate must come in a pair)")
        task = unicodedata.normalize("NFC", self.task).strip()
        if task != self.task:
            object.__setattr__(self, "task", task)
        if self.label is not None:
            if isinstance(self.label, bool) or not isinstance(self.label, (int, float)):
                raise HeadscoreError(f"Example label must be an int (a class) or a float (regression), got "
                                     f"{type(self.label).__name__} {self.label!r:.40}")
            if isinstance(self.label, float) and not math.isfinite(self.label):
                raise HeadscoreError(f"{self.where or 'Example'}: label must be a finite number, got {self.label}")
            if self.target or self.corrupt is not None or self.foil is not None:
                raise HeadscoreError("a labelled Example (for a sequence classifier) has text, label and task "
                                     "only: no target, corrupt or foil")

    @classmethod
    def labelled(cls, text: str, label: int | float, task: str, *, where: str | None = None) -> Example:
        """An example for a sequence classifier: ``text`` with its ``label`` (class index, or a float target
        of a regression head)."""
        return cls(text, "", task, label=label, where=where)

    @property
    def text(self) -> str:
        """The prompt, as a sequence classifier's examples call it."""
        return self.prompt

    def hash_row(self) -> tuple[str, ...]:
        """What the data hash covers: prompt, target and task, and corrupt and foil where given."""
        row = (self.prompt, self.target, self.task)
        if self.label is not None:
            return (*row, f"label={self.label!r}")
        if self.corrupt is None and self.foil is None:
            return row  # the hash of a plain example is what it was before these fields existed
        return (*row, self.corrupt or "", self.foil or "")

    def describe(self, index: int) -> str:
        """How errors name this example: its source location, else its position in the input."""
        return self.where or f"example {index}"


def validate_examples(examples: Sequence[Example], *, source: str = "examples") -> list[Example]:
    """Check that there is data, that every example has a non-empty target (or a label) and task, and that
    labelled and prompt/target examples are not mixed."""
    examples = list(examples)
    if not examples:
        raise HeadscoreError(f"{source}: no examples")
    kinds = set()
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise HeadscoreError(f"{source}: item {i} is {type(ex).__name__}, expected headscore.Example")
        where = ex.where or f"{source}: example {i}"
        kinds.add(ex.label is not None)
        if len(kinds) > 1:
            raise HeadscoreError(f"{where}: labelled examples (text, label) and prompt/target examples cannot be "
                                 "mixed in one run")
        if ex.label is not None:
            if not ex.prompt.strip():
                raise HeadscoreError(f"{where}: empty text")
        elif not ex.target.strip():
            raise HeadscoreError(f"{where}: empty target")
        if not ex.task.strip():
            raise HeadscoreError(f"{where}: empty task")
        if ex.foil is not None and ex.foil.strip() == ex.target.strip():
            raise HeadscoreError(f"{where}: foil {ex.foil!r} equals the target")
    return examples


def task_names(examples: Iterable[Example]) -> list[str]:
    """Task names in order of first appearance."""
    return list(dict.fromkeys(ex.task for ex in examples))


def expected_fields(present: Iterable[str]) -> tuple[str, ...]:
    """The fields an example with the fields ``present`` can have: a classifier's (text, label, task) when it has
    ``text`` or ``label`` and no ``prompt``, a prompt/target example's when it has ``prompt`` and neither of those,
    either kind's otherwise."""
    present = set(present)
    prompt, labelled = "prompt" in present, bool(present & {"text", "label"})
    if labelled and not prompt:
        return LABELLED_FIELDS
    if prompt and not labelled:
        return (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)
    return KNOWN_FIELDS


def misspelled_field(names: Iterable[str], present: Iterable[str]) -> tuple[str, str] | None:
    """The first of ``names`` (no field's name) that looks like a misspelling of a field the example lacks, with
    that field: ``("traget", "target")``; None when every name is plain metadata.

    A name counts when, lower-cased, it is within :data:`SIMILARITY` of a field of :func:`expected_fields` that
    is not in ``present``; a name close to a field the example has (``targets`` beside ``target``) does not."""
    present = set(present)
    absent = [f for f in expected_fields(present) if f not in present]
    for name in names:
        if name in KNOWN_FIELDS:
            continue
        match = difflib.get_close_matches(name.lower(), absent, n=1, cutoff=SIMILARITY)
        if match:
            return name, match[0]
    return None


def did_you_mean(name: str, fields: Sequence[str]) -> str:
    """``"; did you mean 'prompt'?"`` when ``name`` is within :data:`SIMILARITY` of one of ``fields`` (case
    ignored), else ``""``: the hint for an unknown field name in a message."""
    close = difflib.get_close_matches(str(name).lower(), list(fields), n=1, cutoff=SIMILARITY)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_field_names(record: dict, where: str) -> None:
    """HeadscoreError for a key of ``record`` that looks like a misspelled field (one line, with the field)."""
    typo = misspelled_field((k for k in record if isinstance(k, str)), (k for k in record if k in KNOWN_FIELDS))
    if typo:
        raise HeadscoreError(f"{where}: unknown field {typo[0]!r}; did you mean {typo[1]!r}? (other fields are "
                             "ignored, but not one this close to a field's name: rename it)")


def _labelled_from_record(record: dict, where: str) -> Example:
    missing = [k for k in LABELLED_FIELDS if k not in record]
    if missing:
        raise HeadscoreError(f"{where}: missing field(s) {', '.join(missing)}")
    extra = sorted(k for k in ("prompt", "target", *OPTIONAL_FIELDS) if record.get(k) is not None)
    if extra:
        raise HeadscoreError(f"{where}: a text/label example has no {', '.join(extra)}")
    text, label, task = record["text"], record["label"], record["task"]
    for k, v in (("text", text), ("task", task)):
        if not isinstance(v, str):
            raise HeadscoreError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
    if isinstance(label, bool) or not isinstance(label, (int, float)):
        raise HeadscoreError(f"{where}: field 'label' must be a number (a class index, or a float for regression), "
                             f"got {type(label).__name__}")
    if not text.strip():
        raise HeadscoreError(f"{where}: empty text")
    if not task.strip():
        raise HeadscoreError(f"{where}: empty task")
    return Example.labelled(text, label, task, where=where)


def _example_from_record(record: object, where: str) -> Example:
    if not isinstance(record, dict):
        raise HeadscoreError(f"{where}: expected a JSON object with {', '.join(REQUIRED_FIELDS)} (or "
                             f"{', '.join(LABELLED_FIELDS)})")
    _check_field_names(record, where)
    if record.get("label") is not None or ("text" in record and "prompt" not in record):  # null = absent
        return _labelled_from_record(record, where)
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise HeadscoreError(f"{where}: missing field(s) {', '.join(missing)}")
    values = {k: record[k] for k in REQUIRED_FIELDS if k in record}
    values.update({k: record[k] for k in OPTIONAL_FIELDS if record.get(k) is not None})  # null = absent
    for k, v in values.items():
        if not isinstance(v, str):
            raise HeadscoreError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
    if not values["target"].strip():
        raise HeadscoreError(f"{where}: empty target")
    if not values["task"].strip():
        raise HeadscoreError(f"{where}: empty task")
    if "foil" in values and values["foil"].strip() == values["target"].strip():
        raise HeadscoreError(f"{where}: foil {values['foil']!r} equals the target")
    return Example(**values, where=where)


def load_jsonl(path: str | Path) -> list[Example]:
    """Read examples from a JSON Lines file: one ``{"prompt", "target", "task"}`` object per line,
    optionally with ``"corrupt"`` (a corrupted prompt of the same token length) and ``"foil"``
    (a wrong answer); or, for a sequence classifier, ``{"text", "label", "task"}`` objects. Other fields are
    ignored (ids, sources), but one named close to a field the line lacks (``traget``, ``corupt``, ``Foil``:
    :func:`misspelled_field`) is refused, ``t.jsonl:3: unknown field 'corupt'; did you mean 'corrupt'?``, rather
    than dropped without a word (``--baseline corrupt`` would fail later without naming the typo).

    The file must be UTF-8 (a byte-order mark is allowed), with lines of at most
    :data:`~headscore.data.text_files.MAX_LINE_BYTES` (1 MiB). Blank lines are skipped. Errors
    name the file and line number, and so do later errors about an example (``Example.where``).
    The file is read once, start to end: a pipe (``--tasks <(cmd)``) works.
    """
    path = Path(path)
    if path.is_dir():
        raise HeadscoreError(f"{path} is a directory; give a JSON Lines file (one example per line), a .csv or "
                             ".parquet file, or a directory written by datasets' save_to_disk")
    if not path.exists():
        raise HeadscoreError(f"{path}: no such file")
    if path.suffix.lower() == ".json" and path.is_file():
        array = _json_array(path)
        if array is not None:
            return validate_examples(array, source=str(path))
    examples = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        record = parse_json(line, path, line=lineno)
        examples.append(_example_from_record(record, f"{path}:{lineno}"))
    return validate_examples(examples, source=str(path))


def _json_array(path: Path) -> list[Example] | None:
    """The examples of a ``.json`` file holding one JSON array of example objects (``path[3]`` names the fourth in
    errors), or None for a file that does not start with ``[`` (JSON Lines under a ``.json`` name)."""
    text = read_utf8(path)
    if not text.lstrip().startswith("["):
        return None
    records = parse_json(text, path)
    assert isinstance(records, list)  # the text starts with [
    return [_example_from_record(record, f"{path}[{i}]") for i, record in enumerate(records)]


def save_jsonl(examples: Iterable[Example], path: str | Path) -> None:
    """Write examples as JSON Lines (the format :func:`load_jsonl` reads)."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for ex in examples:
            if ex.label is not None:
                fh.write(json.dumps({"text": ex.prompt, "label": ex.label, "task": ex.task}) + "\n")
                continue
            record = {"prompt": ex.prompt, "target": ex.target, "task": ex.task}
            record.update({k: getattr(ex, k) for k in OPTIONAL_FIELDS if getattr(ex, k) is not None})
            fh.write(json.dumps(record) + "\n")


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

