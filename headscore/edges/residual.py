"""Where a model's residual stream is written and read: the modules edge scores hook.

Edges need what the head gate does not: each reader's own input (the norm in front of the query, key and
value projections, of the MLP, of the unembedding) and each writer's output (a head's slice of the output
projection, the MLP). :func:`residual_model` finds them in four layouts:

- Llama-like (Llama, Mistral, Qwen2/3, Qwen3-MoE, SmolLM2, Gemma 1, ...): ``input_layernorm`` -> separate
  ``q_proj``/``k_proj``/``v_proj`` -> attention -> ``o_proj`` added to the stream, then
  ``post_attention_layernorm`` -> ``mlp`` added to it; Phi-3 the same with one fused ``qkv_proj``;
- GPT-2: ``ln_1`` -> fused ``c_attn`` (query | key | value) -> ``c_proj``, ``ln_2`` -> ``mlp``;
- GPT-NeoX: ``query_key_value`` fused per head (q, k, v of head 0, then head 1, ...) -> ``dense``; with
  ``use_parallel_residual`` attention and MLP read the same stream (its MLP does not see its own heads);
- Phi (1/2): one ``input_layernorm`` read by attention and MLP in parallel, ``dense`` the output projection.

Gemma 2/3 put a norm on the attention's and the MLP's output before the residual add ("sandwich" norms): the
MLP node writes its normed output, and a head writes its slice of the output projection through the attention
norm's Jacobian at the clean run (first order, as the node score is; see docs/edges.md). Others are refused
with the reason (OLMo 2, which reads the stream without a norm of its own).
:func:`check_decomposition` then checks on a real batch that the stream is what the graph says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError
from ..patch import head_layout
from .graph import EdgeGraph

SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
LAYOUTS = "Llama-like (input_layernorm, q/k/v_proj or qkv_proj, o_proj, post_attention_layernorm, mlp), GPT-2, " \
          "GPT-NeoX and Phi"


@dataclass(frozen=True)
class Projection:
    """A projection that reads the normed stream for some of a layer's readers.

    ``weight`` is [out, in] (a Conv1D's transposed); ``readers`` pairs each reader's offset within its layer
    (query heads first, then key heads, value heads: see :class:`~headscore.edges.graph.EdgeGraph`) with the
    output columns that are that reader's.
    """

    module: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    readers: tuple[tuple[int, torch.Tensor], ...]

    @property
    def offsets(self) -> list[int]:
        """The readers' offsets within their layer, in ``readers`` order."""
        return [o for o, _ in self.readers]

    @property
    def columns(self) -> torch.Tensor:
        """The readers' output columns stacked: [readers, D], in ``readers`` order."""
        return torch.stack([c for _, c in self.readers])


@dataclass(frozen=True)
class LayerModules:
    """One decoder layer's residual readers and writers."""

    block: torch.nn.Module
    attn_norm: torch.nn.Module
    projections: tuple[Projection, ...]
    o_weight: torch.Tensor  # [d_model, heads, head_dim]: head h writes o_weight[:, h] @ z_h
    o_bias: torch.Tensor | None  # the output projection's bias: in the stream, no node's (the same in any run)
    mlp_norm: torch.nn.Module
    mlp: torch.nn.Module
    o_proj: torch.nn.Module | None = None
    attn_out_norm: torch.nn.Module | None = None  # a norm on the attention's output before the add (Gemma 2/3)
    mlp_out: torch.nn.Module | None = None  # the module whose output the MLP writes (default the MLP)

    @property
    def mlp_writer(self) -> torch.nn.Module:
        """The module whose output is the MLP node's contribution to the stream."""
        return self.mlp if self.mlp_out is None else self.mlp_out


@dataclass(frozen=True)
class ResidualModel:
    """A model's residual readers and writers, layer by layer, and its edge graph."""

    layers: list[LayerModules]
    final_norm: torch.nn.Module
    graph: EdgeGraph
    head_dim: int
    family: str

    def o_weight(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s output projection as [d_model, heads, head_dim]."""
        return self.layers[layer].o_weight


def _linear_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[out, in] weight and bias of a Linear or a GPT-2 Conv1D (which stores [in, out])."""
    if isinstance(module, torch.nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D":
        return module.weight.T, module.bias
    raise UnsupportedModelError(f"edges: {type(module).__name__} is no plain Linear or Conv1D layer (quantised?); "
                                "edges need the projections' weights")


def _cols(start: int, width: int) -> torch.Tensor:
    return torch.arange(start, start + width)


def _split(module, groups: list[tuple[int, list[torch.Tensor]]], width: int | None = None,
           label: str = "") -> Projection:
    """A projection whose readers ``groups`` = [(first reader offset, [columns of each])]; ``width``: the outputs
    that layout gives it (UnsupportedModelError for another count: queries or keys of another width than the
    heads the output projection takes, one key and value head where the layout has several)."""
    weight, bias = _linear_weight(module)
    if width is not None and weight.shape[0] != width:
        raise UnsupportedModelError(
            f"edges: the attention's {label} has {weight.shape[0]} outputs where heads as wide as the output "
            f"projection's give {width} (queries, keys or values of another width or count); edges cannot split it "
            "into readers")
    readers = tuple((first + i, cols) for first, all_cols in groups for i, cols in enumerate(all_cols))
    return Projection(module, weight, bias, readers)


def _o_weight(module, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = _linear_weight(module)
    if weight.shape[1] != heads * head_dim:
        raise UnsupportedModelError(f"edges: the output projection takes {weight.shape[1]} inputs, not heads x "
                                    f"head_dim = {heads * head_dim}")
    return weight.reshape(weight.shape[0], heads, head_dim), bias


def _layer(block, i: int, name: str, h: int, kv: int, dh: int) -> tuple[LayerModules, bool]:
    """The modules of decoder layer ``block`` and whether it is a parallel block."""
    sandwich = [n for n in SANDWICH_NORMS if hasattr(block, n)]
    if sandwich and not (len(sandwich) == 2 and hasattr(block, "input_layernorm")):
        raise UnsupportedModelError(
            f"edges: {name} normalises the attention and MLP outputs but reads the stream without a norm of its "
            f"own ({', '.join(sandwich)}, no input_layernorm); edges are refused for this family")
    q = lambda j: _cols(j * dh, dh)  # noqa: E731 - column blocks of separate projections
    if hasattr(block, "ln_1") and hasattr(block, "attn") and hasattr(block.attn, "c_attn"):  # GPT-2
        if "BigCode" in type(block).__name__:  # c_attn per head, or one key and value head (multi-query)
            raise UnsupportedModelError(f"edges: {name} lays out its fused query/key/value projection otherwise "
                                        "than GPT-2 (per head, or one key and value head under multi-query); edges "
                                        "are refused for this family")
        attn, width = block.attn, h * dh
        proj = _split(attn.c_attn, [(0, [_cols(j * dh, dh) for j in range(h)]),
                                    (h, [_cols(width + j * dh, dh) for j in range(h)]),
                                    (2 * h, [_cols(2 * width + j * dh, dh) for j in range(h)])], 3 * width, "c_attn")
        return LayerModules(block, block.ln_1, (proj,), *_o_weight(attn.c_proj, h, dh), block.ln_2, block.mlp,
                            attn.c_proj), False
    if hasattr(block, "attention") and hasattr(block.attention, "query_key_value"):  # GPT-NeoX
        attn = block.attention
        proj = _split(attn.query_key_value, [(0, [_cols(j * 3 * dh, dh) for j in range(h)]),
                                             (h, [_cols(j * 3 * dh + dh, dh) for j in range(h)]),
                                             (2 * h, [_cols(j * 3 * dh + 2 * dh, dh) for j in range(h)])],
                      3 * h * dh, "query_key_value")
        parallel = bool(getattr(block, "use_parallel_residual", False))
        return (LayerModules(block, block.input_layernorm, (proj,), *_o_weight(attn.dense, h, dh),
                             block.post_attention_layernorm, block.mlp, attn.dense), parallel)
    attn = getattr(block, "self_attn", None)
    norm = getattr(block, "input_layernorm", None)
    mlp = getattr(block, "mlp", None)
    if attn is None or norm is None or mlp is None:
        raise UnsupportedModelError(f"edges: {name} layer {i} is none of the layouts edges support ({LAYOUTS})")
    if hasattr(attn, "qkv_proj"):  # Phi-3: query | key | value in one projection
        projections = (_split(attn.qkv_proj, [(0, [q(j) for j in range(h)]),
                                              (h, [_cols(h * dh + j * dh, dh) for j in range(kv)]),
                                              (h + kv, [_cols((h + kv) * dh + j * dh, dh) for j in range(kv)])],
                              (h + 2 * kv) * dh, "qkv_proj"),)
    elif all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
        projections = (_split(attn.q_proj, [(0, [q(j) for j in range(h)])], h * dh, "q_proj"),
                       _split(attn.k_proj, [(h, [q(j) for j in range(kv)])], kv * dh, "k_proj"),
                       _split(attn.v_proj, [(h + kv, [q(j) for j in range(kv)])], kv * dh, "v_proj"))
    else:
        raise UnsupportedModelError(f"edges: {name} layer {i}'s attention has no q/k/v projections edges know "
                                    f"({LAYOUTS})")
    out = getattr(attn, "o_proj", None) or getattr(attn, "dense", None)
    if out is None:
        raise UnsupportedModelError(f"edges: {name} layer {i}'s attention has no o_proj or dense output projection")
    if sandwich:  # Gemma 2/3: norms around both sublayers' outputs, heads through the attention's output norm
        return LayerModules(block, norm, projections, *_o_weight(out, h, dh), block.pre_feedforward_layernorm, mlp,
                            out, block.post_attention_layernorm, block.post_feedforward_layernorm), False
    mlp_norm = getattr(block, "post_attention_layernorm", None)
    if mlp_norm is None:  # Phi: one norm, attention and MLP in parallel
        return LayerModules(block, norm, projections, *_o_weight(out, h, dh), norm, mlp, out), True
    return LayerModules(block, norm, projections, *_o_weight(out, h, dh), mlp_norm, mlp, out), False


def _decoder(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    name = type(model).__name__
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    norm = next((getattr(base, n) for n in ("norm", "final_layer_norm", "ln_f", "final_layernorm")
                 if getattr(base, n, None) is not None), None)
    if not isinstance(layers, torch.nn.ModuleList) or norm is None:
        raise UnsupportedModelError(f"edges: {name} has no decoder layers and final norm where headscore looks for "
                                    f"them; edges support {LAYOUTS}")
    return layers, norm


def residual_model(model: torch.nn.Module) -> ResidualModel:
    """The residual readers and writers of ``model`` (UnsupportedModelError, with the reason, for a family
    edges cannot decompose)."""
    name = type(model).__name__
    layers, final_norm = _decoder(model)
    layout = head_layout(model)
    if not layout.uniform:
        raise UnsupportedModelError(f"edges: {name}'s layers differ in head count or width; edges need every "
                                    "layer alike")
    h, kv, dh = layout.num_heads, layout.num_kv_heads, layout.head_dim
    found = [_layer(block, i, name, h, kv, dh) for i, block in enumerate(layers)]
    parallel = {p for _, p in found}
    if len(parallel) > 1:
        raise UnsupportedModelError(f"edges: {name} mixes parallel and sequential blocks")
    graph = EdgeGraph(layout.num_layers, h, kv, parallel=parallel.pop())
    return ResidualModel([lm for lm, _ in found], final_norm, graph, dh, name)


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual stream a decoder layer receives (its ``hidden_states``, positional or by keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def with_layer_input(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    """A decoder layer's (args, kwargs) with ``x`` as the stream it receives (where :func:`layer_input` found it),
    as a forward pre-hook with kwargs returns them."""
    return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})


def module_output(out) -> torch.Tensor:
    """A module's main output (an MoE block may return (hidden states, router logits))."""
    return out[0] if isinstance(out, tuple) else out
