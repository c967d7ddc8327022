"""Prompt and target tokens as the model sees the joined text: BOS once, no EOS between prompt and target,
a target's first token as it follows the prompt (tokenize_examples against the tokenizer's own joined text)."""

from __future__ import annotations

import string

import pytest
from tokenizers import Tokenizer, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from headscore.data.batching import tokenize_examples
from headscore.data.examples import Example
from headscore.errors import HeadscoreError

WORDS = ["▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "▁London", "▁Rome", "[", "]", "INST", "/"]


def sentencepiece_like(*, eos_after: bool = False) -> PreTrainedTokenizerFast:
    """A tokenizer with the pipeline of Llama-2's and Mistral-7B-v0.1's tokenizer.json: a normaliser that
    prepends the word boundary '▁' to every text, '<s>' put before a text (and '</s>' after it with
    ``eos_after``, as some fine-tunes ship), a chat template that writes the BOS token as text."""
    chars = ["▁"] + list(string.ascii_letters + string.digits + ".,:?!'/[]\n")
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(w, -1.0) for w in WORDS] + \
        [(c, -5.0) for c in dict.fromkeys(chars)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    single = "<s> $A </s>" if eos_after else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"
    return fast


def tokens(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(list(ids))


def test_target_with_a_leading_space_gets_the_joined_texts_tokens():
    tok = sentencepiece_like()
    ex = Example("The capital of France is", " Paris", "t", foil=" London", corrupt="The capital of France is")
    (item,) = tokenize_examples([ex], tok, ["t"])
    joined = tok(ex.prompt + ex.target)["input_ids"]
    assert list(item.ids) == joined
    assert tokens(tok, item.ids[-item.num_target:]) == ["▁Paris"]  # alone: ['▁', '▁Paris']
    assert tok.convert_ids_to_tokens(item.foil_id) == "▁London"
    assert list(item.corrupt_ids) == joined


def test_foil_sharing_only_the_lone_boundary_token_is_accepted():
    """Tokenised alone, every ' Name' starts with the same lone '▁': a logit difference was refused for all."""
    tok = sentencepiece_like()
    assert tokens(tok, tok(" Rome", add_special_tokens=False)["input_ids"])[0] == "▁"
    (item,) = tokenize_examples([Example("The capital of France is", " Paris", "t", foil=" Rome")], tok, ["t"])
    assert tok.convert_ids_to_tokens(item.foil_id) == "▁Rome"


def test_no_eos_between_prompt_and_target():
    tok = sentencepiece_like(eos_after=True)
    ex = Example("The capital of France is", " Paris", "t")
    assert tokens(tok, tok(ex.prompt)["input_ids"])[-1] == "</s>"
    (item,) = tokenize_examples([ex], tok, ["t"])
    assert list(item.ids) == [tok.bos_token_id] + tok(ex.prompt + ex.target, add_special_tokens=False)["input_ids"]
    assert item.prompt_length == 6


def test_an_empty_prompt_gets_the_bos_and_no_eos():
    """An empty prompt is the special tokens a tokenizer puts before a text (it kept the EOS after one too, and
    the target was scored after an EOS)."""
    tok = sentencepiece_like(eos_after=True)
    assert tokens(tok, tok("")["input_ids"]) == ["<s>", "</s>"]
    (item,) = tokenize_examples([Example("", "The capital", "t")], tok, ["t"])
    assert list(item.ids[:item.prompt_length]) == [tok.bos_token_id]
    assert list(item.ids) == [tok.bos_token_id] + tok("The capital", add_special_tokens=False)["input_ids"]


def test_chat_template_prompt_gets_one_bos():
    tok = sentencepiece_like()
    prompt = tok.apply_chat_template([{"role": "user", "content": "The capital of France"}], tokenize=False)
    assert prompt.startswith("<s>")
    (item,) = tokenize_examples([Example(prompt, "Paris", "t")], tok, ["t"])
    reference = tok.apply_chat_template([{"role": "user", "content": "The capital of France"}], tokenize=True)
    reference = list(reference["input_ids"] if hasattr(reference, "keys") else reference)
    assert reference[:2] != [tok.bos_token_id] * 2
    assert list(item.ids[:item.prompt_length]) == reference
    assert list(item.ids) == tok(prompt + "Paris", add_special_tokens=False)["input_ids"]


def test_encoder_inputs_keep_every_special_token():
    tok = sentencepiece_like(eos_after=True)
    (item,) = tokenize_examples([Example("The capital of France is", "", "t", label=1)], tok, ["t"])
    assert list(item.ids) == tok("The capital of France is")["input_ids"]
    assert tokens(tok, item.ids)[-1] == "</s>"


def test_corrupted_prompt_of_another_length_still_refused():
    tok = sentencepiece_like()
    with pytest.raises(HeadscoreError, match="same length"):
        tokenize_examples([Example("The capital of France is", " Paris", "t", corrupt="The capital is")], tok, ["t"])


def test_a_pad_token_the_model_has_no_embedding_for_is_not_used():
    """A pad token added to the tokenizer without resizing the model: padding takes another id (it is masked)."""
    import torch
    from tiny import VOCAB, ByteTokenizer, random_examples, tiny_model

    import headscore

    class AddedPad(ByteTokenizer):
        pad_token_id = VOCAB  # one past the embedding

    lm = tiny_model(dtype=torch.float64)
    examples = random_examples(6)
    reference = headscore.score(lm, examples, batch_size=3, progress=False)
    lm.tokenizer = AddedPad()
    assert lm.pad_id == AddedPad.eos_token_id
    scores = headscore.score(lm, examples, batch_size=3, progress=False)
    torch.testing.assert_close(scores.values, reference.values, rtol=0, atol=0)


def test_a_prompt_that_splits_the_target_from_its_space_is_warned_about():
    tok = sentencepiece_like()
    with pytest.warns(UserWarning, match=r"1 example\(s\), the first example 0 .* tokenise otherwise apart"):
        (item,) = tokenize_examples([Example("The capital of France is ", "Paris", "t")], tok, ["t"])
    assert tokens(tok, item.ids)[-2] == "▁"  # the prompt's own trailing space, a token the joined text lacks
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_examples([Example("The capital of France is", " Paris", "t")], tok, ["t"])
