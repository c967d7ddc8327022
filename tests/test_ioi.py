"""The built-in IOI suite: its structure, and token lengths under SmolLM2-135M's real tokenizer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from headscore.data.examples import task_names, validate_examples
from headscore.data.ioi import IOI_NAME, NAMES, TEMPLATES, ioi_suite
from headscore.data.tasks import load_tasks, task_source
from headscore.errors import HeadscoreError

NAME_RE = re.compile(r"\b(" + "|".join(NAMES) + r")\b")


def names_in(text: str) -> list[str]:
    """The names of NAMES in ``text``, in order."""
    return NAME_RE.findall(text)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M's tokenizer without converting the model: from the cached conversion when there is
    one (seconds), else straight from the embedded GGUF file (about 20 s)."""
    from transformers import AutoTokenizer

    from headscore import models

    cached = models.cache_dir() / "models" / models.DEFAULT_MODEL
    if (cached / "tokenizer_config.json").is_file() and (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached, local_files_only=True)
    try:
        gguf = models._gguf_source(*models.EMBEDDED_MODELS[models.DEFAULT_MODEL])
    except HeadscoreError as exc:
        pytest.skip(f"SmolLM2-135M's tokenizer is not available (no cached conversion, and {exc})")
    pytest.importorskip("gguf", reason="reading the tokenizer from the embedded GGUF file needs the gguf package")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_suite_size_tasks_and_registration():
    examples = ioi_suite()
    assert len(examples) >= 100 and len(examples) == 30 * len(TEMPLATES)
    assert len(TEMPLATES) >= 4 and len(NAMES) >= 30 and len(set(NAMES)) == len(NAMES)
    assert task_names(examples) == [f"ioi-{word}" for word in TEMPLATES]
    assert set(Counter(ex.task for ex in examples).values()) == {30}
    assert validate_examples(examples) == examples
    assert all(ex.corrupt is not None and ex.foil is not None for ex in examples)
    assert IOI_NAME == "ioi" and load_tasks("ioi") == examples and task_source("ioi") is None
    assert Counter(ex.task for ex in ioi_suite(per_task=3)) == {f"ioi-{word}": 3 for word in TEMPLATES}
    with pytest.raises(HeadscoreError, match="at least 1"):
        ioi_suite(per_task=0)


def test_deterministic_for_a_seed():
    assert ioi_suite(seed=0) == ioi_suite(seed=0) == ioi_suite()
    assert ioi_suite(seed=7) == ioi_suite(seed=7)
    assert ioi_suite(seed=1) != ioi_suite(seed=0)


def test_targets_foils_and_abc_corruption():
    for ex in ioi_suite():
        io, subject = ex.target[1:], ex.foil[1:]
        assert ex.target == f" {io}" and ex.foil == f" {subject}" and io in NAMES and subject in NAMES
        assert ex.target != ex.foil
        first, second, repeated = names_in(ex.prompt)
        assert {first, second} == {io, subject} and repeated == subject, ex
        c1, c2, c3 = names_in(ex.corrupt)
        assert len({c1, c2, c3}) == 3 and not {c1, c2, c3} & {io, subject}, ex
        # the same sentence, names aside
        template = TEMPLATES[ex.task.removeprefix("ioi-")]
        assert ex.prompt == template.format(A=first, B=second, S=repeated)
        assert ex.corrupt == template.format(A=c1, B=c2, S=c3)


def test_abba_and_baba_about_half_each():
    for task in task_names(ioi_suite()):
        orders = Counter("ABBA" if names_in(ex.prompt)[0] == ex.target[1:] else "BABA"
                         for ex in ioi_suite() if ex.task == task)
        assert orders["ABBA"] == orders["BABA"] == 15, (task, orders)


def test_single_token_names_and_equal_lengths(smollm2_tokenizer):
    tok = smollm2_tokenizer
    multi = [n for n in NAMES if len(tok(f" {n}", add_special_tokens=False)["input_ids"]) != 1]
    assert not multi, f"not one token with a leading space: {multi}"
    for seed in (0, 3):  # the default suite, and another seed's pairs of names
        lengths: dict[str, set[int]] = {}
        for ex in ioi_suite(seed=seed):
            lengths.setdefault(ex.task, set()).update(
                {len(tok(ex.prompt)["input_ids"]), len(tok(ex.corrupt)["input_ids"])})
            for answer in (ex.target, ex.foil):
                assert len(tok(answer, add_special_tokens=False)["input_ids"]) == 1
        assert all(len(v) == 1 for v in lengths.values()), (seed, lengths)


def test_smollm2_tokens_are_the_prompt_and_target_tokenised_apart(smollm2_tokenizer):
    """SmolLM2's byte-level BPE adds no special token and splits before a leading space: the joined text's
    target tokens are the target's own, so the built-in suites' ids are those of prompt and target apart."""
    from headscore.data.batching import tokenize_examples
    from headscore.data.builtin import builtin_suite

    tok = smollm2_tokenizer
    examples = builtin_suite() + ioi_suite()
    items = tokenize_examples(examples, tok, task_names(examples))
    for ex, item in zip(examples, items, strict=True):
        apart = tok(ex.prompt)["input_ids"] + tok(ex.target, add_special_tokens=False)["input_ids"]
        assert list(item.ids) == apart, ex
        if ex.foil is not None:
            assert item.foil_id == tok(ex.foil, add_special_tokens=False)["input_ids"][0]
