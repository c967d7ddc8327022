"""Whether a model's heads can be gated one by one: the guard every ``prepare()`` runs once per model.

:func:`separability_report` runs one patched forward pass, finds each attention layer's output projection
from the model (the first module with a weight matrix called after the layer's attention and fed
``heads x head_dim`` features) and refuses, with the reason, a layer whose attention runs more than once per
pass, whose head outputs no module consumes, or whose projection gets them through a transform that is not
linear in them (a norm over all heads). :mod:`headscore.model_check` builds its full check on the same
observation (:func:`observe`, :func:`separability`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .models import is_sequence_classifier
from .patch import patch

LINEARITY_TOLERANCE = 1e-3
"""How far a projection input may be from half its value when its layer's gates are 0.5 (a transform linear
in the head outputs gives exactly half; a norm over the heads gives the same input)."""


@dataclass
class Observed:
    """What one patched forward pass showed: each attention layer's output and the call order of modules."""

    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: list[tuple[str, object]] = field(default_factory=list)


def separability_report(model: torch.nn.Module, batch) -> tuple[str | None, list[int]]:
    """Why ``model``'s heads cannot be gated one by one (see :func:`separability`), or None; one forward pass
    on ``batch`` (one more per layer whose projection input is not its head outputs unchanged). And, from the
    same passes, the layers whose output projection gets their head outputs through a transform linear in
    them (an output gate: Qwen3-Next's ``attn_output * sigmoid(gate)``, Laguna's softplus gate). A gate there
    scales what the projection sees, so the gradients and the zero baseline are the head's; a baseline that
    replaces the attention's output (mean, corrupted run) is not the projection's input with the head
    replaced (the model's own gate multiplies it)."""
    with patch(model, kernel=False, freeze=False) as heads:
        seen = observe(model, heads, batch)
        if not seen.outputs:
            return "no attention layer called transformers' attention registry", []
        problem = separability(model, heads, seen, batch)[1]
    _, direct = find_output_projections(projection_candidates(seen.calls, seen.outputs), seen.outputs)
    return problem, sorted(layer for layer, same in direct.items() if not same)


def separability(model: torch.nn.Module, heads, seen: Observed, batch
                 ) -> tuple[dict[int, str], str | None]:
    """Why the head outputs of ``model`` cannot be gated one by one, or None: a layer whose head outputs
    no module consumes, or one whose output projection gets them through a transform that is not linear in
    them (gate 0.5 on the layer must halve the projection's input; an elementwise output gate passes, a
    norm over all heads does not). Runs inside ``patch`` (``heads``); returns the projections found too."""
    runs = [layer for kind, layer in seen.calls if kind == "attention"]
    repeated = sorted({layer for layer in runs if runs.count(layer) > 1})
    if repeated:
        return {}, (f"the attention of layer(s) {repeated} runs more than once per forward pass (looped, "
                    "recurrent or differential attention): one gate per head and layer cannot tell the runs apart")
    candidates = projection_candidates(seen.calls, seen.outputs)
    projections, direct = find_output_projections(candidates, seen.outputs)
    missing = sorted(set(seen.outputs) - set(projections))
    if missing:
        return projections, f"no module consumes the head outputs of layer(s) {missing} as heads x head_dim features"
    modules = dict(model.named_modules())
    for layer in sorted(layer for layer, same in direct.items() if not same):
        fits = dict(candidates[layer])
        got: dict[str, torch.Tensor] = {}
        handles = [modules[name].register_forward_pre_hook(
            lambda m, args, name=name, got=got: got.setdefault(name, args[0].detach().clone())) for name in fits]
        gates = heads.ones(1, dtype=torch.promote_types(torch.float32, parameter_dtype(model)))
        gates[:, layer] = 0.5
        try:
            with torch.no_grad(), heads.using(gates):
                model_logits(model, batch.input_ids, batch.attention_mask)
        finally:
            for h in handles:
                h.remove()
        # the consumer is the first module whose input follows the gate; it must follow it linearly
        consumer = next((name for name, x in fits.items() if name in got and not torch.equal(got[name], x)), None)
        if consumer is None:
            return projections, f"no module consumes the head outputs of layer {layer} as heads x head_dim features"
        projections[layer] = consumer
        full = fits[consumer]
        if float((got[consumer] - 0.5 * full).abs().max()) > LINEARITY_TOLERANCE * float(full.abs().max()):
            return projections, (
                f"head outputs are mixed before the output projection ({projection_pattern(projections)}, "
                f"layer {layer}: halving the layer's heads does not halve its input), so one head cannot be "
                "removed alone")
    return projections, None


def observe(model: torch.nn.Module, heads, batch) -> Observed:
    """One patched forward pass, observed: each attention layer's head outputs and the call order of every
    weight-matrix module (``heads`` is the open :func:`~headscore.patch.patch` of ``model``)."""
    seen = Observed()

    def observer(layer: int, out: torch.Tensor) -> None:
        seen.outputs[layer] = out.detach().clone()
        seen.calls.append(("attention", layer))

    with torch.no_grad(), heads.observing(observer), call_log(model, seen.calls):
        model_logits(model, batch.input_ids, batch.attention_mask)
    return seen


@contextlib.contextmanager
def call_log(model: torch.nn.Module, log: list) -> Iterator[None]:
    """Append ``("module", (name, input))`` to ``log`` for each call of a module with a weight matrix."""
    handles = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and not list(module.children()):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: log.append(("module", (name, args[0] if args else None)))))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def projection_candidates(calls: list[tuple[str, object]], outputs: dict[int, torch.Tensor]
                          ) -> dict[int, list[tuple[str, torch.Tensor]]]:
    """For each attention layer, the (module name, input) of the weight-matrix modules called after its
    attention and before the next layer's (first call of each module) that are fed ``heads x head_dim``
    features: the candidates for its output projection, in call order."""
    windows: dict[int, list[tuple[str, torch.Tensor]]] = {}
    current = None
    for kind, payload in calls:
        if kind == "attention":
            current = windows.setdefault(payload, [])
        elif current is not None and isinstance(payload[1], torch.Tensor) and \
                payload[0] not in {n for n, _ in current}:
            current.append(payload)
    out = {}
    for layer, window in windows.items():
        shape = outputs[layer].shape
        out[layer] = [(name, x) for name, x in window if x.shape[-1] == shape[-2] * shape[-1]
                      and x.numel() == outputs[layer].numel()]
    return out


def find_output_projections(candidates: dict[int, list[tuple[str, torch.Tensor]]],
                            outputs: dict[int, torch.Tensor]) -> tuple[dict[int, str], dict[int, bool]]:
    """For each attention layer, the candidate (:func:`projection_candidates`) whose input equals its head
    outputs, else the first candidate, and whether the input was the head outputs unchanged."""
    found, direct = {}, {}
    for layer, fits in candidates.items():
        out = outputs[layer]
        same = [name for name, x in fits if torch.equal(x.reshape(out.shape), out)]
        if same:
            found[layer], direct[layer] = same[0], True
        elif fits:
            found[layer], direct[layer] = fits[0][0], False
    return found, direct


def projection_pattern(names: dict[int, str]) -> str:
    """``model.layers.*.self_attn.o_proj`` from the per-layer names (the layer index replaced by ``*``)."""
    patterns = set()
    for layer, name in names.items():
        parts = name.split(".")
        patterns.add(".".join("*" if p == str(layer) else p for p in parts))
    return " | ".join(sorted(patterns))


def model_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's logits on a batch, without a KV cache (a sequence classifier takes no ``use_cache``)."""
    cache = {} if is_sequence_classifier(model) else {"use_cache": False}
    return model(input_ids=input_ids, attention_mask=attention_mask, **cache).logits


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's parameters."""
    return next(model.parameters()).dtype
