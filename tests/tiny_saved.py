"""A tiny random model saved as a transformers directory with a character-level fast tokenizer.

``load_model(path)`` (and so the command line) loads it like any local model directory.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
import transformers

CHARS = string.ascii_letters + string.digits + string.punctuation + " "


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per character; ids 0 (pad/eos/unk) and 1 (bos) are special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<pad>",
                                                pad_token="<pad>", unk_token="<pad>")


def save_tiny_model(path: str | Path, *, layers: int = 3, heads: int = 4, seed: int = 0) -> Path:
    """Write a random-weight Llama (hidden size 8 per head) and its tokenizer to ``path``."""
    path = Path(path)
    tokenizer = char_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=heads * 8, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
