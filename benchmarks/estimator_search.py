"""The search behind issue 24's choice of estimators: candidates scored against one exact ablation map.

Every candidate estimates each head's zero-ablation effect on the same examples as an exact map made by
``headscore ablate`` (e.g. ``benchmarks/fidelity.py``'s ``builtin.exact.hs``, which has 2 examples per
task of the built-in suite); the script prints per-task Spearman and top-20 recall, mean and min:

- ``taylor``: the gradient at every gate = 1;
- ``joint path``: mean gradient at midpoints of the path where every gate moves together (1 -> 1 - a);
- ``hutchinson``: taylor + 1/2 of a Hutchinson estimate of the Hessian's diagonal (finite difference of
  the gradient along random +-1 probes, step eps);
- ``partition midpoint``: the heads split at random into K groups; each group's gradient is taken with
  that group's gates at 0.5 and the rest at 1 (K passes: a head's own path midpoint, K-1 others moved);
- ``relp``: the gradient with LRP-style rules in the backward pass (norm scale, activation gain and
  attention pattern held constant), singly and together;
- ``direct-path exact``: taylor with each head's direct path to the logits (through the final norm and
  unembedding) replaced by its exact effect;
- ``taylor + GGN/2``: taylor plus half the Gauss-Newton (Fisher) diagonal of the loss, from the squared
  gradients of S losses with labels sampled from the model (no cross-talk between heads, unlike Hutchinson:
  it measures the loss's curvature only, not the network's);
- and, for the verified mode, how deep in each ranking (|taylor|, first-order mass sum_t |term_t|) a task's
  true top 20 lie, and the top-20 recall after verifying the top K by |taylor| plus F by mass, or plus F by
  other flags (the GGN diagonal, mass or |taylor| pooled over tasks, and the other tasks' exact values: what
  a flag learnt from the run's other tasks could at best give), or in two rounds (the first round's exact
  values correct the estimate that picks the rest: per layer, or in proportion to the mass).

    python benchmarks/estimator_search.py --exact benchmarks/results/fidelity/builtin.exact.hs --per-task 2
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch

from headscore import compat
from headscore.compare import spearman
from headscore.data.tasks import load_tasks
from headscore.loss import NLL, _target_span, example_losses, losses_from_logits, target_nll
from headscore.methods.verify import choose_heads
from headscore.patch import patch
from headscore.prepared import prepare
from headscore.results import HeadScores

_DETACH_QK = {"on": False}


def _attention_function(original):
    """compat.attention_function, wrapped so that a flag holds the attention pattern constant (q, k detached)."""
    def get(name):
        inner = original(name)

        def call(module, q, k, v, mask, *args, **kwargs):
            if _DETACH_QK["on"]:
                q, k = q.detach(), k.detach()
            return inner(module, q, k, v, mask, *args, **kwargs)
        return call
    return get


compat.attention_function = _attention_function(compat.attention_function)


def _gain_constant(module, args, out):
    """Forward hook: the same output, with the gradient of out = x * (out / x) taken with out / x constant."""
    x = args[0]
    safe = torch.where(x != 0, x, torch.ones_like(x))
    ratio = torch.where(x != 0, out / safe, torch.zeros_like(x)).detach()
    return x * ratio + (out - x * ratio).detach()


@contextlib.contextmanager
def relp_rules(model, norm: bool, act: bool, qk: bool):
    """LRP-style backward rules on a transformers model (the forward pass is unchanged)."""
    mods = []
    if norm:
        mods += [m for m in model.modules() if "Norm" in type(m).__name__]
    if act:
        mods += [m for m in model.modules() if "Activation" in type(m).__name__ or isinstance(m, torch.nn.SiLU)]
    handles = [m.register_forward_hook(_gain_constant) for m in mods]
    _DETACH_QK["on"] = qk
    try:
        yield
    finally:
        _DETACH_QK["on"] = False
        for h in handles:
            h.remove()


def grad_at(model, heads, batch, gates, per_position=False):
    """dL/dg at gate values ``gates`` [B, L, H] (or per position [B, L, T, H])."""
    gates = gates.clone().requires_grad_(True)
    with heads.using(gates, None):
        loss = example_losses(model, batch, NLL)
    return torch.autograd.grad(loss.sum(), gates)[0]


def ggn_diagonals(model, heads, batch, samples: int) -> list[torch.Tensor]:
    """Running means of n * g_y^2 [B, L, H] after 1 .. ``samples`` draws, g_y the gradient of the mean NLL of
    labels y sampled from the model at the target positions, n the row's target count: E_y[n g_y^2] is the
    diagonal of the loss's Gauss-Newton matrix (cross terms between positions vanish in expectation)."""
    gates = heads.ones(batch.size, requires_grad=True)
    with heads.using(gates, None):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    start, end = _target_span(batch)
    logits = logits[:, start:end].float()
    mask = batch.target_mask[:, start + 1:end + 1]
    probs = torch.softmax(logits.detach(), -1)
    n = mask.sum(1).double()[:, None, None]
    total, out = 0, []
    for k in range(samples):
        labels = torch.multinomial(probs.flatten(0, 1), 1).view(probs.shape[:2])
        (g,) = torch.autograd.grad(target_nll(logits, labels, mask).sum(), gates, retain_graph=k < samples - 1)
        total = total + n * g.double() ** 2
        out.append(total / (k + 1))
    return out


def direct_path_fix(model, heads, batch, taylor):
    """taylor with each head's first-order direct-path term replaced by its exact direct-path effect."""
    inner = model.model
    outs, store = {}, {}
    layout = heads.layout
    d = layout.head_dim

    def observe(layer, out):
        outs[layer] = out.detach()

    def keep(module, args):
        args[0].retain_grad()
        store["resid"] = args[0]

    handle = inner.norm.register_forward_pre_hook(keep)
    gates = heads.ones(batch.size, requires_grad=True)
    try:
        with heads.observing(observe), heads.using(gates, None):
            loss = example_losses(model, batch, NLL)
    finally:
        handle.remove()
    (grad_resid,) = torch.autograd.grad(loss.sum(), [store["resid"]])
    start, end = _target_span(batch)
    resid, g = store["resid"][:, start:end].detach(), grad_resid[:, start:end]
    first = torch.zeros_like(taylor)
    exact = torch.zeros_like(taylor)
    with torch.no_grad():
        clean = losses_from_logits(model.lm_head(inner.norm(resid)), batch, span_only=True)
        for layer in range(layout.num_layers):
            w = inner.layers[layer].self_attn.o_proj.weight
            for h in range(layout.num_heads):
                c = outs[layer][:, start:end, h] @ w[:, h * d:(h + 1) * d].T
                first[:, layer, h] = -(g * c).sum((1, 2))
                logits = model.lm_head(inner.norm(resid - c))
                exact[:, layer, h] = losses_from_logits(logits, batch, span_only=True) - clean
    return taylor - first + exact


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="builtin")
    p.add_argument("--per-task", type=int, default=2)
    p.add_argument("--exact", required=True, help="an ablate (zero) scores file of the same examples")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    truth = HeadScores.load(args.exact)
    prep = prepare(args.model, load_tasks(args.tasks), max_examples=args.per_task)
    if prep.data_hash != truth.data_hash:
        raise SystemExit(f"{args.exact} was made on other examples (data hash {truth.data_hash}, "
                         f"these {prep.data_hash})")
    model = prep.lm.model
    est: dict[str, list] = {}

    def add(name, batch, values):
        est.setdefault(name, []).append((batch.task_index, values.detach().double()))

    with patch(model) as heads:
        for batch in prep.batches(8, progress=False):
            b, n_l, n_h = batch.size, heads.layout.num_layers, heads.layout.num_heads
            ones = torch.ones(b, n_l, n_h)
            g1 = grad_at(model, heads, batch, ones)
            add("taylor", batch, -g1)
            pos = grad_at(model, heads, batch, torch.ones(b, n_l, batch.input_ids.shape[1], n_h), per_position=True)
            add("_mass", batch, pos.abs().sum(2))
            for frac, steps in ((1.0, 4), (0.5, 2), (0.2, 2)):
                mean = sum(grad_at(model, heads, batch, ones * (1 - frac * (k + 0.5) / steps))
                           for k in range(steps)) / steps
                add(f"joint path 1 -> {1 - frac:g}, {steps} steps", batch, -mean)
            for eps, probes in ((0.1, 1), (0.1, 4), (0.5, 4)):
                diag = 0
                for _ in range(probes):
                    v = torch.randint(0, 2, (b, n_l, n_h)).float() * 2 - 1
                    diag = diag + v * (g1 - grad_at(model, heads, batch, ones - eps * v)) / eps
                add(f"hutchinson eps {eps:g}, {probes} probe(s)", batch, -g1 + 0.5 * diag / probes)
            for k in (4, 8):
                group = (torch.rand(b, n_l * n_h).argsort(1) % k).view(b, n_l, n_h)
                mid = sum((group == j).float() * grad_at(model, heads, batch, ones - 0.5 * (group == j).float())
                          for j in range(k))
                add(f"partition midpoint, K = {k}", batch, -mid)
            for name, rules in (("relp: norm", (1, 0, 0)), ("relp: activation", (0, 1, 0)),
                                ("relp: attention pattern", (0, 0, 1)), ("relp: all three", (1, 1, 1))):
                with relp_rules(model, *map(bool, rules)):
                    add(name, batch, -grad_at(model, heads, batch, ones))
            add("direct-path exact", batch, direct_path_fix(model, heads, batch, -g1))
            ggn = ggn_diagonals(model, heads, batch, 16)
            for k in (1, 4, 16):
                add(f"taylor + GGN/2, {k} sampled label(s)", batch, -g1 + 0.5 * ggn[k - 1])
            add("_ggn", batch, ggn[-1])

    def task_means(name):
        ti = torch.cat([t for t, _ in est[name]])
        v = torch.cat([x for _, x in est[name]])
        return torch.stack([v[ti == t].mean(0) for t in range(len(prep.tasks))])

    def recall20(values, t):
        top = set(torch.topk(truth.values[t].flatten(), 20).indices.tolist())
        return len(top & set(torch.topk(values.flatten(), 20).indices.tolist())) / 20

    print(f"{'estimator':40s} {'Spearman mean (min)':>20s} {'top-20 recall mean (min)':>26s}")
    for name in est:
        if name.startswith("_"):
            continue
        m = task_means(name)
        sp = [spearman(m[t].numpy(), truth.values[t].numpy()) for t in range(len(prep.tasks))]
        rc = [recall20(m[t], t) for t in range(len(prep.tasks))]
        print(f"{name:40s} {np.mean(sp):>12.3f} ({np.min(sp):.3f}) {np.mean(rc):>18.2f} ({np.min(rc):.2f})")
    taylor, mass = task_means("taylor"), task_means("_mass")
    for label, rank in (("|taylor|", taylor.abs()), ("first-order mass", mass)):
        depth = []
        for t in range(len(prep.tasks)):
            order = torch.argsort(rank[t].flatten(), descending=True).tolist()
            top = torch.topk(truth.values[t].flatten(), 20).indices.tolist()
            depth.append(sorted(order.index(i) + 1 for i in top)[18])
        print(f"heads in {label} order needed to hold 19 of a task's true top 20: {depth}")
    n = truth.values[0].numel()
    tasks = len(prep.tasks)
    others = torch.stack([(truth.values.sum(0) - truth.values[t]) / max(1, tasks - 1) for t in range(tasks)])
    flags = {"mass": mass, "the GGN diagonal": task_means("_ggn"),
             "mass pooled over tasks": mass.mean(0, keepdim=True).expand_as(mass),
             "|taylor| pooled over tasks": taylor.abs().mean(0, keepdim=True).expand_as(taylor),
             "the other tasks' exact values": others}
    k = int(np.ceil(0.05 * n))
    for label, flag_rank, f in (("mass", mass, 0), *((name, r, k) for name, r in flags.items()),
                                ("mass", mass, int(np.ceil(0.15 * n)))):
        rc = []
        for t in range(tasks):
            top, flag = choose_heads(taylor[t], flag_rank[t], k, f)
            chosen = top | flag
            rc.append(recall20(torch.where(chosen, truth.values[t], taylor[t]), t))
        print(f"verify top {k} by |taylor| + {f} by {label}: top-20 recall mean {np.mean(rc):.3f} "
              f"(min {np.min(rc):.2f})")
    layer_of = torch.arange(n) // truth.values.shape[2]
    for first, label in ((0, "none"), (k // 2, f"{k // 2} by mass")):
        for rule in ("|taylor| + each layer's mean |exact - taylor|", "|taylor| + a * mass, a fitted"):
            rc = []
            for t in range(tasks):
                e, x, m = taylor[t].flatten(), truth.values[t].flatten(), mass[t].flatten()
                top, flag = choose_heads(taylor[t], mass[t], k, first)
                chosen = (top | flag).flatten()
                if rule.startswith("|taylor| + each"):
                    gap = torch.stack([(x - e)[chosen & (layer_of == la)].abs().mean()
                                       for la in range(truth.values.shape[1])])
                    gap = torch.where(torch.isnan(gap), gap.nanmean(), gap)
                    rank = e.abs() + gap[layer_of]
                else:
                    rank = e.abs() + ((x - e)[chosen].abs() * m[chosen]).sum() / (m[chosen] ** 2).sum() * m
                rank = torch.where(chosen, -np.inf, rank)
                chosen[torch.argsort(rank, descending=True)[:2 * k - int(chosen.sum())]] = True
                rc.append(recall20(torch.where(chosen, x, e), t))
            print(f"verify in two rounds: top {k} by |taylor| + {label}, then the rest of {2 * k} by {rule} "
                  f"(from the first round's exact values): top-20 recall mean {np.mean(rc):.3f} (min {np.min(rc):.2f})")


if __name__ == "__main__":
    main()
