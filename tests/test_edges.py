"""Edge scores and exact edge patching (issue 25) against an independent float64 reference.

The reference is a forward pass written here from the model's weights, one example at a time: every reader
(each query head, each key and value head, each MLP, the final norm) gets its own copy of the residual stream
plus a perturbation e_v of its own, and every writer's contribution (the embeddings, each head's slice of the
output projection, each MLP) is recorded as a separate term. Edge score u -> v is then
< a_u(baseline) - a_u(clean), dL/de_v > by autograd, and exact edge patching is the same forward with
e_v = a_u(baseline) - a_u(clean). The library computes the first from one batched backward pass with hooks
and the second with forward hooks on a padded batch; nothing of either is used here.

The models' RMSNorms compute in float32 whatever the model's dtype (transformers casts); the tests give them a
float64 forward, so that every step runs in float64 and the tolerances can be float64's.
"""

from __future__ import annotations

import csv
import json
import math
import types
from pathlib import Path

import model_matrix
import pytest
import torch
import transformers
from tiny import FAMILIES, ByteTokenizer, random_examples, tiny_model
from tiny_saved import save_tiny_model

import headscore
from headscore.cli import main
from headscore.data.examples import Example
from headscore.edges.attribution import (
    check_decomposition,
    edge_attributions,
    mean_writer_outputs,
    writer_outputs,
    zero_writers,
)
from headscore.edges.circuit import circuit_losses, circuit_sizes, connected, top_circuit
from headscore.edges.graph import EdgeGraph
from headscore.edges.patching import edge_patched_losses, reader_depth
from headscore.edges.residual import residual_model
from headscore.errors import HeadscoreError, UnsupportedModelError
from headscore.loss import NLL
from headscore.methods.gradient import gate_gradients
from headscore.models import LoadedModel
from headscore.patch import patch
from headscore.prepared import prepare


def float64_norms(model: torch.nn.Module) -> None:
    """Every RMSNorm computes in float64 (transformers' casts to float32 whatever the model's dtype); Gemma's
    scale by 1 + weight."""
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def gemma(self, x):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * (1.0 + self.weight)
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = types.MethodType(gemma if name.startswith("Gemma") else forward, module)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [T, heads, D] on its first cos.shape[-1] dimensions (the half-split convention of
    Llama's and GPT-NeoX's; NeoX and Phi rotate only part of each head)."""
    dims = cos.shape[-1]
    x_rot, x_pass = x[..., :dims], x[..., dims:]
    half = dims // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos[:, None] + rotated * sin[:, None], x_pass], dim=-1)


def weight_of(module) -> torch.Tensor:
    """[out, in] (GPT-2's Conv1D keeps [in, out])."""
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.T


def queries_keys_values(block, n: torch.Tensor, heads: int, kv: int, dh: int):
    """q [T, H, D], k and v [T, KV, D] of a layer from normed input n [T, d], split as each family's own code
    splits its projections."""
    t = n.shape[0]
    if hasattr(block, "attn"):  # GPT-2: c_attn gives query | key | value
        q, k, v = block.attn.c_attn(n).split(heads * dh, dim=-1)
        return q.view(t, heads, dh), k.view(t, kv, dh), v.view(t, kv, dh)
    if hasattr(block, "attention"):  # GPT-NeoX: per head, its query, key and value
        q, k, v = block.attention.query_key_value(n).view(t, heads, 3 * dh).chunk(3, dim=-1)
        return q, k, v
    attn = block.self_attn
    if hasattr(attn, "qkv_proj"):  # Phi-3
        qkv = attn.qkv_proj(n)
        q, k, v = qkv[:, :heads * dh], qkv[:, heads * dh:(heads + kv) * dh], qkv[:, (heads + kv) * dh:]
    else:
        q, k, v = attn.q_proj(n), attn.k_proj(n), attn.v_proj(n)
    q, k, v = q.view(t, heads, dh), k.view(t, kv, dh), v.view(t, kv, dh)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3's per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def parts(block):
    """(attention norm, output projection, MLP norm, parallel): how the layer reads and writes the stream."""
    if hasattr(block, "attn"):
        return block.ln_1, block.attn.c_proj, block.ln_2, False
    if hasattr(block, "attention"):
        return block.input_layernorm, block.attention.dense, block.post_attention_layernorm, \
            block.use_parallel_residual
    out = getattr(block.self_attn, "o_proj", None) or block.self_attn.dense
    if hasattr(block, "pre_feedforward_layernorm"):  # Gemma 2/3: the MLP reads through its own pre-norm
        return block.input_layernorm, out, block.pre_feedforward_layernorm, False
    mlp_norm = getattr(block, "post_attention_layernorm", None)
    return block.input_layernorm, out, mlp_norm or block.input_layernorm, mlp_norm is None


def reference(model, ids: torch.Tensor, target: torch.Tensor, perturb: dict | None = None,
              first_input: torch.Tensor | None = None):
    """Loss (mean NLL of the target tokens) of one example [T] and every writer's contribution [T, d]:
    {"emb", (l, "H", h), (l, "mlp")}. ``perturb[reader]`` [T, d] is added to that reader's residual input only;
    readers are (l, "q", h), (l, "k", j), (l, "v", j), (l, "mlp") and "logits". The stream entering the first
    layer (embeddings, positions, any scaling) is taken from the model's own forward, or is ``first_input``."""
    perturb = perturb or {}
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    base = model.get_decoder()
    blocks = getattr(base, "layers", None) or base.h
    final = next(getattr(base, n) for n in ("norm", "final_layer_norm", "ln_f", "final_layernorm") if hasattr(base, n))
    seen = {}

    def first_layer_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    hook = blocks[0].register_forward_pre_hook(first_layer_input, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids[None])
    hook.remove()
    t = ids.shape[0]
    x = seen["x"][0].detach() if first_input is None else first_input
    writes = {"emb": x}
    rotary = getattr(base, "rotary_emb", None)
    positions = torch.arange(t)[None]
    layer_types = getattr(cfg, "layer_types", None)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    cap = getattr(cfg, "attn_logit_softcapping", None)

    def read(key, stream):
        e = perturb.get(key)
        if callable(e):  # a perturbation that depends on what this run has written so far
            e = e(writes)
        return stream if e is None else stream + e

    for layer, block in enumerate(blocks):
        attn_norm, out_proj, mlp_norm, parallel = parts(block)
        wo = weight_of(out_proj).view(-1, heads, dh)
        attention = getattr(block, "self_attn", None) or getattr(block, "attn", None) or block.attention
        scale = getattr(attention, "scaling", dh ** -0.5)
        if rotary is None:
            cos = sin = None
        elif layer_types and isinstance(getattr(rotary, "rope_type", None), dict):  # Gemma 3: per layer type
            cos, sin = rotary(x[None], positions, layer_types[layer])
        else:
            cos, sin = rotary(x[None], positions)
        sandwich = hasattr(block, "post_feedforward_layernorm")

        def qkv_for(key, index, which, x=x, block=block, attn_norm=attn_norm, cos=cos, sin=sin):
            q, k, v = queries_keys_values(block, attn_norm(read(key, x)), heads, kv, dh)
            if cos is not None:
                q, k = rope(q, cos[0], sin[0]), rope(k, cos[0], sin[0])
            return (q, k, v)[which][:, index]

        keys = [qkv_for((layer, "k", j), j, 1) for j in range(kv)]
        values = [qkv_for((layer, "v", j), j, 2) for j in range(kv)]
        attn = 0.0
        for h in range(heads):
            q = qkv_for((layer, "q", h), h, 0)
            j = h // (heads // kv)
            logits = q @ keys[j].T * scale
            if cap:
                logits = torch.tanh(logits / cap) * cap
            weights = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)
            writes[(layer, "H", h)] = (weights @ values[j]) @ wo[:, h].T  # the head's slice of the projection
            attn = attn + writes[(layer, "H", h)]
        if out_proj.bias is not None:
            attn = attn + out_proj.bias
        if sandwich:  # the attention's output through its norm; heads write through its Jacobian
            writes[("raw", layer)] = attn
            attn = block.post_attention_layernorm(attn)
        total = x + attn
        mlp_out = block.mlp(mlp_norm(read((layer, "mlp"), x if parallel else total))[None])  # MoE blocks want [B, T, d]
        mlp_out = (mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out)[0]
        writes[(layer, "mlp")] = block.post_feedforward_layernorm(mlp_out) if sandwich else mlp_out
        x = total + writes[(layer, "mlp")]
    logits = model.get_output_embeddings()(final(read("logits", x)))
    if getattr(cfg, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
    logp = torch.log_softmax(logits, dim=-1)
    where = target.nonzero().flatten()  # target token at t, predicted at t - 1
    return -logp[where - 1, ids[where]].mean(), writes


def node_keys(graph: EdgeGraph) -> tuple[list, list]:
    """The reference's writer and reader keys in the graph's upstream and downstream order."""
    up = ["emb"]
    for layer in range(graph.num_layers):
        up += [(layer, "H", h) for h in range(graph.num_heads)] + [(layer, "mlp")]
    down = []
    for layer in range(graph.num_layers):
        down += [(layer, "q", h) for h in range(graph.num_heads)]
        down += [(layer, "k", j) for j in range(graph.num_kv_heads)]
        down += [(layer, "v", j) for j in range(graph.num_kv_heads)]
        down.append((layer, "mlp"))
    return up, [*down, "logits"]


def reference_scores(model, ids, target, changes, graph, first_input=None) -> torch.Tensor:
    """[U, V] edge scores of one example from autograd through the reference (0 where no edge)."""
    up, down = node_keys(graph)
    d = model.config.hidden_size
    perturb = {key: torch.zeros(ids.shape[0], d, dtype=torch.float64, requires_grad=True) for key in down}
    loss, _ = reference(model, ids, target, perturb, first_input)
    grads = torch.autograd.grad(loss, [perturb[k] for k in down])
    out = torch.zeros(len(up), len(down), dtype=torch.float64)
    for i, u in enumerate(up):
        for j, g in enumerate(grads):
            out[i, j] = (changes[u] * g).sum()
    return (out * graph.allowed).detach()


def examples_with_corruption(n: int, seed: int) -> list[Example]:
    """Random examples, each with a corrupted prompt of its own prompt's length (other letters)."""
    plain = random_examples(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for ex in plain:
        corrupt = "".join(letters[int(i)] for i in torch.randint(0, 26, (len(ex.prompt),), generator=g))
        out.append(Example(ex.prompt, ex.target, ex.task, corrupt=corrupt))
    return out


def gemma(family: str, seed: int) -> LoadedModel:
    """A tiny Gemma 3 text model (float64, SDPA attention): sandwich norms, a sliding and a global layer (each its
    own rotary); or Gemma 2 (eager attention only, soft-capped logits)."""
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=0,
                  query_pre_attn_scalar=8, tie_word_embeddings=False)
    if family == "gemma3":
        config = transformers.Gemma3TextConfig(**common, sliding_window=64,
                                               layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Gemma3ForCausalLM
    else:
        config = transformers.Gemma2Config(**common, final_logit_softcapping=30.0)
        cls = transformers.Gemma2ForCausalLM
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="sdpa" if family == "gemma3" else "eager",
                             dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 2 else 0.2)
    return LoadedModel(model.eval(), ByteTokenizer(), f"tiny-{family}")


def build(family: str, layers: int, heads: int, kv: int, seed: int) -> LoadedModel:
    """A tiny float64 model: tests/tiny.py's for its families, Gemma 2/3 (sandwich norms), else the model
    matrix's (2 layers, 4 heads)."""
    if family in ("gemma2", "gemma3"):
        lm = gemma(family, seed)
    elif family in FAMILIES:
        lm = tiny_model(family, layers=layers, heads=heads, kv_heads=kv, dtype=torch.float64, seed=seed)
    else:
        model = model_matrix.build_model(family, seed=seed)
        model.set_attn_implementation("sdpa")  # eager attention of some families takes its softmax in float32
        lm = LoadedModel(model, ByteTokenizer(), f"tiny-{family}")
    float64_norms(lm.model)
    return lm


CASES = [  # family, layers, heads, kv heads (tiny.py's families), baseline, examples, seed
    ("llama", 3, 4, 2, "zero", 4, 0),
    ("llama", 2, 4, 1, "corrupt", 3, 1),
    ("llama", 2, 4, 2, "mean", 3, 9),
    ("qwen3", 2, 4, 2, "corrupt", 3, 2),
    ("mistral", 2, 2, 2, "zero", 2, 3),
    ("gpt2", 0, 0, 0, "corrupt", 3, 4),
    ("gpt2", 0, 0, 0, "mean", 3, 10),  # fused query | key | value, Conv1D, learned positions
    ("gpt_neox", 0, 0, 0, "zero", 3, 5),  # parallel residual, per-head fused projection, partial rotary
    ("phi", 0, 0, 0, "corrupt", 2, 6),  # one norm read by attention and MLP in parallel
    ("phi3", 0, 0, 0, "zero", 2, 7),  # fused qkv_proj
    ("qwen3_moe", 0, 0, 0, "corrupt", 3, 8),  # grouped-query attention, per-head norms, experts as the MLP
    ("gemma3", 0, 0, 0, "corrupt", 3, 11),  # sandwich norms: heads through the attention norm's Jacobian
    ("gemma3", 0, 0, 0, "mean", 3, 12),
]


@pytest.mark.numerics
@pytest.mark.parametrize("family,layers,heads,kv,baseline,n,seed", CASES)
def test_edge_scores_and_patching_equal_the_reference(family, layers, heads, kv, baseline, n, seed):
    lm = build(family, layers, heads, kv, seed)
    layers, heads = lm.model.config.num_hidden_layers, lm.model.config.num_attention_heads
    examples = examples_with_corruption(n, seed) if baseline == "corrupt" else random_examples(n, seed=seed)
    prep = prepare(lm, examples)
    rm = residual_model(lm.model)
    graph = rm.graph
    batch = next(iter(prep.batches(n, progress=False)))
    assert bool((batch.attention_mask == 0).any())  # padded: the hooks must keep rows apart
    with patch(lm.model) as gates:
        check_decomposition(lm.model, gates, rm, batch)
        clean = writer_outputs(lm.model, gates, rm, batch)
        base = {"zero": lambda: "zero", "corrupt": lambda: writer_outputs(lm.model, gates, rm, batch.corrupted()),
                "mean": lambda: mean_writer_outputs(lm.model, gates, rm, [batch])}[baseline]()
        loss, scores, grad = edge_attributions(lm.model, gates, rm, batch, base)
        chosen = pick_edges(graph, scores, seed)
        clean_loss, patched = edge_patched_losses(lm.model, gates, rm, batch, chosen,
                                                  zero_writers(rm, clean.emb) if baseline == "zero" else base,
                                                  max_rows=5)
        _, gate_grad = gate_gradients(lm.model, gates, batch, None if baseline == "zero" else torch.stack(base.heads))
    up, down = node_keys(graph)
    rows = [reference_row(lm.model, batch, row) for row in range(n)]
    if baseline == "mean":  # each writer's mean output over every real token of the batch
        tokens = sum(w["emb"].shape[0] for _, _, _, w in rows)
        means = {k: sum(w[k].sum(0) for _, _, _, w in rows) / tokens for k in up}
    for row, (ids, target, ref_loss, clean_writes) in enumerate(rows):
        assert float(loss[row]) == pytest.approx(float(ref_loss.detach()), rel=1e-12)
        assert float(clean_loss[row]) == pytest.approx(float(ref_loss.detach()), rel=1e-12)
        if baseline == "corrupt":
            _, corrupt_writes = reference(lm.model, batch.corrupt_ids[row, :ids.shape[0]], target)
            changes = {k: corrupt_writes[k] - clean_writes[k] for k in up}
        elif baseline == "mean":
            changes = {k: means[k] - clean_writes[k] for k in up}
        else:
            changes = {k: -clean_writes[k] for k in up}
        first_order, changes = through_output_norms(lm.model, clean_writes, changes)
        want = reference_scores(lm.model, ids, target, first_order, graph)
        scale = float(want.abs().max())
        assert scale > 1e-3
        assert torch.allclose(scores[row], want, rtol=1e-9, atol=1e-9 * scale), \
            float((scores[row] - want).abs().max())
        for k, (u, v) in enumerate(chosen):
            exact = float(reference(lm.model, ids, target, {down[v]: changes[up[u]]})[0].detach())
            assert float(patched[k, row]) == pytest.approx(exact, rel=1e-10, abs=1e-12), (up[u], down[v])
    # summed over its readers, a head's edge scores are its node score (-dL/dg against the same baseline)
    node = torch.stack([scores[:, graph.head_index(layer, 0):graph.head_index(layer, 0) + heads].sum(-1)
                        for layer in range(layers)], 1)
    assert torch.allclose(node, -grad, rtol=1e-10, atol=1e-12 * float(grad.abs().max()))
    assert torch.allclose(grad, gate_grad, rtol=1e-12, atol=1e-14)


def through_output_norms(model, clean_writes: dict, changes: dict) -> tuple[dict, dict]:
    """A head's change as it reaches the stream where its layer's attention output goes through a norm (Gemma's
    post-attention norm): first order (the norm's Jacobian at the clean output, by forward-mode autograd) for the
    scores, exact (the norm recomputed on the changed output) for patching. Unchanged elsewhere."""
    first, exact = dict(changes), dict(changes)
    for key, change in changes.items():
        if isinstance(key, tuple) and key[1] == "H" and ("raw", key[0]) in clean_writes:
            norm = model.get_decoder().layers[key[0]].post_attention_layernorm
            raw = clean_writes[("raw", key[0])].detach()
            first[key] = torch.func.jvp(norm.forward, (raw,), (change.detach(),))[1]
            exact[key] = norm(raw + change.detach()) - norm(raw)
    return first, exact


def reference_row(model, batch, row: int):
    """(ids, target mask, loss, writes) of the batch's row ``row`` without its padding, from the reference."""
    length = int(batch.attention_mask[row].sum())
    ids, target = batch.input_ids[row, :length], batch.target_mask[row, :length]
    loss, writes = reference(model, ids, target)
    return ids, target, loss, writes


def pick_edges(graph: EdgeGraph, scores: torch.Tensor, seed: int) -> list[tuple[int, int]]:
    """Edges into every kind of reader: the largest few, and random ones (every kind of writer)."""
    allowed = graph.allowed.nonzero().tolist()
    g = torch.Generator().manual_seed(seed)
    picks = [tuple(allowed[int(i)]) for i in torch.randperm(len(allowed), generator=g)[:14]]
    top = scores.abs().sum(0).flatten().argsort(descending=True)[:4]
    picks += [divmod(int(i), len(graph.downstream)) for i in top]
    picks += [(0, len(graph.downstream) - 1), (graph.head_index(0, 1), graph.reader_start(1) + graph.num_heads)]
    return picks


def test_the_graph_says_which_edges_exist():
    g = EdgeGraph(2, 2, 1)
    assert g.upstream == ["emb", "L0.H0", "L0.H1", "L0.mlp", "L1.H0", "L1.H1", "L1.mlp"]
    assert g.downstream == ["L0.H0.q", "L0.H1.q", "L0.KV0.k", "L0.KV0.v", "L0.mlp",
                            "L1.H0.q", "L1.H1.q", "L1.KV0.k", "L1.KV0.v", "L1.mlp", "logits"]
    a = g.allowed
    up, down = g.index, g.index
    assert a[up("emb", upstream=True)].all()
    assert a[up("L0.H1", upstream=True), down("L0.mlp", upstream=False)]  # sequential: the MLP reads its heads
    assert not a[up("L0.H1", upstream=True), down("L0.KV0.v", upstream=False)]
    assert not a[up("L0.mlp", upstream=True), down("L0.mlp", upstream=False)]
    assert a[up("L0.mlp", upstream=True), down("L1.H0.q", upstream=False)]
    assert not a[up("L1.H0", upstream=True), down("L0.mlp", upstream=False)]
    assert a[:, -1].all()  # every writer reaches the logits
    parallel = EdgeGraph(2, 2, 1, parallel=True)
    assert not parallel.allowed[up("L0.H1", upstream=True), down("L0.mlp", upstream=False)]
    assert g.num_edges == int(a.sum()) and parallel.num_edges == g.num_edges - 4  # 2 layers x 2 heads
    with pytest.raises(ValueError, match="no downstream node 'L5.mlp'"):
        g.index("L5.mlp", upstream=False)


def test_families_edges_cannot_decompose_are_refused():
    olmo = transformers.Olmo2ForCausalLM._from_config(transformers.Olmo2Config(
        vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="reads the stream without a norm of its own"):
        residual_model(olmo)
    gpt_j = LoadedModel(model_matrix.build_model("gptj"), ByteTokenizer(), "tiny-gptj")
    with pytest.raises(UnsupportedModelError, match="none of the layouts edges support"):
        residual_model(gpt_j.model)
    # GPT-BigCode (StarCoder) has GPT-2's names with another c_attn layout: its edges patched head 0's key for
    # head 1's query; MiMo-V2-Flash's queries and keys are wider than the heads the output projection takes
    with pytest.raises(UnsupportedModelError, match="otherwise than GPT-2"):
        residual_model(model_matrix.build_model("gpt_bigcode"))
    with pytest.raises(UnsupportedModelError, match="q_proj has 32 outputs where heads as wide as the output "
                                                    "projection's give 24"):
        residual_model(model_matrix.build_model("mimo_v2_flash"))
    # NanoChat runs its final norm on the embeddings too: the logits reader's hook changed both calls
    nanochat = LoadedModel(model_matrix.build_model("nanochat"), ByteTokenizer(), "tiny-nanochat")
    batch = next(iter(prepare(nanochat, random_examples(3)).batches(3, progress=False)))
    with patch(nanochat.model) as gates, pytest.raises(UnsupportedModelError, match="runs the final norm 2 times"):
        check_decomposition(nanochat.model, gates, residual_model(nanochat.model), batch)


def test_edge_scores_that_are_not_finite_are_refused():
    """A sliding window (4) shorter than a batch's padding under eager attention: plain scoring refuses the NaN
    gate gradients, and so does an edge run now (it wrote a file whose every edge of a task was NaN, which reads
    as 'no such edge', and circuit took it)."""
    lm = LoadedModel(model_matrix.build_model("granite_swa"), ByteTokenizer(), "tiny-granite-swa")
    examples = [Example("ab", "c", "alpha", corrupt="ax", foil="d"),
                Example("abcdefghijklmn", "c", "alpha", corrupt="abcdefghijklmx", foil="d")]
    with pytest.raises(HeadscoreError, match="non-finite gate gradients"):
        headscore.score(lm, examples, batch_size=2, progress=False)
    with pytest.raises(HeadscoreError, match="non-finite gate gradients"):
        headscore.score(lm, examples, baseline="corrupt", edges=True, batch_size=2, progress=False)


def test_a_stream_that_is_not_the_sum_of_its_nodes_is_refused():
    """A layer that scales what it adds (as Granite's residual multiplier does) fails the decomposition check."""
    lm = tiny_model("llama", layers=2, heads=2, kv_heads=1)
    rm = residual_model(lm.model)
    batch = next(iter(prepare(lm, random_examples(3)).batches(3, progress=False)))
    with patch(lm.model) as gates:
        check_decomposition(lm.model, gates, rm, batch)  # as the model is: passes
        block = rm.layers[0].block
        block.register_forward_hook(lambda m, args, out: args[0] + 0.5 * (out - args[0]))
        with pytest.raises(UnsupportedModelError, match="layer 1's input is off by .* of its size"):
            check_decomposition(lm.model, gates, rm, batch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_edges_in_half_precision(dtype):
    """score(edges=True) on a bfloat16 or float16 model (it stopped with a dtype mismatch in bmm: the reader
    gradients came in the model's dtype, the heads' contributions in float32): the edge map ranks as the float64
    model's does, and each head's edges sum to its score as in float64."""
    from headscore.stats import spearman

    examples = random_examples(4, seed=1)
    ref = headscore.score(tiny_model("llama", layers=2, heads=4, kv_heads=2, dtype=torch.float64, seed=0), examples,
                          edges=True, progress=False)
    half = headscore.score(tiny_model("llama", layers=2, heads=4, kv_heads=2, dtype=dtype, seed=0), examples,
                           edges=True, progress=False)
    a, b = half.edge_maps.values, ref.edge_maps.values
    assert torch.equal(a.isnan(), b.isnan()) and bool(a[~a.isnan()].isfinite().all())
    assert spearman(a[~a.isnan()].numpy(), b[~b.isnan()].numpy()) > 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_scaled_stream_is_refused_in_half_precision_too(dtype):
    """Granite's residual multiplier (0.22, as Granite 3 ships) scales what each layer adds: refused in every dtype
    (in bfloat16 and float16 the check's tolerance for i layers' round-off allowed the whole stream, and it
    passed; each layer's own addition is checked there now)."""
    config = transformers.GraniteConfig(vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=0, residual_multiplier=0.22)
    torch.manual_seed(0)
    model = transformers.GraniteForCausalLM._from_config(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    lm = LoadedModel(model, ByteTokenizer(), "tiny-granite")
    batch = next(iter(prepare(lm, random_examples(4, seed=1)).batches(4, progress=False)))
    with patch(model) as gates, pytest.raises(UnsupportedModelError, match="edges cannot decompose it"):
        check_decomposition(model, gates, residual_model(model), batch)


# ------------------------------------------------------------------------------------------ API, file, CLI


def test_score_with_edges_keeps_heads_and_edges_in_one_file(tmp_path):
    lm = tiny_model("llama", layers=2, heads=4, kv_heads=2, dtype=torch.float64)
    float64_norms(lm.model)  # else the norms' float32 steps leave the sum check at ~1e-8
    examples = examples_with_corruption(6, 11)
    for baseline in ("zero", "mean", "corrupt"):
        plain = headscore.score(lm, examples, baseline=baseline, progress=False)
        scores = headscore.score(lm, examples, baseline=baseline, edges=True, progress=False)
        assert scores.method == plain.method
        # the same node scores (the heads' plain mean baseline is kept in float32: 6e-8 of a value)
        rtol = 1e-6 if baseline == "mean" else 1e-12
        assert torch.allclose(scores.values, plain.values, rtol=rtol, atol=rtol * 1e-2)
        up, down = scores.edge_nodes
        graph = residual_model(lm.model).graph
        assert (up, down) == (graph.upstream, graph.downstream)
        for task in scores.tasks:
            grid = scores.edges(task)
            assert torch.equal(grid.isnan(), ~graph.allowed)
            # a head's edges sum to its node score, task by task
            for layer in range(2):
                for head in range(4):
                    total = grid[graph.head_index(layer, head)].nansum()
                    assert float(total) == pytest.approx(float(scores.task(task)[layer, head]), rel=1e-9, abs=1e-12)
        path = scores.save(tmp_path / f"{baseline}.hs")
        back = headscore.HeadScores.load(path)
        assert back.edge_nodes == scores.edge_nodes
        for name in ("values", "stderr", "example_values"):
            a, b = getattr(back.edge_maps, name), getattr(scores.edge_maps, name)
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), name
        sub = scores.select([scores.tasks[1]])
        kept = scores.example_tasks == 1
        assert torch.equal(sub.edges(scores.tasks[1]).nan_to_num(7.0), scores.edges(scores.tasks[1]).nan_to_num(7.0))
        assert torch.equal(sub.edge_maps.example_values.nan_to_num(7.0),
                           scores.edge_maps.example_values[kept].nan_to_num(7.0))
    # per-example edge values (kept in float32: 6e-8 of the largest) average to the task's
    t0 = scores.example_tasks == 0
    mean = scores.edge_maps.example_values[t0].double().mean(0).nan_to_num(0.0)
    want = scores.edge_maps.values[0].nan_to_num(0.0)
    assert torch.allclose(mean, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_exact_edge_patching_as_a_file_and_compared(tmp_path):
    lm = tiny_model("llama", layers=2, heads=2, kv_heads=1, dtype=torch.float64)
    float64_norms(lm.model)
    examples = examples_with_corruption(4, 12)
    scores = headscore.score(lm, examples, baseline="corrupt", edges=True, progress=False)
    every = headscore.ablate_edges(lm, examples, baseline="corrupt", rows_per_pass=7, progress=False)
    graph = residual_model(lm.model).graph
    assert every.method == "edge-patching-corrupt" and bool(every.values.isnan().all())
    assert torch.equal(every.edge_maps.exact[0], graph.allowed)
    top = headscore.ablate_edges(lm, examples, scores=scores, top=5, baseline="corrupt", progress=False)
    measured = top.edge_maps.exact[0]
    assert 5 <= int(measured.sum()) <= 5 * len(scores.tasks)
    for t in range(len(scores.tasks)):  # each task's own top 5 by |score| are among the measured
        ranked = scores.edge_maps.values[t].abs().nan_to_num(-1.0).flatten().topk(5).indices
        assert bool(measured.flatten()[ranked].all())
    # measuring a subset gives the values of measuring all (the same runs, rows packed otherwise)
    assert torch.allclose(top.edge_maps.values[:, measured], every.edge_maps.values[:, measured], rtol=1e-10,
                          atol=1e-12)
    named = headscore.ablate_edges(lm, examples, [("emb", "logits"), ("L0.H1", "L1.H0.q")], baseline="corrupt",
                                   progress=False)
    assert int(named.edge_maps.exact[0].sum()) == 2
    agree = headscore.compare_edges(scores, every)
    assert set(agree) == set(scores.tasks) and all(-1 <= a.spearman <= 1 for a in agree.values())
    path = every.save(tmp_path / "every.hs")
    assert torch.equal(headscore.HeadScores.load(path).edge_maps.exact, every.edge_maps.exact)
    with pytest.raises(HeadscoreError, match="no edge L1.H0 -> L0.mlp"):
        headscore.ablate_edges(lm, examples, [("L1.H0", "L0.mlp")], progress=False)
    with pytest.raises(HeadscoreError, match="no upstream node 'L9.H0'"):
        headscore.ablate_edges(lm, examples, [("L9.H0", "logits")], progress=False)
    with pytest.raises(HeadscoreError, match=r"999 edges asked for, but the model has \d+"):
        headscore.ablate_edges(lm, examples, scores=scores, top=999, progress=False)


def test_the_command_line_scores_patches_exports_and_compares_edges(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": e.prompt, "target": e.target, "task": e.task}) + "\n"
                             for e in random_examples(4, seed=3)))
    common = ["--model", str(model_dir), "--tasks", str(tasks), "--no-progress"]
    assert main(["score", *common, "--edges", "--out", str(tmp_path / "s.hs"), "--export-edges",
                 str(tmp_path / "e.csv"), "--export-edges", str(tmp_path / "e.json")]) == 0
    assert "edges in" in capsys.readouterr().out
    scores = headscore.HeadScores.load(tmp_path / "s.hs")
    rows = list(csv.DictReader((tmp_path / "e.csv").open(encoding="utf-8")))
    assert len(rows) == len(scores.tasks) * scores.edge_maps.num_edges
    first = rows[0]
    u, v = scores.edge_nodes[0].index(first["upstream"]), scores.edge_nodes[1].index(first["downstream"])
    assert float(first["value"]) == float(scores.edges(first["task"])[u, v])
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["upstream"] == scores.edge_nodes[0] and len(doc["values"]) == len(scores.tasks)
    assert main(["ablate", *common, "--edges", "--scores", str(tmp_path / "s.hs"), "--top", "3",
                 "--out", str(tmp_path / "x.hs")]) == 0
    assert "edge-patching-zero" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "s.hs"), str(tmp_path / "x.hs"), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "edges, taylor vs edge-patching-zero" in out
    assert set(json.loads((tmp_path / "c.json").read_text())["_edges"]) == set(scores.tasks)
    out = tmp_path / "circ"
    assert main(["circuit", str(tmp_path / "s.hs"), *common, "--edges", "20", "--sizes", "5,20,50",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["circuit.html", "circuit.pdf", "circuit.png", "circuits.json",
                                                     "faithfulness.pdf", "faithfulness.png"]
    doc = json.loads((out / "circuits.json").read_text())
    assert [c["task"] for c in doc["circuits"]] == scores.tasks
    for c in doc["circuits"]:
        assert c["asked"] == 20 and [p["asked"] for p in c["curve"]] == [5, 20, 50]
        assert len(c["edges"]) == next(p["edges"] for p in c["curve"] if p["asked"] == 20) <= 20
        assert f"{c['task']}: {len(c['edges'])} edges (top 20)" in printed
    assert main(["circuit", str(tmp_path / "s.hs"), *common, "--target-faithfulness", "0.5", "--sizes", "5,20",
                 "--out", str(out)]) == 0  # the directory is replaced whole
    chosen = json.loads((out / "circuits.json").read_text())["circuits"][0]
    reached = [p for p in chosen["curve"] if p["faithfulness"] >= 0.5]
    assert chosen["asked"] == (reached[0]["asked"] if reached else 20)


# ------------------------------------------------------------------------------------------------- circuits


@pytest.mark.numerics
@pytest.mark.parametrize("family,baseline,seed", [("llama", "corrupt", 20), ("gpt_neox", "corrupt", 21),
                                                   ("phi", "zero", 22), ("gpt2", "mean", 23),
                                                   ("gemma3", "corrupt", 24)])
def test_circuit_runs_equal_the_reference(family, baseline, seed):
    """Each reader reads the run's stream with every writer whose edge is not in the circuit replaced by its
    baseline output; the reference builds that reader by reader from the run's own writes."""
    lm = build(family, 2, 4, 2, seed)
    examples = examples_with_corruption(3, seed)
    prep = prepare(lm, examples)
    rm = residual_model(lm.model)
    graph = rm.graph
    batch = next(iter(prep.batches(3, progress=False)))
    g = torch.Generator().manual_seed(seed)
    circuits = torch.rand((4, *graph.allowed.shape), generator=g) < torch.tensor([0.0, 0.3, 0.8, 1.0])[:, None, None]
    circuits &= graph.allowed
    with patch(lm.model) as gates:
        clean = writer_outputs(lm.model, gates, rm, batch)
        base = {"zero": lambda: zero_writers(rm, clean.emb), "corrupt": lambda: writer_outputs(lm.model, gates, rm,
                                                                                        batch.corrupted()),
                "mean": lambda: mean_writer_outputs(lm.model, gates, rm, [batch])}[baseline]()
        got = circuit_losses(lm.model, gates, rm, batch, circuits, base, max_rows=5)
    up, down = node_keys(graph)
    rows = [reference_row(lm.model, batch, row) for row in range(3)]
    if baseline == "mean":
        tokens = sum(w["emb"].shape[0] for _, _, _, w in rows)
        means = {k: sum(w[k].sum(0) for _, _, _, w in rows) / tokens for k in up}
    for row, (ids, target, clean_loss, _) in enumerate(rows):
        if baseline == "corrupt":
            base_writes = reference(lm.model, batch.corrupt_ids[row, :ids.shape[0]], target)[1]
        elif baseline == "mean":
            base_writes = means
        else:
            base_writes = {k: 0.0 for k in up}
        for c in range(circuits.shape[0]):
            perturb = {}
            for j, reader in enumerate(down):
                cut = [up[i] for i in (graph.allowed[:, j] & ~circuits[c, :, j]).nonzero().flatten().tolist()]
                if cut:
                    perturb[reader] = lambda writes, cut=cut, base=base_writes: cut_edges(lm.model, writes, base, cut)
            want = float(reference(lm.model, ids, target, perturb)[0].detach())
            assert float(got[c, row]) == pytest.approx(want, rel=1e-9, abs=1e-11), (c, row)
        assert float(got[-1, row]) == pytest.approx(float(clean_loss.detach()), rel=1e-10)  # every edge: clean
        assert abs(float(got[0, row] - got[-1, row])) > 1e-3  # no edge: far from clean (the check can fail)


def cut_edges(model, writes: dict, base: dict, cut: list):
    """What a reader's input changes by when the writers ``cut`` give it their baseline output instead of this
    run's: the sum of their changes, except that where a layer's attention output goes through a norm, its cut
    heads' changes go in before the norm and the norm is recomputed."""
    total, through_norm = 0.0, {}
    for u in cut:
        if isinstance(u, tuple) and u[1] == "H" and ("raw", u[0]) in writes:
            through_norm[u[0]] = through_norm.get(u[0], 0.0) + base[u] - writes[u]
        else:
            total = total + base[u] - writes[u]
    for layer, change in through_norm.items():
        norm, raw = model.get_decoder().layers[layer].post_attention_layernorm, writes[("raw", layer)]
        total = total + norm(raw + change) - norm(raw)
    return total


def test_a_circuit_without_one_edge_is_that_edge_patched():
    lm = build("llama", 2, 4, 2, 30)
    examples = examples_with_corruption(3, 30)
    rm = residual_model(lm.model)
    graph = rm.graph
    batch = next(iter(prepare(lm, examples).batches(3, progress=False)))
    edges = pick_edges(graph, torch.rand(3, *graph.allowed.shape), 30)[:6]
    with patch(lm.model) as gates:
        base = writer_outputs(lm.model, gates, rm, batch.corrupted())
        circuits = graph.allowed[None].repeat(len(edges), 1, 1)
        for i, (u, v) in enumerate(edges):
            circuits[i, u, v] = False
        got = circuit_losses(lm.model, gates, rm, batch, circuits, base)
        want = edge_patched_losses(lm.model, gates, rm, batch, edges, base)[1]
        corrupt_run = circuit_losses(lm.model, gates, rm, batch, torch.zeros_like(circuits[:1]), base)
        from headscore.loss import example_losses
        corrupt_loss = example_losses(lm.model, batch.corrupted())
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    # no edge at all, against the corrupted writers: the corrupted run
    assert torch.allclose(corrupt_run[0], corrupt_loss.double(), rtol=1e-10, atol=1e-12)


def test_edge_patching_replay_with_a_steering_hook_on_a_block():
    """A user's forward hook on a decoder block (a steering vector) acts once in edge patching's replayed passes,
    as in full passes: every edge's patched loss equals the one without replay."""
    lm = build("llama", 3, 4, 2, 31)
    examples = examples_with_corruption(3, 31)
    rm = residual_model(lm.model)
    batch = next(iter(prepare(lm, examples).batches(3, progress=False)))
    edges = pick_edges(rm.graph, torch.rand(3, *rm.graph.allowed.shape), 31)[:8]
    vector = torch.randn(lm.model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def steer(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.add_(vector)  # in place: the recording must not see it

    handle = lm.model.model.layers[1].register_forward_hook(steer)
    try:
        with patch(lm.model) as gates:
            base = writer_outputs(lm.model, gates, rm, batch.corrupted())
            # one edge a pass (max_rows = the batch), so each pass replays every layer below its reader
            replayed = edge_patched_losses(lm.model, gates, rm, batch, edges, base, max_rows=3)
            full = edge_patched_losses(lm.model, gates, rm, batch, edges, base, max_rows=3, prefix=False)
    finally:
        handle.remove()
    assert 2 in {reader_depth(rm, v) for _, v in edges}  # a pass replays layer 1, the steered one, last
    for a, b in zip(replayed, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_edge_patching_checks_its_replay_and_runs_every_layer_where_it_fails():
    """A model whose last layer's queries depend on how many layers ran in the pass (state outside the layers'
    outputs; the stream is still the sum of its writers) cannot be replayed: the first batch's check warns, the
    file says mode 'batched', and every edge equals the unreplayed patching (which the replay misses); without
    that state the replay is kept."""
    lm = build("llama", 3, 4, 2, 33)
    examples = examples_with_corruption(3, 33)
    edges = [("emb", "L0.H0.q"), ("emb", "L1.H1.q"), ("emb", "L2.H0.q"), ("L0.H1", "L2.mlp"), ("L1.mlp", "logits")]
    plain = headscore.ablate_edges(lm, examples, edges, baseline="corrupt", rows_per_pass=3, progress=False)
    assert plain.extra["mode"] == "prefix"
    layers = lm.model.model.layers
    calls = {"n": 0}
    handles = [lm.model.model.register_forward_pre_hook(lambda module, args: calls.update(n=0))]
    forwards = [layer.forward for layer in layers]

    def counting(forward):
        def run(*args, **kwargs):  # the layer's own code, not a hook (a replay calls hooks on replayed layers)
            calls["n"] += 1
            return forward(*args, **kwargs)
        return run

    for layer, forward in zip(layers, forwards, strict=True):
        layer.forward = counting(forward)
    handles.append(layers[-1].self_attn.q_proj.register_forward_hook(
        lambda module, args, output: output * (1.0 + 0.1 * calls["n"])))
    try:
        with pytest.warns(UserWarning, match="does not reproduce the full pass"):
            got = headscore.ablate_edges(lm, examples, edges, baseline="corrupt", rows_per_pass=3, progress=False)
        rm = residual_model(lm.model)
        batch = next(iter(prepare(lm, examples).batches(8, progress=False)))
        index = [(rm.graph.index(u, upstream=True), rm.graph.index(v, upstream=False)) for u, v in edges]
        with patch(lm.model) as gates:
            base = writer_outputs(lm.model, gates, rm, batch.corrupted())
            before, full = edge_patched_losses(lm.model, gates, rm, batch, index, base, prefix=False, max_rows=3)
            _, replayed = edge_patched_losses(lm.model, gates, rm, batch, index, base, max_rows=3)
    finally:
        for h in handles:
            h.remove()
        for layer, forward in zip(layers, forwards, strict=True):
            layer.forward = forward
    assert got.extra["mode"] == "batched"
    assert (replayed - full).abs().max() > 1e-3  # what the replay would have given: wrong
    want = full - before[None]  # [edges, the batch's rows]
    tasks = [got.tasks.index(examples[int(i)].task) for i in batch.example_index]
    for k, (u, v) in enumerate(index):
        for t in set(tasks):
            mean = want[k, [i for i, x in enumerate(tasks) if x == t]].mean()
            assert float(got.edge_maps.values[t, u, v]) == pytest.approx(float(mean), rel=1e-9, abs=1e-12)


def test_circuits_keep_only_edges_from_the_input_to_the_logits():
    g = EdgeGraph(2, 2, 1)
    up, down = (lambda n: g.index(n, upstream=True)), (lambda n: g.index(n, upstream=False))
    edges = torch.zeros_like(g.allowed)
    on_path = [("emb", "L0.H1.q"), ("L0.H1", "L1.KV0.v"), ("L1.H0", "logits"), ("emb", "L1.mlp"),
               ("L1.mlp", "logits")]
    dead_ends = [("L0.H0", "logits"),  # nothing feeds L0.H0
                 ("emb", "L0.mlp"),  # L0.mlp reaches nothing
                 ("L0.H1", "L1.H1.q")]  # L1.H1's query is fed, but L1.H1 writes nowhere
    for u, v in on_path + dead_ends:
        edges[up(u), down(v)] = True
    kept = connected(g, edges)
    for u, v in on_path:
        assert kept[up(u), down(v)], (u, v)
    for u, v in dead_ends:
        assert not kept[up(u), down(v)], (u, v)
    assert int(kept.sum()) == len(on_path)
    scores = torch.where(g.allowed, torch.arange(g.allowed.numel(), dtype=torch.float64).view(g.allowed.shape),
                         torch.tensor(float("nan"), dtype=torch.float64))
    circuit = top_circuit(g, scores, 5)
    assert int(circuit.sum()) <= 5 and bool((circuit <= g.allowed).all())
    assert torch.equal(connected(g, circuit), circuit)
    assert circuit_sizes(700) == [10, 20, 50, 100, 200, 500, 700] and circuit_sizes(10) == [10]


# ---------------------------------------------------------------------------------------------- bad input

EDGE_CASES = {
    "edges-refused-family": "edges: Olmo2ForCausalLM normalises the attention and MLP outputs but reads the stream "
                            "without a norm of its own",
    "edges-not-decomposable": "edges: GraniteForCausalLM's residual stream is not the sum of its embeddings, heads "
                              "and MLPs",
    "edges-with-method": "--edges scores edges with taylor (attribution patching), atp-mean or ig (EAP-IG-inputs), "
                         "not --method abs",
    "export-edges-without-edges": "--export-edges writes edge scores: add --edges",
    "circuit-too-many-edges": "--edges 99999: s.hs has 190 edges",
    "patch-too-many-edges": "--top 99999: s.hs has 190 edges",
    "circuit-without-edge-scores": "plain.hs has no edge scores (score it with --edges)",
}
"""The bad input of edges and circuits: each refused in one line, exit 2 (rows in docs/bad-input.md)."""


def save_family(path: Path, config) -> Path:
    """A random-weight model of ``config``'s family with the character tokenizer, saved to ``path``."""
    from tiny_saved import char_tokenizer

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def refused(capsys, case: str, argv: list, *roots: Path) -> None:
    """The command exits 2 with one line holding EDGE_CASES[case], and changes no file under ``roots``."""
    from test_bad_input import snapshot

    before = snapshot(*roots)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("headscore: error: ") and err.count("\n") == 1, err
    assert EDGE_CASES[case] in err, err
    assert snapshot(*roots) == before


def test_edge_settings_that_are_refused(tmp_path, capsys, monkeypatch):
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=0)
    olmo = save_family(tmp_path / "olmo2", transformers.Olmo2Config(
        **{k: v for k, v in common.items() if k != "head_dim"}))
    granite = save_family(tmp_path / "granite", transformers.GraniteConfig(**common, residual_multiplier=0.5))
    llama = save_tiny_model(tmp_path / "llama")
    capsys.readouterr()  # the savers' progress bars
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": e.prompt, "target": e.target, "task": e.task}) + "\n"
                             for e in random_examples(4, seed=5)))
    out = ["--tasks", tasks, "--no-progress", "--out", tmp_path / "x.hs"]
    for case, model in (("edges-refused-family", olmo), ("edges-not-decomposable", granite)):
        refused(capsys, case, ["score", "--model", model, "--edges", *out], tmp_path)
    refused(capsys, "edges-with-method", ["score", "--edges", "--method", "abs", *out], tmp_path)
    refused(capsys, "export-edges-without-edges", ["score", "--export-edges", tmp_path / "e.csv", *out], tmp_path)
    assert main(["score", "--model", str(llama), "--tasks", str(tasks), "--edges", "--no-progress",
                 "--out", str(tmp_path / "s.hs")]) == 0
    assert main(["score", "--model", str(llama), "--tasks", str(tasks), "--no-progress",
                 "--out", str(tmp_path / "plain.hs")]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # the messages name the files as given
    with_model = ["--model", llama, "--tasks", tasks, "--no-progress"]
    refused(capsys, "circuit-too-many-edges", ["circuit", "s.hs", "--edges", "99999", *with_model, "--out",
                                               tmp_path / "c"], tmp_path)
    refused(capsys, "patch-too-many-edges", ["ablate", "--edges", "--scores", "s.hs", "--top", "99999",
                                             *with_model, "--out", tmp_path / "x.hs"], tmp_path)
    refused(capsys, "circuit-without-edge-scores", ["circuit", "plain.hs", *with_model, "--out", tmp_path / "c"],
            tmp_path)


@pytest.mark.numerics
def test_eap_ig_inputs_equals_the_reference_along_the_input_path():
    """--edges --method ig: the gradient at inputs between the corrupted and the clean embeddings (midpoints of
    the whole segment, or of its share --path-fraction next to the clean end), averaged, against the
    clean-to-corrupted changes; heads get the sum of their edges."""
    from headscore.edges.scoring import _head_sums, _input_path

    lm = build("llama", 2, 4, 2, 40)
    examples = examples_with_corruption(3, 40)
    rm = residual_model(lm.model)
    graph = rm.graph
    batch = next(iter(prepare(lm, examples).batches(3, progress=False)))
    steps = 3
    with patch(lm.model) as gates:
        base = writer_outputs(lm.model, gates, rm, batch.corrupted())
        got = _input_path(lm.model, gates, rm, batch, base, NLL, steps)
        partial = _input_path(lm.model, gates, rm, batch, base, NLL, 2, 0.2)  # the share 0.2 next to the clean end
        atp = edge_attributions(lm.model, gates, rm, batch, base)[1]
    up, _ = node_keys(graph)

    def along(row: int, alphas) -> torch.Tensor:
        """The reference's mean edge scores at inputs corrupted + alpha (clean - corrupted)."""
        ids, target, _, clean_writes = reference_row(lm.model, batch, row)
        corrupt_writes = reference(lm.model, batch.corrupt_ids[row, :ids.shape[0]], target)[1]
        changes = {k: (corrupt_writes[k] - clean_writes[k]).detach() for k in up}
        return sum(reference_scores(lm.model, ids, target, changes, graph, corrupt_writes["emb"] + alpha
                                    * (clean_writes["emb"] - corrupt_writes["emb"])) for alpha in alphas) / len(alphas)

    for row in range(3):
        whole, near_clean = along(row, [(k + 0.5) / steps for k in range(steps)]), along(row, (0.95, 0.85))
        for values, want in ((got, whole), (partial, near_clean)):
            scale = float(want.abs().max())
            worst = float((values[row] - want).abs().max())
            assert torch.allclose(values[row], want, rtol=1e-9, atol=1e-9 * scale), worst
        scale = float(whole.abs().max())
        assert not torch.allclose(atp[row], whole, rtol=1e-3, atol=1e-3 * scale)  # the path changes the scores
        assert not torch.allclose(near_clean, whole, rtol=1e-3, atol=1e-3 * scale)  # and so does its length
    sums = _head_sums(rm, got)
    assert float(sums[1, 1, 2]) == pytest.approx(float(got[1, graph.head_index(1, 2)].sum()), rel=1e-12)
    scores = headscore.score(lm, examples, method="ig", steps=steps, baseline="corrupt", edges=True, progress=False)
    assert scores.method == "ig-inputs-corrupt" and scores.extra["steps"] == steps
    assert scores.extra["path_fraction"] == 1.0  # the input path's default: the whole segment
    short = headscore.score(lm, examples, method="ig", steps=2, path_fraction=0.2, baseline="corrupt", edges=True,
                            batch_size=3, progress=False)
    assert short.extra["path_fraction"] == 0.2
    order = torch.argsort(batch.example_index)
    kept = short.edge_maps.example_values.double().nan_to_num(0.0)  # float32, in the examples' order
    scale = float(partial.abs().max())
    assert torch.allclose(kept, partial[order], rtol=1e-6, atol=1e-6 * scale)
    one = headscore.score(lm, examples, method="ig", steps=1, baseline="corrupt", edges=True, batch_size=3,
                          progress=False)
    with patch(lm.model) as gates:  # one step: the path's midpoint, not the clean run
        midpoint = _input_path(lm.model, gates, rm, batch, base, NLL, 1)
    kept = one.edge_maps.example_values.double().nan_to_num(0.0)
    midpoint, atp = midpoint[order], atp[order]
    scale = float(midpoint.abs().max())
    assert torch.allclose(kept, midpoint, rtol=1e-6, atol=1e-6 * scale)
    assert not torch.allclose(kept, atp, rtol=1e-3, atol=1e-3 * scale)
    with pytest.raises(HeadscoreError, match="use baseline corrupt"):
        headscore.score(lm, examples, method="ig", edges=True, progress=False)


def test_gemma2_is_read_as_a_sandwich_and_its_stream_decomposes():
    """Gemma 2 runs the Gemma 3 code path (sandwich norms); its eager attention takes the softmax in float32, so
    its edge scores are checked against the reference only through Gemma 3 (SDPA, float64 throughout)."""
    lm = gemma("gemma2", 14)
    rm = residual_model(lm.model)
    assert all(layer.attn_out_norm is not None and layer.mlp_out is not None for layer in rm.layers)
    batch = next(iter(prepare(lm, random_examples(3, seed=14)).batches(3, progress=False)))
    with patch(lm.model) as gates:
        check_decomposition(lm.model, gates, rm, batch)
        _, scores, grad = edge_attributions(lm.model, gates, rm, batch)
    node = scores[:, rm.graph.head_index(1, 0):rm.graph.head_index(1, 0) + 4].sum(-1)
    # float32 softmax: ~1e-7 of the largest value
    assert torch.allclose(node, -grad[:, 1], rtol=1e-6, atol=1e-6 * float(grad.abs().max()))


@pytest.mark.parametrize("edge", [(-1, -1), (0, -1), (10**6, 0), (0, 10**6)])
def test_an_edge_outside_the_graph_is_refused(edge):
    """An index past either end (negative ones included, which a tensor would read from the end) names no edge:
    ValueError, not a silent 0."""
    lm = build("llama", 2, 4, 2, 40)
    rm = residual_model(lm.model)
    batch = next(iter(prepare(lm, random_examples(2, seed=1)).batches(2, progress=False)))
    with patch(lm.model) as gates, pytest.raises(ValueError, match="outside the graph"):
        edge_patched_losses(lm.model, gates, rm, batch, [edge], writer_outputs(lm.model, gates, rm, batch))


def test_edge_lists_and_circuit_sizes_are_checked(tmp_path):
    """ablate_edges takes (upstream, downstream) pairs, each edge once (a repeat was measured and counted twice;
    'emb->logits' was a ValueError from unpacking); circuit refuses sizes the command line refuses (an empty list
    was an IndexError, a negative size a topk RuntimeError, 0 a circuit of nothing); the command line takes
    --target-faithfulness 1 as the API does."""
    from headscore.cli import build_parser

    lm = tiny_model("llama", layers=2, heads=2, kv_heads=1, dtype=torch.float64)
    examples = random_examples(3)
    with pytest.raises(HeadscoreError, match=r"each edge is an \(upstream, downstream\) pair of node names.*"
                                             r"not 'emb->logits'"):
        headscore.ablate_edges(lm, examples, ["emb->logits"], progress=False)
    once = headscore.ablate_edges(lm, examples, [("emb", "logits"), ("L0.H1", "L1.mlp")], progress=False)
    twice = headscore.ablate_edges(lm, examples, [("emb", "logits"), ("L0.H1", "L1.mlp"), ("emb", "logits")],
                                   progress=False)
    assert twice.extra["edges_measured"] == once.extra["edges_measured"] == 2
    assert torch.equal(twice.edge_maps.values.nan_to_num(7.0), once.edge_maps.values.nan_to_num(7.0))
    scores = headscore.score(lm, examples, edges=True, progress=False)
    for sizes in ([], [0], [-3], [2.5], "10"):
        with pytest.raises(HeadscoreError, match="sizes must be whole numbers of at least 1"):
            headscore.circuit(lm, examples, scores, sizes=sizes, progress=False)
    args = build_parser()[0].parse_args(["circuit", "s.hs", "--out", "o", "--target-faithfulness", "1"])
    assert args.target_faithfulness == 1.0
