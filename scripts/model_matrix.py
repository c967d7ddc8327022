"""The model compatibility matrix: every causal LM family of the installed transformers, checked tiny.

    python scripts/model_matrix.py [--families gpt2,llama4,...] [--implementations eager,sdpa]
                                   [--flex ci|all|none|FAMILIES] [--json OUT.json] [--markdown docs/models.md]

For each model type of ``MODEL_FOR_CAUSAL_LM_MAPPING`` (and the BERT/ModernBERT sequence classifiers), a
tiny random config is built from the family's own config class (:func:`tiny_config`: 2-4 layers of 4 heads
of 8 dims, a 128-token vocabulary; the family's quirks kept: grouped-query ratio, latent-attention dims,
sliding windows and chunks, sinks, soft-capping, experts, every distinct layer type), the model is built in
float64 with random weights, and :func:`headscore.model_check.check_model` runs for eager and sdpa, and
flex_attention for the CI families (``--flex``; compiling FlexAttention for a CPU takes 5-40 s a model).
The results go to a JSON file and the markdown table in ``docs/models.md``; the full sweep takes about
10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

LAYERS = 2
HIDDEN = 32
HEADS = 4
HEAD_DIM = 8
VOCAB = 128
SPECIAL_BASE = 120
"""Token ids a config reserves beyond pad/bos/eos (image, audio tokens) are put at 120 and up."""

ENCODER_CLASSIFIERS = {"bert": "BertForSequenceClassification", "modernbert": "ModernBertForSequenceClassification"}
"""Encoder families checked as sequence classifiers (scored against their own loss from labels)."""

# Set when the default config has the attribute (value None in the default keeps None).
_SIZES = {
    "hidden_size": HIDDEN, "num_attention_heads": HEADS, "intermediate_size": 48, "ffn_hidden_size": 48,
    "vocab_size": VOCAB, "max_position_embeddings": 256, "n_inner": 48,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "expert_intermediate_size": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 6,
    "sliding_window": 4, "attention_chunk_size": 4, "window_size": 4,
    "index_topk": 4,  # a sparse model's top-k keys (DeepSeek-V3.2's indexer): fewer than a batch's tokens
    "rope_scaling": None, "local_attention": 4, "rotary_dim": 4,
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,  # Gemma 3n / 4 per-layer embeddings
    # encoder-decoder families' causal LMs (BART-style) run their decoder
    "decoder_layers": 2, "encoder_layers": 1, "decoder_attention_heads": HEADS, "encoder_attention_heads": HEADS,
    "decoder_ffn_dim": 48, "encoder_ffn_dim": 48,
}
_SUB_SIZES = {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "intermediate_size": 48,
              "num_hidden_layers": 1, "depth": 1, "num_layers": 1, "vocab_size": VOCAB}
"""Non-text sub-configs (vision, audio): shrunk only so that the model builds small; they never run."""


def _layer_selection(config, layers: int) -> list[int] | None:
    """Indices of the layers to keep: the first of each distinct layer type, at least LAYERS of them."""
    pattern = None
    for key in ("layer_types", "layers_block_type", "block_types"):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == layers:
            pattern = list(value)
            break
    if pattern is None:
        return None
    firsts = list(dict.fromkeys(pattern))
    keep = [pattern.index(t) for t in firsts]
    for i in range(layers):
        if len(keep) >= LAYERS:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _shrink(config_class, default, *, text: bool, extra: dict | None = None):
    """A config of ``config_class`` with the sizes of this module, built through its own constructor."""
    attrs = dict(vars(default))
    for key in getattr(default, "attribute_map", {}):
        if hasattr(default, key):
            attrs.setdefault(key, getattr(default, key))
    kwargs: dict = {}
    amap = getattr(default, "attribute_map", {})
    attrs = {k: v for k, v in attrs.items()  # derived attributes (properties) cannot be passed
             if not isinstance(getattr(type(default), amap.get(k, k), None), property)}
    sizes = _SIZES if text else _SUB_SIZES
    for key, value in sizes.items():
        if key in attrs and not (attrs[key] is None and value is not None):
            kwargs[key] = value
    if text:
        layers = attrs.get("num_hidden_layers")
        if isinstance(layers, int):
            keep = _layer_selection(default, layers) or list(range(min(LAYERS, layers)))
            kwargs["num_hidden_layers"] = len(keep)
            for key, value in attrs.items():  # every per-layer list or pattern string, cut to the kept layers
                if key in ("layer_types", "layers_block_type", "block_types") or (
                        isinstance(value, (list, tuple)) or (isinstance(value, str) and "pattern" in key)) and (
                        len(value) == layers and layers > 2 and key not in kwargs):
                    if isinstance(value, str):
                        kwargs[key] = "".join(value[i] for i in keep)
                    elif isinstance(value, (list, tuple)) and "heads" in key:  # per-layer head counts: shrunk
                        kwargs[key] = type(value)(HEADS for _ in keep)
                    elif isinstance(value, (list, tuple)):
                        kwargs[key] = type(value)(value[i] for i in keep)
        heads = attrs.get("num_attention_heads")
        kv = attrs.get("num_key_value_heads")
        if "num_key_value_heads" in attrs and isinstance(heads, int):
            kwargs["num_key_value_heads"] = HEADS if kv in (None, heads) else HEADS // 2
        if "head_dim" in attrs and attrs["head_dim"] is not None:  # latent attention: head_dim is the rope part
            kwargs["head_dim"] = _SIZES["qk_rope_head_dim"] if "qk_rope_head_dim" in attrs else HEAD_DIM
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if key in attrs and isinstance(attrs[key], int):
                kwargs[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
            elif key in attrs and isinstance(attrs[key], list):
                kwargs[key] = [2]
    extra_ids = SPECIAL_BASE
    for key, value in attrs.items():
        if key.endswith(("_token_id", "_token_index")) and isinstance(value, int) and key not in kwargs and value >= 3:
            kwargs[key] = min(extra_ids, VOCAB - 1)
            extra_ids += 1
    for key in getattr(default, "sub_configs", {}):
        sub_default = getattr(default, key, None)
        if sub_default is None or not hasattr(sub_default, "to_dict"):
            continue
        is_text = key in ("text_config", "decoder_config", "language_config")
        if not is_text and not any(hasattr(sub_default, k) for k in ("num_hidden_layers", "depth", "num_layers")):
            continue  # not a tower (DBRX's attention and FFN settings): the defaults fit
        sub = _shrink(type(sub_default), sub_default, text=is_text)
        kwargs[key] = sub.to_dict() if not is_text else sub
    for key in extra or {}:  # an override wins over the shrink's value under another name (attribute_map)
        for alias, target in amap.items():
            if target == key:
                kwargs.pop(alias, None)
    kwargs.update(extra or {})
    return config_class(**kwargs)


_MAMBA = {"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_chunk_size": 8}
OVERRIDES: dict[str, dict] = {
    # hybrids whose default config has no attention layer among the first few: one mamba, one attention layer
    "bamba": {**_MAMBA, "attn_layer_indices": [1]}, "falcon_h1": {**_MAMBA, "mamba_d_ssm": 64},
    "granitemoehybrid": {**_MAMBA, "layer_types": ["linear_attention", "full_attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "mamba2": {"num_heads": 4, "head_dim": 16, "state_size": 8, "chunk_size": 8},
    "reformer": {"is_decoder": True}, "xlnet": {"d_head": 8}, "zaya": {"num_experts_per_tok": 1},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "laguna": {"num_attention_heads_per_layer": [HEADS, HEADS // 2]},  # keep its quirk: per-layer head counts
    "deepseek_v2": {"topk_group": 1, "n_group": 1, "topk_method": "greedy", "num_experts_per_tok": 2},
}
"""Per-family settings the generic shrink cannot guess (mamba sizes that must divide, a flag)."""


def model_class(model_type: str, *, classifier: bool = False) -> type:
    """The causal LM class of ``model_type`` (its sequence classifier with ``classifier``)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = ENCODER_CLASSIFIERS[model_type] if classifier else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    return getattr(transformers, name)


def tiny_config(model_type: str, *, classifier: bool = False):
    """A tiny random-weight config of ``model_type`` (see the module docstring), of the config class its
    model class takes (the text config where a multimodal type maps to a text-only LM, as Llama 4 does)."""
    config_class = model_class(model_type, classifier=classifier).config_class
    return _shrink(config_class, config_class(), text=True, extra=OVERRIDES.get(model_type))


def build_model(model_type: str, *, classifier: bool = False, seed: int = 0) -> torch.nn.Module:
    """The tiny float64 model of ``model_type`` with random weights (normal, std 0.2, for matrices)."""
    config = tiny_config(model_type, classifier=classifier)
    cls = model_class(model_type, classifier=classifier)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # experts one by one: their grouped matmul has no float64
        model = cls._from_config(config, dtype=torch.float64, attn_implementation="eager",
                                 experts_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model.eval()


CLASSIFIER_SUFFIX = "-classifier"
"""A family name with this suffix (``bert-classifier``) is the family's sequence classifier."""


def _families(selected: list[str] | None) -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = sorted([*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *(f + CLASSIFIER_SUFFIX for f in ENCODER_CLASSIFIERS)])
    if selected:
        unknown = sorted(set(selected) - set(names))
        if unknown:
            raise SystemExit(f"unknown model type(s): {', '.join(unknown)}")
        return [n for n in names if n in selected]
    return names


NOT_TEXT_LMS = {
    "musicgen": "decodes audio codebooks (input_ids of [batch x codebooks, T]), not text",
    "musicgen_melody": "decodes audio codebooks (input_ids of [batch x codebooks, T]), not text",
    "gemma4_unified_assistant": "a drafting head that needs the main model's shared key/value states",
    "gemma4_assistant": "a drafting head that needs the main model's shared key/value states",
}
"""Families whose causal LM does not run on token ids alone: not applicable to text tasks."""


def _float64_unsupported(checks: list[dict]) -> bool:
    """No implementation ran, and the unpatched model died on a float64 op (the family makes float32 tensors)."""
    return bool(checks) and all(c["status"] in ("unavailable", "failing") for c in checks) and any(
        "RuntimeError" in c["reason"] and ("Double" in c["reason"] or "float" in c["reason"]) for c in checks)


def check_family(model_type: str, implementations: list[str]) -> dict:
    """The matrix row of one family: build it, check each implementation, and time it."""
    start = time.perf_counter()
    row = {"family": model_type, "checks": [], "build_error": None}
    if model_type in NOT_TEXT_LMS:
        row["not_applicable"] = NOT_TEXT_LMS[model_type]
        row["seconds"] = 0.0
        return row
    try:
        if model_type.endswith(CLASSIFIER_SUFFIX):
            model = build_model(model_type[:-len(CLASSIFIER_SUFFIX)], classifier=True)
        else:
            model = build_model(model_type)
    except Exception as exc:  # noqa: BLE001 - a family whose tiny config does not build: reported as such
        row["build_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"
    else:
        row["class"] = type(model).__name__
        if hasattr(model, "set_default_language"):  # X-MOD: one adapter per language, chosen up front
            model.set_default_language(next(iter(model.config.languages)))
        row["checks"] = _checks(model, implementations)
        if _float64_unsupported(row["checks"]):  # check in float32 instead, with float32's tolerance
            row["dtype"] = "float32"
            row["checks"] = _checks(model.float(), implementations)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


CI_SUBSET = ("gpt2", "gpt_neox", "phi3", "gemma3", "olmo2", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4",
             "bert-classifier", "modernbert-classifier", "mllama", "gemma4_text", "laguna")
"""The families CI checks (tests/test_model_matrix.py): every quirk the engine must follow."""

FLEX_DEFAULT = CI_SUBSET
"""Families whose flex_attention check runs by default: compiling FlexAttention for a CPU takes 5-40 s a model."""

ICONS = {"supported": "yes", "forward-only": "forward only", "refused": "refused", "failing": "FAILING",
         "unavailable": "-"}


STATUS_ORDER = ("supported", "forward-only", "refused", "failing", "not built", "not applicable", "unavailable")


def family_status(row: dict) -> str:
    """One word per family: ``supported`` when some implementation passed every check, else ``refused`` (a
    reason headscore states), ``failing``, or ``not built`` (the sweep's tiny config did not build)."""
    if row.get("not_applicable"):
        return "not applicable"
    if row["build_error"]:
        return "not built"
    statuses = {c["status"] for c in row["checks"]}
    for word in ("supported", "forward-only", "refused", "failing"):
        if word in statuses:
            return word
    return "unavailable"


def status_counts(rows: list[dict]) -> dict[str, int]:
    """How many families have each :func:`family_status`, in :data:`STATUS_ORDER`."""
    statuses = [family_status(row) for row in rows]
    return {word: statuses.count(word) for word in STATUS_ORDER if word in statuses}


def _reason(row: dict) -> str:
    if row.get("not_applicable"):
        return row["not_applicable"]
    if row["build_error"]:
        return f"tiny config: {row['build_error']}"
    notes = dict.fromkeys(c["reason"] for c in row["checks"]
                          if c["status"] not in ("supported",) and c.get("reason")
                          and not (c["status"] == "unavailable" and "does not support an attention" in c["reason"]))
    text = "; ".join(notes)
    if row.get("dtype") == "float32":
        text = "the family cannot run in float64: checked in float32 (tolerance 1e-4)" + (f"; {text}" if text else "")
    return text


def markdown(rows: list[dict], *, versions: str, seconds: float, command: str) -> str:
    """The compatibility table of ``docs/models.md``."""
    counts = status_counts(rows)
    lines = [
        "# Model compatibility (generated)",
        "",
        f"Generated by `{command}` ({versions}; {len(rows)} families in {seconds / 60:.1f} min on a CPU). "
        "Do not edit by hand: rerun the command.",
        "",
        "Each family of transformers' `MODEL_FOR_CAUSAL_LM_MAPPING` (plus the BERT and ModernBERT sequence "
        "classifiers) is built tiny from its own config class (2-4 layers of 4 heads, the family's quirks kept) "
        "in float64 with random weights, and `headscore.check_model` runs for each attention "
        "implementation: `patch()` transparent and restored bitwise; gate gradients equal a float64 reference "
        "gating each head's slice of the family's own output projection (found from the model); batched and "
        "prefix-reuse ablation of every head equal the reference; padding changes no row's loss. Check your own "
        "model the same way: `python -c \"import headscore; lm = headscore.load_model('DIR', dtype='float64'); "
        "print(headscore.check_model(lm.model))\"`.",
        "",
        "Status: **yes** = every check passed; **FAILING** = a check disagreed (a bug, with the error); "
        "**forward only** = every check but the gate gradients passed "
        "(FlexAttention has no backward on a CPU); **refused** = headscore raises `UnsupportedModelError` with "
        "the reason; **-** = the family does not run that implementation (or not on a CPU: the notes say); "
        "**not run** = skipped (flex_attention "
        "compiles for 5-40 s a model on a CPU: by default only the CI families run it, `--flex all` runs every "
        "one); **not built** = the sweep could not build a tiny config of the family (the family itself is not "
        "refused: its real checkpoints may work; check them with `check_model`); **n/a** = the family's causal LM "
        "does not run on token ids alone (audio codebooks, drafting heads). A family that cannot run in float64 "
        "is checked in float32 (tolerance 1e-4), as its notes say.",
        "",
        "Totals: " + ", ".join(f"{n} {word}" for word, n in counts.items()) + ".",
        "",
        "| family | class | eager | sdpa | flex_attention | output projection | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        by_impl = {c["implementation"]: c for c in row["checks"]}
        cells = [ICONS.get(by_impl[i]["status"], by_impl[i]["status"]) if i in by_impl else
                 ("n/a" if row.get("not_applicable") else "not built" if row["build_error"] else "not run")
                 for i in ("eager", "sdpa", "flex_attention")]
        proj = next((c.get("output_projection") for c in row["checks"] if c.get("output_projection")), "")
        reason = _reason(row).replace("|", "\\|")
        lines.append(f"| {row['family']} | {row.get('class', '')} | {' | '.join(cells)} | "
                     f"{f'`{proj}`' if proj else ''} | {reason} |")
    return "\n".join(lines) + "\n"


def _checks(model: torch.nn.Module, implementations: list[str]) -> list[dict]:
    from headscore.model_check import FAILING, check_model

    out = []
    for name in implementations:
        try:
            out += [c.to_dict() for c in check_model(model, [name])]
        except Exception as exc:  # noqa: BLE001 - reported in the matrix
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            out.append({"implementation": name, "status": FAILING,
                        "reason": f"{type(exc).__name__}: {msg} ({Path(tb.filename).name}:{tb.lineno})"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated model types (default: all)")
    parser.add_argument("--implementations", default="eager,sdpa",
                        help="checked for every family (default eager,sdpa)")
    parser.add_argument("--flex", default="ci",
                        help="families whose flex_attention is checked too: 'ci' (the CI subset, default), 'all', "
                             "'none' or a comma-separated list")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--markdown", type=Path, help="write the table here (docs/models.md)")
    parser.add_argument("--from-json", type=Path, help="write --markdown from the rows of an earlier --json run "
                                                       "instead of checking again")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # flex_attention compiles for each model: keep compiling instead of falling back after 8 models
    dynamo = importlib.import_module("torch._dynamo")
    dynamo.config.recompile_limit = 10_000
    dynamo.config.accumulated_recompile_limit = 100_000
    if args.from_json:
        if not args.markdown:
            raise SystemExit("--from-json needs --markdown")
        rows = json.loads(args.from_json.read_text())
        _write_markdown(args, rows, sum(r["seconds"] for r in rows))
        return 0
    families = _families(args.families.split(",") if args.families else None)
    impls = args.implementations.split(",")
    flex = {"ci": set(FLEX_DEFAULT), "all": set(families), "none": set()}.get(args.flex, set(args.flex.split(",")))
    for path in (args.json, args.markdown):  # outputs checked before the work
        if path is not None and not path.parent.is_dir():
            raise SystemExit(f"{path.parent}: no such directory")
    rows = []
    start = time.perf_counter()
    for i, family in enumerate(families):
        wanted = impls + (["flex_attention"] if family in flex and "flex_attention" not in impls else [])
        row = check_family(family, wanted)
        rows.append(row)
        summary = row["build_error"] or ", ".join(f"{c['implementation']}={c['status']}" for c in row["checks"])
        print(f"[{i + 1}/{len(families)}] {family} ({row['seconds']} s): {summary}", flush=True)
        for c in row["checks"]:
            if c["status"] not in ("supported",) and c.get("reason"):
                print(f"    {c['implementation']}: {c['reason']}", flush=True)
    seconds = time.perf_counter() - start
    counts = status_counts(rows)
    print(f"{len(families)} families in {seconds:.0f} s: {counts}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.markdown:
        _write_markdown(args, rows, seconds)
    return 0


def _write_markdown(args: argparse.Namespace, rows: list[dict], seconds: float) -> None:
    import transformers

    versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
    command = "python scripts/model_matrix.py --markdown docs/models.md" + (
        f" --flex {args.flex}" if args.flex != "ci" else "")
    args.markdown.write_text(markdown(rows, versions=versions, seconds=seconds, command=command))


if __name__ == "__main__":
    sys.exit(main())
