"""A built-in indirect-object-identification (IOI) counterfactual suite (``--tasks ioi``).

Each example is a sentence in the style of Wang et al. 2022 ("Interpretability in the Wild")::

    When Mary and John went to the store, John gave a drink to   -> target " Mary", foil " John"

The target is the indirect object (IO), the foil the subject (S), repeated in the second clause.
Half of the examples of a task name IO first in the first clause (ABBA), half S first (BABA).
``corrupt`` is the same sentence with three other names (the "ABC" corruption): two new names in
the first clause and a third new name as the repeated subject, so that neither the target nor the
foil occurs in it and the sentence carries no information about which name comes next.

Every name in :data:`NAMES` is a single token with a leading space in SmolLM2-135M's tokenizer, and
each task uses one template, so within a task every prompt and every corrupted prompt has the same
number of tokens (what ``baseline="corrupt"`` needs). The names were checked once with the real
tokenizer and are hard-coded; nothing here needs a tokenizer.

Measured on 2026-11-28 with SmolLM2-135M (the embedded default model, float32) on ``ioi_suite()``
(seed 0, 150 examples), the logit difference logit(first token of target) - logit(first token of
foil) at the last prompt position, with this command (torch.no_grad, one plain forward pass each)::

    lm = load_model()
    for ex in load_tasks("ioi"):
        t, f = (lm.tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in (ex.target, ex.foil))
        for text in (ex.prompt, ex.corrupt):
            logits = lm.model(torch.tensor([lm.tokenizer(text)["input_ids"]])).logits[0, -1]
            diff = float(logits[t] - logits[f])

    task             prompt: diff > 0   mean diff (ABBA / BABA)   corrupt: mean diff
    ioi-store        30/30              5.77 (4.94 / 6.59)         0.50
    ioi-party        30/30              5.02 (3.82 / 6.22)        -0.12
    ioi-school       30/30              5.05 (3.65 / 6.45)         0.02
    ioi-restaurant   30/30              4.61 (3.78 / 5.44)        -0.03
    ioi-office       29/30              4.77 (4.24 / 5.30)         0.05
    all             149/150 (99.3%)     5.04                       0.08 (sd 2.26 over examples)
"""

from __future__ import annotations

import random

from ..errors import HeadscoreError
from .examples import Example

IOI_NAME = "ioi"
"""The task spec of this suite: ``load_tasks("ioi")``."""

NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "James", "Michael", "David", "Sarah", "Emma", "Tom",
    "Anna", "Paul", "Peter", "Kate", "Lisa", "Jack", "Jane", "Susan", "Karen", "Linda",
    "Laura", "Rachel", "Emily", "Kevin", "Brian", "Steve", "Eric", "Adam", "Ryan", "Jason",
    "Andrew", "Amy", "Lucy", "Henry", "George", "Jerry", "Tim", "Nick", "Helen", "Patrick",
)
"""First names that are each one token with a leading space (``" Mary"``) in SmolLM2-135M's tokenizer."""

TEMPLATES: dict[str, str] = {
    "store": "When {A} and {B} went to the store, {S} gave a drink to",
    "party": "After {A} and {B} went to the party, {S} gave a gift to",
    "school": "While {A} and {B} were working at the school, {S} gave a book to",
    "restaurant": "When {A} and {B} had lunch at the restaurant, {S} handed the bill to",
    "office": "While {A} and {B} were working at the office, {S} sent an email to",
}
"""One template per task (``ioi-<key>``): ``{A}`` and ``{B}`` are the first clause's names, ``{S}`` the subject."""


def ioi_suite(per_task: int = 30, seed: int = 0) -> list[Example]:
    """IOI examples with corrupted prompts and foils: ``per_task`` for each template of :data:`TEMPLATES`.

    Each example draws five different names from :data:`NAMES`: the indirect object (the target),
    the subject (the foil) and three names for the corrupted prompt. Examples alternate between
    the ABBA order (IO first in the first clause; even positions within a task) and BABA (S first).
    The same ``seed`` gives the same examples; tasks are named ``ioi-<template key>``.
    """
    if per_task < 1:
        raise HeadscoreError(f"IOI examples per task must be at least 1, got {per_task}")
    rng = random.Random(seed)
    examples = []
    for word, template in TEMPLATES.items():
        for i in range(per_task):
            io, subject, c1, c2, c3 = rng.sample(NAMES, 5)
            first, second = (io, subject) if i % 2 == 0 else (subject, io)
            examples.append(Example(
                prompt=template.format(A=first, B=second, S=subject), target=f" {io}", task=f"ioi-{word}",
                corrupt=template.format(A=c1, B=c2, S=c3), foil=f" {subject}"))
    return examples
