"""CogQA ("Cognitive Mirrors", arXiv 2512.10978): every sub-question as an example of its cognitive function.

The file is a JSON list of ``{question, answer, generated: [{subquestion, answer, cognitive_skill}]}``.
Sub-question ``j`` of a question becomes one :class:`CogQAExample` whose prompt is the chain of
thought up to it::

    {question}

    Q: {subquestion 0}
    A: {answer 0}
    ...
    Q: {subquestion j}
    A:

and whose target is ``" " + answer j`` (a leading space, so that with byte-pair tokenizers the
answer tokenises as a continuation of ``"A:"``). The task is the sub-question's
``cognitive_skill``. Literal ``\\n`` escapes (backslash + n, as the file stores them inside
questions) become newlines; surrounding whitespace is stripped.

With ``chat_template=tokenizer`` the same text is sent as one user message through
``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` without the final ``"A:"``,
and the target is the answer without a leading space (it starts the assistant turn).

Each example keeps the index of its main question (``question_id``) and its position in
the chain (``step``), so :func:`split_by_question` can split by main question (no
sub-question of one question on both sides); :func:`split_indices_by_question` does the same
split on positions, for anything that can list its items' question ids.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import HeadscoreError
from ..text import lone_surrogate
from .examples import Example, validate_examples
from .text_files import parse_json, read_utf8

COGQA_FUNCTIONS = ("Retrieval", "Knowledge Recall", "Semantic Understanding", "Syntactic Understanding",
                   "Math Calculation", "Logical Reasoning", "Inference", "Decision-making")
"""The eight cognitive functions of the study (the order of the 2 x 4 grids)."""


@dataclass(frozen=True)
class CogQAExample(Example):
    """An :class:`Example` that remembers its main question (``question_id``) and chain position (``step``)."""

    question_id: int = -1
    step: int = 0


def unescape(text: object) -> str:
    """Literal backslash-n sequences to newlines; numbers to strings (a fraction is read as its text, so it
    stays as written); surrounding whitespace stripped."""
    return str(text).replace("\\n", "\n").strip()


def _read(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        raise HeadscoreError(f"{path} is a directory; give a CogQA JSON file")
    if not path.exists():
        raise HeadscoreError(f"{path}: no such CogQA file")
    data = parse_json(read_utf8(path), path, floats_as_text=True)  # read once: a pipe works; 0.00001 stays as written
    if not isinstance(data, list) or not data:
        raise HeadscoreError(f"{path}: expected a non-empty JSON list of questions")
    for i, q in enumerate(data):
        where = f"{path}: question {i}"
        if not isinstance(q, dict) or "question" not in q or not isinstance(q.get("generated"), list):
            raise HeadscoreError(f"{where}: expected an object with 'question' and a 'generated' list")
        for j, sub in enumerate(q["generated"]):
            if not isinstance(sub, dict) or any(k not in sub for k in ("subquestion", "answer", "cognitive_skill")):
                raise HeadscoreError(f"{where}, sub-question {j}: needs subquestion, answer and cognitive_skill")
            for k in ("subquestion", "answer", "cognitive_skill"):
                _check_text(sub[k], f"{where}, sub-question {j}", k)
        _check_text(q["question"], where, "question")
    return data


def _check_text(value: object, where: str, name: str) -> None:
    # an int of any size is finite (math.isfinite would convert it to a float: OverflowError past 1.8e308)
    number = not isinstance(value, bool) and (isinstance(value, int)
                                              or isinstance(value, float) and math.isfinite(value))
    if not isinstance(value, str) and not number:
        raise HeadscoreError(f"{where}: field {name!r} must be text (or a number), got "
                             f"{type(value).__name__} {str(value)[:40]}")
    bad = lone_surrogate(value) if isinstance(value, str) else None
    if bad:
        raise HeadscoreError(f"{where}: field {name!r} has a lone surrogate ({bad}), which is not text; fix that "
                             "\\u escape (a surrogate must come in a pair)")


def compose_prompt(question: str, steps: Sequence[tuple[str, str]], subquestion: str, *,
                   answer_cue: bool = True) -> str:
    """The chain-of-thought prompt: question, earlier (sub-question, answer) pairs, the current sub-question."""
    lines = [question, ""]
    for sq, ans in steps:
        lines += [f"Q: {sq}", f"A: {ans}"]
    lines.append(f"Q: {subquestion}")
    if answer_cue:
        lines.append("A:")
    return "\n".join(lines)


def load_cogqa(path: str | Path, *, min_examples: int = 10, chat_template=None,
               functions: Sequence[str] | None = None) -> list[CogQAExample]:
    """Read a CogQA JSON file: one example per sub-question (see the module docstring for the format).

    Args:
        path: the JSON file.
        min_examples: labels with fewer examples are dropped (with a ``warnings.warn`` naming them).
        chat_template: None (plain text prompt) or a tokenizer whose ``apply_chat_template`` wraps
            the prompt as one user turn.
        functions: keep only these labels (after the rare-label filter).

    Raises:
        HeadscoreError: missing or malformed file, or no example left.
    """
    data = _read(path)
    examples: list[CogQAExample] = []
    for qi, q in enumerate(data):
        question = unescape(q["question"])
        done: list[tuple[str, str]] = []
        for step, sub in enumerate(q["generated"]):
            sq, ans, skill = unescape(sub["subquestion"]), unescape(sub["answer"]), unescape(sub["cognitive_skill"])
            for name, value in (("answer", ans), ("cognitive_skill", skill)):
                if not value:  # an example needs a target and a label (a JSONL line is refused alike)
                    raise HeadscoreError(f"{path}: question {qi}, sub-question {step}: empty {name}")
            if chat_template is None:
                prompt, target = compose_prompt(question, done, sq), " " + ans
            else:
                text = compose_prompt(question, done, sq, answer_cue=False)
                try:
                    prompt = chat_template.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                               add_generation_prompt=True)
                except Exception as exc:  # tokenizers without a template raise ValueError and others
                    raise HeadscoreError(f"the tokenizer cannot apply a chat template ({exc})") from None
                target = ans
            done.append((sq, ans))
            examples.append(CogQAExample(prompt, target, skill, question_id=qi, step=step,
                                         where=f"{path}: question {qi}, sub-question {step}"))
    counts = Counter(ex.task for ex in examples)
    rare = sorted(t for t, n in counts.items() if n < min_examples)
    if rare:
        warnings.warn(f"CogQA: dropped labels with fewer than {min_examples} examples: "
                      + ", ".join(f"{t} ({counts[t]})" for t in rare), stacklevel=2)
        examples = [ex for ex in examples if ex.task not in rare]
    if functions is not None:
        unknown = [f for f in functions if f not in counts or f in rare]
        if unknown:
            raise HeadscoreError(f"{path}: no (or too few) examples of {', '.join(unknown)}")
        keep = set(functions)
        examples = [ex for ex in examples if ex.task in keep]
    return validate_examples(examples, source=str(path))


def _question_key(item, i: int) -> int:
    qid = getattr(item, "question_id", None)
    return i if qid is None else qid


def split_indices_by_question(question_ids: Sequence, fraction: float = 0.8,
                              seed: int = 0) -> tuple[list[int], list[int]]:
    """Split positions ``0 .. len(question_ids) - 1`` by MAIN question, seeded: ``(first, second)``.

    ``question_ids[i]`` is the main question of item i (any sortable keys, e.g. from
    :func:`question_ids`). ``fraction`` of the distinct questions (rounded, at least one on each
    side when there are two or more) go to the first part; all items of a question land on the
    same side. Each part lists its positions in increasing order.
    """
    if not 0.0 < fraction < 1.0:
        raise HeadscoreError(f"split fraction must be between 0 and 1, got {fraction}")
    keys = list(question_ids)
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise HeadscoreError("splitting by question needs at least two distinct questions")
    rng = random.Random(seed)
    rng.shuffle(distinct)
    n_first = min(max(1, round(fraction * len(distinct))), len(distinct) - 1)
    first = set(distinct[:n_first])
    return [i for i, k in enumerate(keys) if k in first], [i for i, k in enumerate(keys) if k not in first]


def split_by_question(items: Sequence, fraction: float = 0.8, seed: int = 0) -> tuple[list, list]:
    """Split CogQA examples (or the raw question dicts) by MAIN question, seeded.

    ``fraction`` of the distinct questions (rounded, at least one on each side when there are two
    or more) go to the first part; all sub-questions of a question land on the same side. Raw
    question dicts (no ``question_id``) are split as they are. Order within each part is kept.
    The items at the positions :func:`split_indices_by_question` gives for :func:`question_ids`.
    """
    items = list(items)
    first, second = split_indices_by_question(question_ids(items), fraction, seed)
    return [items[i] for i in first], [items[i] for i in second]


def sample_per_function(examples: Sequence[CogQAExample], max_per_function: int | None,
                        seed: int = 0) -> list[CogQAExample]:
    """At most ``max_per_function`` examples of each label, drawn at random (seeded); order kept."""
    if max_per_function is None:
        return list(examples)
    if max_per_function < 1:
        raise HeadscoreError(f"max per function must be at least 1, got {max_per_function}")
    rng = random.Random(seed)
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(i)
    keep: set[int] = set()
    for idx in by_task.values():
        keep.update(rng.sample(idx, min(max_per_function, len(idx))))
    return [ex for i, ex in enumerate(examples) if i in keep]


def question_ids(examples: Sequence) -> list[int]:
    """The main-question index of each example (its position for a plain :class:`Example` or a raw dict)."""
    return [_question_key(ex, i) for i, ex in enumerate(examples)]
