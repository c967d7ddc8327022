"""Whether a model's heads can be gated one by one: the guard every ``prepare()`` runs once per model.

:func:`separability_report` runs one patched forward pass, finds each attention layer's output projection
from the model (the first module with a weight matrix called after the layer's attention and fed
``heads x head_dim`` features) and refuses, with the reason, a layer whose attention runs more than once per
pass, whose head outputs no module consumes, or whose projection gets them through a transform that is not
linear in them (a norm over all heads); it also finds the layers with an output gate of their own, whose heads
are then gated at the projection's input. :mod:`headscore.model_check` builds its full check on the same
observation (:func:`observe`, :func:`separability`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .gate import gate_dtype
from .models import is_sequence_classifier
from .patch import patch

LINEARITY_TOLERANCE = 1e-3
"""How far a projection input may be from its ungated value scaled as the layer's gates were (relative to each
head's largest value; coarser for half precision, :func:`linearity_tolerance`): a transform linear in the head
outputs scales exactly; a norm over the heads gives the same input whatever the gates."""


@dataclass
class Observed:
    """What one patched forward pass showed: each attention layer's output and the call order of modules."""

    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: list[tuple[str, object]] = field(default_factory=list)


@dataclass(frozen=True)
class Separation:
    """What the guard found: why the heads cannot be gated one by one (``problem``, None when they can), each
    attention layer's output projection (module name), and the layers whose projection does not get the head
    outputs unchanged.

    ``output_gated`` maps the layers whose projection gets each head's output scaled by a factor of its own (an
    output gate: Qwen3-Next's ``attn_output * sigmoid(gate)``, Laguna's softplus gate) to that projection: the
    head gate belongs at its input (:func:`~headscore.patch.gate_at_projections`), where a baseline replaces
    what the projection sees. ``mixed`` lists the layers whose projection gets the head outputs through some
    other transform linear in the layer's heads: gates at the attention's output scale it, so the gradients and
    zero ablation are exact, but no slice of the projection's input is one head, so no baseline can replace a
    head there.
    """

    problem: str | None
    projections: dict[int, str] = field(default_factory=dict)
    output_gated: dict[int, str] = field(default_factory=dict)
    mixed: list[int] = field(default_factory=list)
    attention_layers: list[int] = field(default_factory=list)
    """The layers whose attention called the registry (a hybrid model's other layers have no heads)."""


def separability_report(model: torch.nn.Module, batch) -> Separation:
    """Whether ``model``'s heads can be gated one by one (see :func:`separability`), on ``batch``: one forward
    pass, one more per layer whose projection input is not its head outputs unchanged (two where that
    transform is not a scale per head)."""
    with patch(model, kernel=False, freeze=False) as heads:
        seen = observe(model, heads, batch)
        if not seen.outputs:
            return Separation("no attention layer called transformers' attention registry")
        return separability(model, heads, seen, batch)


def separability(model: torch.nn.Module, heads, seen: Observed, batch) -> Separation:
    """Why the head outputs of ``model`` cannot be gated one by one, or None (``problem``): a layer whose
    attention runs twice per pass, whose head outputs no module consumes, or whose output projection gets them
    through a transform that is not linear in them (a norm over all heads). A layer whose projection input is
    not its head outputs unchanged is run with distinct gates per head: an output gate scales each head's slice
    by that head's gate (``output_gated``); otherwise gate 0.5 on the layer must halve the projection's input
    (``mixed``: linear, heads mixed), else the layer is refused. Runs inside ``patch`` (``heads``)."""
    runs = [layer for kind, layer in seen.calls if kind == "attention"]
    repeated = sorted({layer for layer in runs if runs.count(layer) > 1})
    if repeated:
        return Separation(f"the attention of layer(s) {repeated} runs more than once per forward pass (looped, "
                          "recurrent or differential attention): one gate per head and layer cannot tell the runs "
                          "apart")
    layers = heads.layout.num_layers
    outside = sorted(layer for layer in seen.outputs if not 0 <= layer < layers)
    if outside:
        return Separation(f"an attention module calls itself layer {outside[0]}, outside the model's {layers} layers "
                          "(a block shared between layers, say): headscore cannot tell which layer its heads are in")
    candidates = projection_candidates(seen.calls, seen.outputs)
    projections, direct = find_output_projections(candidates, seen.outputs)
    missing = sorted(set(seen.outputs) - set(projections))
    if missing:
        return Separation(f"no module consumes the head outputs of layer(s) {missing} as heads x head_dim features",
                          projections)
    gated: dict[int, str] = {}
    mixed: list[int] = []
    for layer in sorted(layer for layer, same in direct.items() if not same):
        fits = dict(candidates[layer])
        count = heads.layout.heads_of(layer)
        factors = torch.arange(1, count + 1, dtype=torch.float64) / (count + 1)  # distinct per head, in (0, 1)
        consumer, got = _consumer_input(model, heads, batch, layer, fits, factors)
        if consumer is None:
            return Separation(f"no module consumes the head outputs of layer {layer} as heads x head_dim features",
                              projections)
        projections[layer] = consumer
        full = fits[consumer]
        if _scaled_like(got, full, factors):
            gated[layer] = consumer
            continue
        _, halved = _consumer_input(model, heads, batch, layer, {consumer: full}, torch.full((count,), 0.5))
        if not _scaled_like(halved, full, torch.full((count,), 0.5)):
            return Separation(
                f"head outputs are mixed before the output projection (the first module with a weight matrix "
                f"whose input they change: {projection_pattern(projections)}, layer {layer}: halving the layer's "
                "heads does not halve its input), so one head cannot be removed alone", projections)
        mixed.append(layer)
    return Separation(None, projections, gated, mixed, sorted(seen.outputs))


def _consumer_input(model: torch.nn.Module, heads, batch, layer: int, fits: dict[str, torch.Tensor],
                    factors: torch.Tensor) -> tuple[str | None, torch.Tensor | None]:
    """One pass with layer ``layer``'s heads gated by ``factors`` [H_l]: the first module of ``fits`` whose input
    changed from its ungated one (the layer's output projection), and that input."""
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_pre_hook(
        lambda m, args, name=name: got.setdefault(name, args[0].detach().clone())) for name in fits]
    gates = heads.ones(1, dtype=gate_dtype(model))
    gates[0, layer, :len(factors)] = factors.to(gates.dtype)
    try:
        with torch.no_grad(), heads.using(gates):
            model_logits(model, batch.input_ids, batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
    consumer = next((name for name, x in fits.items() if name in got and not _same(got[name], x)), None)
    return consumer, None if consumer is None else got[consumer]


def _scaled_like(got: torch.Tensor, full: torch.Tensor, factors: torch.Tensor) -> bool:
    """Whether ``got`` [.., H * D] is ``full`` with head h's slice scaled by ``factors[h]``, each head's slice to
    :func:`linearity_tolerance` of its own largest value (a slice of another head, scaled by another factor,
    is off by far more); a NaN entry, as a padded row of some models has, is not compared (the gradients' own
    check refuses NaN)."""
    count = len(factors)
    full_heads = full.unflatten(-1, (count, -1)).double()
    want = full_heads * factors.to(full_heads)[:, None]
    error = (got.unflatten(-1, (count, -1)).double() - want).abs().nan_to_num(0.0)
    scale = full_heads.abs().nan_to_num(0.0).flatten(0, -3).amax((0, 2))  # [H]: each head's largest value
    worst = error.flatten(0, -3).amax((0, 2))
    return bool((worst <= linearity_tolerance(got.dtype) * scale).all())


def linearity_tolerance(dtype: torch.dtype) -> float:
    """:data:`LINEARITY_TOLERANCE`, or 4 roundings of ``dtype`` where that is coarser (bfloat16: 0.031): the
    model computes the projection's input in its own precision, the check's scaled copy in float64."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(LINEARITY_TOLERANCE, 4 * eps)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN equal to NaN."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


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
        same = [name for name, x in fits if _same(x.reshape(out.shape), out)]
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
