"""Tiny random-weight causal LMs of several families and a byte tokenizer, for fast tests."""

from __future__ import annotations

import torch
import transformers

from headscore.data.examples import Example
from headscore.models import LoadedModel

VOCAB = 96
# family -> (model class, config class, attention implementations it supports)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", ("sdpa", "eager")),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", ("sdpa", "eager")),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", ("sdpa", "eager")),
    "mistral": ("MistralForCausalLM", "MistralConfig", ("sdpa", "eager")),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", ("eager",)),
}


class ByteTokenizer:
    """Maps each UTF-8 byte to a token id below VOCAB; id 1 is a BOS token added to prompts."""

    pad_token_id = 0
    eos_token_id = 0
    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [2 + b % (VOCAB - 2) for b in text.encode()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def tiny_model(family: str = "llama", *, layers: int = 3, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
               attn: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """A random-weight model of ``family`` wrapped as a LoadedModel with the byte tokenizer."""
    model_cls, config_cls, impls = FAMILIES[family]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)._from_config(config, attn_implementation=attn or impls[0])
    # Larger weights than the default init make heads matter, so tests see non-trivial gradients.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return LoadedModel(model.to(dtype).eval(), ByteTokenizer(), f"tiny-{family}")


def random_examples(n: int, tasks: tuple[str, ...] = ("alpha", "beta", "gamma"), seed: int = 0) -> list[Example]:
    """Random-text examples of varied lengths (so batches need padding), tasks interleaved."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghij klmnopqrstuvwxyz"

    def text(lo: int, hi: int) -> str:
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return "".join(letters[int(i)] for i in torch.randint(0, len(letters), (k,), generator=g))

    return [Example(text(3, 20), text(1, 5), tasks[i % len(tasks)]) for i in range(n)]


def counting_bars() -> tuple[type, list]:
    """A stand-in for tqdm (monkeypatch it where a module imported tqdm) and the list of the bars it made, each
    with the ``total``, ``desc`` and ``disable`` it was given and ``n``, the sum of its updates."""
    bars: list = []

    class Bar:
        def __init__(self, *args, total=0, desc="", disable=False, **kwargs):
            self.total, self.desc, self.disable, self.n = total, desc, disable, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    return Bar, bars
