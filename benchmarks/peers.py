"""Peers for ``headscore bench``: all-head attribution and ablation written with nnsight and TransformerLens.

Loaded by ``headscore.bench`` from this file; nnsight and transformer_lens are imported lazily,
and a method whose library is missing reports ``unavailable: <reason>``. Install them apart from
headscore's own environment (see benchmarks/RESULTS.md), e.g.::

    python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install -e . --no-deps && /work/peers-venv/bin/pip install transformers==5.24.0 \
        safetensors numpy scipy matplotlib tqdm psutil
    /work/peers-venv/bin/pip install -c constraints.txt nnsight transformer-lens   # torch/transformers pinned

Every method uses headscore's own tokenised batches and per-example loss (mean NLL of the target
tokens), so each computes the same quantity as ``headscore.score(method="taylor")``:
-sum over tokens of <activation, gradient> per head, averaged per task.

- ``nnsight-attribution``: as nnsight's documentation teaches: ``model.trace``, save each
  ``o_proj`` input, ``with loss.backward():`` read ``.grad`` (in reverse layer order), then
  gradient x activation summed per head. The model's weights keep ``requires_grad`` as loaded.
- ``tl-attribution``: TransformerLens (4.x: ``TransformerBridge``; 2.x ``HookedTransformer`` is
  not installable beside transformers 5) forward and backward hooks on ``blocks.*.attn.hook_z``,
  as in TransformerLens' attribution patching demo.
- ``tl-ablation``: TransformerLens per-head zero ablation with a ``hook_z`` hook, one forward pass
  per head (timed on a sample of heads and extrapolated, like headscore's sequential sweep).
"""

from __future__ import annotations

import copy
import importlib.util
import time

import torch

from headscore.bench import Context, Output, _RowAccumulator, attribution_from_acts, target_losses
from headscore.patch import head_layout

_CACHE: dict[tuple[str, int], object] = {}


def unavailable(name: str) -> str | None:
    """Why peer ``name`` cannot run here, or None."""
    lib = {"nnsight-attribution": "nnsight", "tl-attribution": "transformer_lens",
           "tl-ablation": "transformer_lens"}[name]
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
        from nnsight import LanguageModel

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
            loss = target_losses(model.lm_head.output, batch).sum()
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
        from transformer_lens.model_bridge import TransformerBridge

        from headscore.models import resolve_model_path

        hf = copy.deepcopy(ctx.lm.model)
        name = getattr(hf.config, "_name_or_path", "") or ctx.lm.name
        try:
            name = resolve_model_path(ctx.lm.name)[0]
        except Exception:  # noqa: BLE001 - a model not known by name: use its config's path
            pass
        _CACHE[key] = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=ctx.lm.tokenizer,
                                                          device=str(ctx.lm.device))
    return _CACHE[key]


def _hook_z_names(bridge, num_layers: int) -> list[str]:
    return [f"blocks.{i}.attn.hook_z" for i in range(num_layers)]


def _heads_view(z: torch.Tensor, num_heads: int) -> torch.Tensor:
    """hook_z as [B, T, H, D] whatever layout the bridge uses ([B, T, H, D] or [B, T, H*D])."""
    return z if z.dim() == 4 else z.view(z.shape[0], z.shape[1], num_heads, -1)


def tl_attribution(ctx: Context) -> Output:
    """Gradient x activation on hook_z with TransformerLens forward and backward hooks."""
    bridge = _bridge(ctx)
    layout = head_layout(ctx.lm.model)
    names = _hook_z_names(bridge, layout.num_layers)
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
            target_losses(logits, batch).sum().backward()
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
    names = _hook_z_names(bridge, layout.num_layers)
    n = layout.num_layers * layout.num_heads
    sample = ctx.head_sample() or list(range(n))
    prep = ctx.prep
    rows = _RowAccumulator(len(prep.tasks), len(sample))
    t_clean = t_heads = 0.0
    with torch.no_grad():
        for batch in prep.batches(ctx.batch_size, progress=False):
            t0 = time.perf_counter()
            logits = bridge(batch.input_ids, attention_mask=batch.attention_mask, return_type="logits")
            clean = target_losses(logits, batch).double().cpu()
            t1 = time.perf_counter()
            deltas = []
            for flat in sample:
                layer, head = divmod(flat, layout.num_heads)

                def zero(z, hook, head=head):
                    z = _heads_view(z, layout.num_heads)
                    z[:, :, head] = 0.0
                    return None

                logits = bridge.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask,
                                               return_type="logits", fwd_hooks=[(names[layer], zero)])
                deltas.append(target_losses(logits, batch).double().cpu() - clean)
            t_heads += time.perf_counter() - t1
            t_clean += t1 - t0
            rows.add(batch.task_index, torch.stack(deltas))
    note = "measured on all heads" if len(sample) == n else f"extrapolated from {len(sample)} of {n} heads"
    return Output(seconds=t_clean + t_heads * n / len(sample), note=note,
                  partial=dict(zip(sample, rows.mean().T.tolist(), strict=True)))


tl_ablation.setup = _bridge

PEERS = {"nnsight-attribution": nnsight_attribution, "tl-attribution": tl_attribution, "tl-ablation": tl_ablation}
