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
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<pad>",
                                                pad_token="<pad>", unk_token="<pad>")
    # a chat template, as the embedded model has (saved as chat_template.jinja, which a sound cache holds)
    fast.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
    return fast


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


def _tiny_config(family: str, vocab: int):
    """A tiny config of a family whose quirks the engine must follow (experts, sinks, latent attention)."""
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=0)
    if family == "gpt-oss":  # attention sinks, a sliding-window layer, experts; no SDPA attention
        return transformers.GptOssConfig(
            **common, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=16, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "qwen3-moe":  # experts (grouped matmul)
        return transformers.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
                                           num_experts=4, num_experts_per_tok=2)
    if family == "deepseek-v3":  # multi-head latent attention: value head dim 6, query/key 4 + 8; experts
        return transformers.DeepseekV3Config(
            **common, num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4,
            qk_nope_head_dim=8, v_head_dim=6, n_group=1, topk_group=1)
    if family == "bert":  # encoder, sequence classifier of 3 classes
        return transformers.BertConfig(**{**common, "num_hidden_layers": 2}, num_labels=3, type_vocab_size=1)
    if family == "modernbert":  # encoder with alternating global / local (sliding) attention, 3 classes
        return transformers.ModernBertConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=0, cls_token_id=1,
            sep_token_id=0, local_attention=4, global_attn_every_n_layers=2, num_labels=3)
    raise ValueError(f"no tiny config for {family!r}")


TINY_FAMILIES = ("gpt-oss", "qwen3-moe", "deepseek-v3", "bert", "modernbert")
CLASSIFIERS = {"bert": "BertForSequenceClassification", "modernbert": "ModernBertForSequenceClassification"}
"""Families saved as sequence classifiers (scored on labelled examples)."""


def save_tiny_family(path: str | Path, family: str, *, seed: int = 0) -> Path:
    """Write a random-weight tiny model of ``family`` (one of :data:`TINY_FAMILIES`) with the character
    tokenizer to ``path``; weights drawn larger than the default init, so heads matter."""
    path = Path(path)
    tokenizer = char_tokenizer()
    config = _tiny_config(family, len(tokenizer))
    torch.manual_seed(seed)
    if family in CLASSIFIERS:
        model = getattr(transformers, CLASSIFIERS[family])(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
