"""Check, before a long run, that headscore gates a model's heads correctly: ``check_model(model)``.

For each attention implementation the model can run (eager, sdpa, flex_attention), on a small padded
batch of random tokens in the model's own dtype (float64 makes the comparisons exact to rounding):

1. ``patch()`` is transparent: with every gate open the logits equal the unpatched model's bitwise, every
   layer that runs attention reports heads of the configured layout, and on exit the parameters, the
   attention implementation and the logits are as before (bitwise);
2. the output projection of each attention layer is found from the model, not assumed to be ``o_proj``:
   the first module with a weight matrix that runs after the layer's attention function and consumes a
   tensor of ``heads x head_dim`` features;
3. headscore's gate gradients dL/dg equal an independent reference: the unpatched model on the same padded
   batch, a forward pre-hook multiplying each head's slice of that projection's input by a gate;
4. batched and prefix-reuse ablation of every head equal the reference zeroing each head's slice there.

A model that cannot be gated gets status ``refused`` with the reason (no registry, no ``layer_idx``, no
attention layer through the registry, head outputs changed before the projection); a mismatch gets
``failing`` with the measured error. Nothing here knows a model family by name. Finding the projections and
refusing unseparable heads is :mod:`headscore.separability`, the guard every ``prepare()`` runs too.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from . import compat
from .data.batching import TokenizedExample, collate
from .errors import HeadscoreError, UnsupportedModelError
from .methods.ablation import gated_losses, single_head_gates
from .methods.gradient import gate_gradients
from .methods.prefix import replay_tolerance
from .models import is_sequence_classifier
from .patch import HeadLayout, head_layout, patch
from .separability import model_logits, observe, parameter_dtype, projection_pattern, separability

IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")
"""Attention implementations :func:`check_model` tries, in order."""

SUPPORTED, FORWARD_ONLY, REFUSED, FAILING, UNAVAILABLE = (
    "supported", "forward-only", "refused", "failing", "unavailable")

PADDING_TOLERANCE = 1e-6
"""Relative change of a row's loss that padding may cause: families run softmax in float32 even in a float64
model (eager attention), and a padded row's float32 softmax sums in another order (eps32 = 6e-8 per step)."""


@dataclass
class ImplementationCheck:
    """The outcome of the checks for one attention implementation.

    Attributes:
        implementation: ``eager``, ``sdpa`` or ``flex_attention``.
        status: ``supported`` (every check passed), ``forward-only`` (every check but the gate
            gradients passed, which this device cannot compute: FlexAttention has no CPU backward),
            ``refused`` (headscore cannot gate this model; ``reason`` says why), ``failing`` (a check
            disagreed; ``reason`` has the error) or ``unavailable`` (the model does not run this
            implementation).
        reason: one line; empty when supported.
        attention_layers: layers whose attention went through the registry (of ``layers``).
        layers: the model's decoder layers (``num_hidden_layers``).
        output_projection: the module consuming the head outputs, as a path with ``*`` for the layer.
        gradient_error: max |headscore - reference| of the gate gradients over the largest |reference|.
        ablation_error: the same for every head's ablated loss (batched and prefix modes).
        padding_error: the same for each row's loss in the padded batch against the row run alone.
    """

    implementation: str
    status: str
    reason: str = ""
    attention_layers: int = 0
    layers: int = 0
    output_projection: str = ""
    gradient_error: float | None = None
    ablation_error: float | None = None
    padding_error: float | None = None

    def to_dict(self) -> dict:
        """The check as plain JSON-able values."""
        return asdict(self)


def random_batch(vocab_size: int, lengths: Sequence[int] = (9, 6), *, targets: int = 2, seed: int = 0,
                 avoid: Sequence[int] = (), num_labels: int | None = None):
    """A right-padded :class:`~headscore.data.batching.Batch` of random tokens (ids from 3 up, none of
    ``avoid``): one example per length, the last ``targets`` tokens of each its target; with ``num_labels``,
    labelled examples of a sequence classifier instead (random classes; float labels for one output)."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(3, max(4, vocab_size)) if i not in set(avoid)])
    items = []
    for i, n in enumerate(lengths):
        ids = tuple(allowed[torch.randint(len(allowed), (n,), generator=gen)].tolist())
        if num_labels is None:
            items.append(TokenizedExample(ids, targets, 0, i))
        else:
            label = float(torch.randn((), generator=gen)) if num_labels == 1 else \
                int(torch.randint(num_labels, (), generator=gen))
            items.append(TokenizedExample(ids, 0, 0, i, label=label))
    return collate(items, pad_id=0)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@contextlib.contextmanager
def _gated_projections(model: torch.nn.Module, projections: dict[int, str], layout: HeadLayout,
                       gates: torch.Tensor) -> Iterator[None]:
    """Multiply head h's slice of layer l's projection input in row b by ``gates[b, l, h]`` (forward
    pre-hooks; a layer with fewer heads takes the first gates)."""
    modules = dict(model.named_modules())

    def hook(args, layer):
        x = args[0]  # [B, T, H * D]
        heads = layout.heads_of(layer)
        g = gates[:, layer, :heads].to(x.dtype)  # [B, H_l]
        return ((x.unflatten(-1, (heads, -1)) * g[:, None, :, None]).flatten(-2), *args[1:])

    handles = [modules[name].register_forward_pre_hook(lambda m, args, layer=layer: hook(args, layer))
               for layer, name in projections.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reference_losses(model: torch.nn.Module, batch) -> torch.Tensor:
    """Mean target NLL [B] of each row (float64 log-softmax of every logit of the padded batch); for a
    sequence classifier's batch, each row's cross-entropy on its label (squared error for one output)."""
    if batch.labels is not None:
        logits = model_logits(model, batch.input_ids, batch.attention_mask).double()
        if logits.shape[-1] == 1:
            return (logits[:, 0] - batch.labels.double()).square()
        return -torch.log_softmax(logits, -1).gather(1, batch.labels[:, None]).squeeze(1)
    logp = torch.log_softmax(model_logits(model, batch.input_ids, batch.attention_mask).double(), -1)
    rows, cols = batch.target_mask.nonzero(as_tuple=True)
    nll = -logp[rows, cols - 1, batch.input_ids[rows, cols]]
    total = torch.zeros(batch.size, dtype=torch.float64).index_add(0, rows, nll)
    return total / batch.target_mask.sum(1)


def alone_losses(model: torch.nn.Module, batch) -> torch.Tensor:
    """:func:`reference_losses` with each row run alone, without padding."""
    out = []
    for b in range(batch.size):
        n = int(batch.attention_mask[b].sum())
        row = replace(batch, input_ids=batch.input_ids[b:b + 1, :n], attention_mask=batch.attention_mask[b:b + 1, :n],
                      target_mask=batch.target_mask[b:b + 1, :n],
                      labels=None if batch.labels is None else batch.labels[b:b + 1])
        out.append(reference_losses(model, row))
    return torch.cat(out)


def reference_gate_gradients(model: torch.nn.Module, batch, projections: dict[int, str], layout: HeadLayout
                             ) -> torch.Tensor:
    """dL_b/dg [B, L, H] from per-row gates multiplied into each projection's input (the same padded batch)."""
    gates = torch.ones(batch.size, layout.num_layers, layout.num_heads, dtype=torch.float64, requires_grad=True)
    with _gated_projections(model, projections, layout, gates):
        loss = reference_losses(model, batch)
    return torch.autograd.grad(loss.sum(), gates)[0]


@torch.no_grad()
def reference_ablation(model: torch.nn.Module, batch, projections: dict[int, str], layout: HeadLayout
                       ) -> torch.Tensor:
    """Loss [L*H, B] with head (l, h) zeroed in its projection's input."""
    rows = single_head_gates(layout.num_layers, layout.num_heads)
    out = torch.empty(len(rows), batch.size, dtype=torch.float64)
    for k, gates in enumerate(rows):
        with _gated_projections(model, projections, layout, gates.expand(batch.size, -1, -1)):
            out[k] = reference_losses(model, batch)
    return out


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(want.abs().max())
    return float((got.double() - want.double()).abs().max()) / (scale if scale > 0 else 1.0)


def _set_implementation(model: torch.nn.Module, implementation: str) -> str | None:
    """Switch ``model`` to ``implementation``; the reason it cannot, or None."""
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError, NotImplementedError, KeyError) as exc:
        return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return None


def check_implementation(model: torch.nn.Module, implementation: str, *, batch=None,
                         tolerance: float | None = None) -> ImplementationCheck:
    """Run the checks of the module docstring on ``model`` with one attention implementation.

    ``tolerance`` bounds the relative gradient and ablation errors (default 1e-9 for a float64 model,
    1e-4 for float32, 2e-2 for 16-bit; ablation, which runs rows in other batch shapes than the reference, at
    least :data:`PADDING_TOLERANCE`, as padding); ``batch`` defaults to :func:`random_batch` of the model's vocab.
    """
    dtype = parameter_dtype(model)
    tol = tolerance if tolerance is not None else replay_tolerance(dtype)
    result = ImplementationCheck(implementation, FAILING)
    why = _set_implementation(model, implementation)
    if why is not None:
        result.status, result.reason = UNAVAILABLE, why
        return result
    try:
        layout = head_layout(model)
    except UnsupportedModelError as exc:
        result.status, result.reason = REFUSED, str(exc)
        return result
    result.layers = layout.num_layers
    if batch is None:
        text = model.config.get_text_config()
        labels = int(model.config.num_labels) if is_sequence_classifier(model) else None
        batch = random_batch(int(getattr(text, "vocab_size", 64) or 64), avoid=_special_ids(model.config),
                             num_labels=labels)
    batch = batch.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        return _run_checks(model, implementation, batch, layout, tol, result)
    finally:
        model.train(was_training)


def _special_ids(config) -> list[int]:
    """Token ids a config reserves (image, audio, ... tokens), which random text must avoid."""
    ids = []
    for cfg in (config, config.get_text_config()):
        for key, value in vars(cfg).items():
            if key.endswith(("_token_id", "_token_index")) and isinstance(value, int):
                ids.append(value)
    return ids


def _run_checks(model, implementation, batch, layout, tol, result):
    backward = not (implementation == "flex_attention" and batch.input_ids.device.type == "cpu")
    before = _snapshot(model)
    try:
        with torch.no_grad():
            clean = model_logits(model, batch.input_ids, batch.attention_mask)
    except Exception as exc:  # noqa: BLE001 - the model itself, unpatched, does not run this way here
        result.status = UNAVAILABLE
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        result.reason = f"the unpatched model fails with {implementation} here: {type(exc).__name__}: {first}"
        return result
    try:
        with patch(model, kernel=False) as heads:
            with torch.no_grad():
                inside = model_logits(model, batch.input_ids, batch.attention_mask)
            seen = observe(model, heads, batch)
            if not seen.outputs:
                result.status = REFUSED
                result.reason = "no attention layer called the attention registry"
                return result
            result.attention_layers = len(seen.outputs)
            wrong = {layer: tuple(o.shape[-2:]) for layer, o in seen.outputs.items()
                     if tuple(o.shape[-2:]) != (layout.heads_of(layer), layout.dim_of(layer))}
            if wrong:
                layer, shape = next(iter(wrong.items()))
                result.status = REFUSED  # as scoring does (HeadGates refuses a layer of another layout)
                result.reason = (f"layer {layer}'s attention outputs heads x dims {shape}, the config says "
                                 f"{layout.heads_of(layer)} x {layout.dim_of(layer)}")
                return result
            found = separability(model, heads, seen, batch)
            projections = found.projections
            result.output_projection = projection_pattern(projections)
            if found.problem is not None:
                result.status, result.reason = REFUSED, found.problem
                return result
            grad = gate_gradients(model, heads, batch)[1] if backward else None
            gate_rows = single_head_gates(layout.num_layers, layout.num_heads)
            # torch 2.13's compiled CPU FlexAttention indexes out of bounds from 8 tiled rows of 9 tokens on
            rows = 64 if backward else 4
            batched = gated_losses(model, heads, batch, gate_rows, mode="batched", max_rows=rows)
            prefix = gated_losses(model, heads, batch, gate_rows, mode="prefix", max_rows=rows)
    except HeadscoreError as exc:  # headscore refuses (UnsupportedModelError, non-finite gradients): it says why
        result.status, result.reason = REFUSED, str(exc)
        return result
    with torch.no_grad():
        after = model_logits(model, batch.input_ids, batch.attention_mask)
    if not torch.equal(inside, clean):
        result.reason = f"patched model with open gates differs: max |diff| {float((inside - clean).abs().max()):.3g}"
        return result
    if not (torch.equal(after, clean) and _same_state(model, before)
            and compat.attention_implementation(model) == implementation):
        result.reason = "the model is not restored bitwise after patch()"
        return result
    if backward:
        want = reference_gate_gradients(model, batch, projections, layout)
        result.gradient_error = _relative(grad, want)
    want_loss = reference_ablation(model, batch, projections, layout)
    result.ablation_error = max(_relative(batched, want_loss), _relative(prefix, want_loss))
    with torch.no_grad():
        padded, alone = reference_losses(model, batch), alone_losses(model, batch)
    result.padding_error = _relative(padded, alone)
    if backward and not float(want.abs().max()) > 0:
        result.reason = "the reference gate gradients are all zero"
    elif backward and result.gradient_error > tol:
        result.reason = f"gate gradients differ from the reference by {result.gradient_error:.3g} (relative)"
    elif result.ablation_error > max(tol, PADDING_TOLERANCE):
        # batched and prefix ablation run a row in other batch shapes than the reference does, as padding does:
        # through a family's float32 steps (eager softmax, a router) they agree to float32's rounding, not
        # float64's (seen: Laguna 4.8e-9 eager and 9.1e-9 sdpa on an AVX-512 CPU, below 1e-9 on AVX2)
        result.reason = f"ablated losses differ from the reference by {result.ablation_error:.3g} (relative)"
    elif result.padding_error > max(tol, PADDING_TOLERANCE):
        result.reason = (f"padding changes the loss of the other rows by {result.padding_error:.3g} (relative): "
                         "batches of different lengths are not exact")
    elif not backward:
        result.status = FORWARD_ONLY
        result.reason = "gate gradients not checked: FlexAttention has no backward pass on a CPU"
    else:
        result.status = SUPPORTED
    return result


def _flex_needs_float32(model: torch.nn.Module, implementation: str) -> bool:
    """FlexAttention compiles no float64 kernel for a CPU: such a model is checked in float32."""
    p = next(model.parameters())
    return implementation == "flex_attention" and p.device.type == "cpu" and p.dtype == torch.float64


def check_model(model: torch.nn.Module, implementations: Sequence[str] = IMPLEMENTATIONS, *, batch=None,
                tolerance: float | None = None) -> list[ImplementationCheck]:
    """Check every implementation of ``implementations`` (see :func:`check_implementation`); the model's
    own implementation is set again afterwards. On a CPU a float64 model's flex_attention check runs on a
    float32 copy (FlexAttention has no float64 CPU kernel), with float32's tolerance."""
    original = compat.attention_implementation(model)
    results = []
    try:
        for name in implementations:
            target = copy.deepcopy(model).float() if _flex_needs_float32(model, name) else model
            results.append(check_implementation(target, name, batch=batch, tolerance=tolerance))
    finally:
        if original is not None and compat.attention_implementation(model) != original:
            _set_implementation(model, original)
    return results
