"""Peers for ``headscore bench``: all-head attribution and ablation written with nnsight and TransformerLens.

nnsight and transformer_lens are optional and not headscore dependencies: each is imported inside the
function that needs it, and a method whose library is missing is reported as ``unavailable: <reason>``
(:func:`unavailable`). Install them apart from headscore's own environment (see benchmarks/RESULTS.md),
e.g.::

    python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install -e . --no-deps && /work/peers-venv/bin/pip install transformers==5.24.0 \
        safetensors numpy scipy matplotlib tqdm psutil
    /work/peers-venv/bin/pip install -c constraints.txt nnsight transformer-lens   # torch/transformers pinned

Every method uses headscore's own tokenised batches and per-example loss (mean NLL of the target
tokens, :func:`.methods.losses_from_logits`), so each computes the same quantity as
``headscore.score(method="taylor")``: -sum over tokens of <activation, gradient> per head, averaged per task.

- ``nnsight-attribution``: as nnsight's documentation teaches: ``model.trace``, save each
  ``o_proj`` input, ``with loss.backward():`` read ``.grad`` (in reverse layer order), then
  gradient x activation summed per head. The model's weights keep ``requires_grad`` as loaded.
- ``tl-attribution``: TransformerLens (4.x: ``TransformerBridge``; 2.x ``HookedTransformer`` is
  not installable beside transformers 5) forward and backward hooks on ``blocks.*.attn.hook_z``,
  as in TransformerLens' attribution patching demo.
- ``tl-ablation``: TransformerLens per-head zero ablation with a ``hook_z`` hook, one forward pass
  per head (timed on the same head sample as headscore's sequential sweep and extrapolated, by the
  same :func:`.methods.timed_head_sweep`).
"""

from __future__ import annotations

import copy
import importlib.util

import torch

from ..models import resolve_model_path
from ..patch import head_layout
from .methods import Context, Method, Output, attribution_from_acts, losses_from_logits, timed_head_sweep

_CACHE: dict[tuple[str, int], object] = {}
LIBRARIES = {"nnsight-attribution": "nnsight", "tl-attribution": "transformer_lens",
             "tl-ablation": "transformer_lens"}


def unavailable(name: str) -> str | None:
    """Why peer ``name`` cannot run here, or None."""
    lib = LIBRARIES[name]
    if importlib.util.find_spec(lib) is None:
        return f"{lib} is not installed in this environment ({lib.replace('_', '-')} from PyPI)"
    if lib == "transformer_lens":
        try:
            from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
        except ImportError as exc:
            return f"transformer_lens has no TransformerBridge ({exc})"
    return None


# ----------------------------------------------------------------------------- nnsight

def _nnsight_model(ctx: Context):
    key = ("nnsight", id(ctx.lm.model))
    if key not in _CACHE:
        from nnsight import LanguageModel  # optional peer: imported only when it runs

        _CACHE[key] = LanguageModel(ctx.lm.model, tokenizer=ctx.lm.tokenizer)
    return _CACHE[key]


def nnsight_attribution(ctx: Context) -> Output:
    """Gradient x activation of every head with nnsight (trace, save o_proj inputs, .grad)."""
    model = _nnsight_model(ctx)
    prep = ctx.prep
    num_heads = head_layout(ctx.lm.model).num_heads
    acc = prep.accumulator()
    layers = model.model.layers
    for batch in prep.batches(ctx.batch_size, progress=False):
        acts, grads = [], []
        with model.trace({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}):
            for layer in layers:
                acts.append(layer.self_attn.o_proj.input.save())
            loss = losses_from_logits(model.lm_head.output, batch).sum()
            with loss.backward():
                for act in reversed(acts):
                    grads.append(act.grad.save())
        grads.reverse()
        acc.add(batch.task_index, attribution_from_acts([a.detach() for a in acts], list(grads), num_heads))
    ctx.lm.model.zero_grad(set_to_none=True)
    return Output(prep.result(acc, "nnsight-attribution"))


nnsight_attribution.setup = _nnsight_model


# ----------------------------------------------------------------------------- TransformerLens

def _bridge(ctx: Context):
    """A TransformerBridge over a copy of the model (TransformerLens switches its model to eager
    attention; headscore's copy stays as loaded). Built once per model, not timed."""
    key = ("tl", id(ctx.lm.model))
    if key not in _CACHE:
        from transformer_lens.model_bridge import TransformerBridge  # optional peer: imported only when it runs

        hf = copy.deepcopy(ctx.lm.model)
        name = getattr(hf.config, "_name_or_path", "") or ctx.lm.name
        try:
            name = resolve_model_path(ctx.lm.name)[0]
        except Exception:  # noqa: BLE001 - a model not known by name: use its config's path
            pass
        _CACHE[key] = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=ctx.lm.tokenizer,
                                                          device=str(ctx.lm.device))
    return _CACHE[key]


def _hook_z_names(num_layers: int) -> list[str]:
    return [f"blocks.{i}.attn.hook_z" for i in range(num_layers)]


def _heads_view(z: torch.Tensor, num_heads: int) -> torch.Tensor:
    """hook_z as [B, T, H, D] whatever layout the bridge uses ([B, T, H, D] or [B, T, H*D])."""
    return z if z.dim() == 4 else z.view(z.shape[0], z.shape[1], num_heads, -1)


def tl_attribution(ctx: Context) -> Output:
    """Gradient x activation on hook_z with TransformerLens forward and backward hooks."""
    bridge = _bridge(ctx)
    layout = head_layout(ctx.lm.model)
    names = _hook_z_names(layout.num_layers)
    prep = ctx.prep
    acc = prep.accumulator()
    for batch in prep.batches(ctx.batch_size, progress=False):
        acts: dict[int, torch.Tensor] = {}
        grads: dict[int, torch.Tensor] = {}
        bridge.reset_hooks()
        for i, n in enumerate(names):  # hook.name may be the alias' target (attn.o.hook_in): key by layer
            bridge.add_hook(n, lambda act, hook, i=i, acts=acts: acts.__setitem__(i, act.detach()), "fwd")
            bridge.add_hook(n, lambda grad, hook, i=i, grads=grads: grads.__setitem__(i, grad.detach()), "bwd")
        try:
            logits = bridge(batch.input_ids, attention_mask=batch.attention_mask, return_type="logits")
            losses_from_logits(logits, batch).sum().backward()
        finally:
            bridge.reset_hooks()
        a = [_heads_view(acts[i], layout.num_heads).flatten(2) for i in range(len(names))]
        g = [_heads_view(grads[i], layout.num_heads).flatten(2) for i in range(len(names))]
        acc.add(batch.task_index, attribution_from_acts(a, g, layout.num_heads))
    bridge.zero_grad(set_to_none=True)
    return Output(prep.result(acc, "tl-attribution"))


tl_attribution.setup = _bridge


def tl_ablation(ctx: Context) -> Output:
    """Zero-ablate one head per forward pass through a hook_z hook (sampled heads, extrapolated)."""
    bridge = _bridge(ctx)
    layout = head_layout(ctx.lm.model)
    names = _hook_z_names(layout.num_layers)
    sample = ctx.head_sample() or list(range(ctx.num_heads_total))

    def clean(batch) -> torch.Tensor:
        logits = bridge(batch.input_ids, attention_mask=batch.attention_mask, return_type="logits")
        return losses_from_logits(logits, batch).double().cpu()

    def ablated(batch) -> torch.Tensor:
        losses = []
        for flat in sample:
            layer, head = divmod(flat, layout.num_heads)

            def zero(z, hook, head=head):
                z = _heads_view(z, layout.num_heads)
                z[:, :, head] = 0.0
                return None

            logits = bridge.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask,
                                           return_type="logits", fwd_hooks=[(names[layer], zero)])
            losses.append(losses_from_logits(logits, batch).double().cpu())
        return torch.stack(losses)

    return timed_head_sweep(ctx, sample, clean, ablated)


tl_ablation.setup = _bridge

PEERS: dict[str, Method] = {"nnsight-attribution": nnsight_attribution, "tl-attribution": tl_attribution,
                            "tl-ablation": tl_ablation}
