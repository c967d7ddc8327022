"""Counterfactual scoring against an independent float64 hook reference.

AtP (``baseline="corrupt"``), per-position gate gradients and real activation patching (whole head and
one (head, position) at a time) for the metrics nll, logit-diff, prob and a callable. The reference
works on one example at a time (no padding, unlike headscore's batches): forward pre-hooks on each
layer's ``o_proj`` record the corrupted run's head outputs, then replace the clean run's input of
``o_proj`` plus a zero leaf tensor (for the gradient) or by a mix of clean and corrupted slices (for
patching); the metric is computed here from the full float64 logits. Everything runs in float64
(eager attention's float32 softmax made float64 too), so 1e-6 of the largest value is far above
rounding and far below any real bug.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_gate_gradient import softmax_in_input_dtype
from tiny import FAMILIES, tiny_model

import headscore
from headscore.data.examples import Example
from headscore.errors import HeadscoreError
from headscore.loss import Metric

# the examples have prompts of several lengths on purpose; the note on their alignment is checked once below
pytestmark = [pytest.mark.numerics, pytest.mark.filterwarnings("ignore:per-position. prompts of")]

LAYERS, HEADS = 3, 4
REL = 1e-6
METRICS = ("nll", "logit-diff", "prob")
LETTERS = "abcdefghijklmnopqrstuvwxyz "


def counterfactual_examples(n: int, seed: int = 0, tasks: tuple[str, ...] = ("one", "two")) -> list[Example]:
    """Random examples with a corrupted prompt of the same length, a foil, varied lengths, 1-3 target tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(5, 12)
        prompt = "".join(rng.choice(LETTERS) for _ in range(k))
        corrupt = "".join(rng.choice(LETTERS) for _ in range(k))
        target = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 3)))
        foil = rng.choice([c for c in "ijklmnop" if c != target[0]])
        out.append(Example(prompt, target, tasks[i % len(tasks)], corrupt=corrupt, foil=foil))
    return out


def _o_projs(model):
    return [layer.self_attn.o_proj for layer in model.model.layers]


def _metric_loss(logits: torch.Tensor, ids: list[int], prompt_len: int, target: list[int], foil: int | None,
                 metric: str) -> torch.Tensor:
    """The metric's loss for one unpadded row of full logits [T, V] (float64), computed from scratch."""
    logits = logits.double()
    answer = logits[prompt_len - 1]
    if metric == "nll":
        logp = torch.log_softmax(logits, -1)
        return -torch.stack([logp[prompt_len - 1 + i, tok] for i, tok in enumerate(target)]).mean()
    if metric == "prob":
        return -torch.softmax(answer, -1)[target[0]]
    return -(answer[target[0]] - answer[foil])


class Reference:
    """The float64 reference for one example of a model."""

    def __init__(self, lm, example: Example):
        tok = lm.tokenizer
        self.model = lm.model
        prompt = tok(example.prompt)["input_ids"]
        self.target = tok(example.target, add_special_tokens=False)["input_ids"]
        self.foil = tok(example.foil, add_special_tokens=False)["input_ids"][0] if example.foil else None
        self.prompt_len = len(prompt)
        self.ids = torch.tensor([prompt + self.target])
        self.corrupt_ids = torch.tensor([tok(example.corrupt)["input_ids"] + self.target])
        self.corrupt_z = self._record(self.corrupt_ids)
        self.clean_z = self._record(self.ids)

    def _run(self, ids: torch.Tensor, replace=None) -> torch.Tensor:
        handles = []
        for layer, proj in enumerate(_o_projs(self.model)):
            if replace is not None:
                handles.append(proj.register_forward_pre_hook(
                    lambda m, args, layer=layer: (replace(layer, args[0]),)))
        try:
            with softmax_in_input_dtype():
                return self.model(input_ids=ids).logits[0]
        finally:
            for h in handles:
                h.remove()

    def _record(self, ids: torch.Tensor) -> list[torch.Tensor]:
        seen = []

        def keep(layer, x):
            seen.append(x.detach().clone().view(*x.shape[:-1], HEADS, -1)[0])  # [T, H, D]
            return x
        with torch.no_grad():
            self._run(ids, keep)
        return seen

    def loss(self, logits: torch.Tensor, metric: str) -> torch.Tensor:
        return _metric_loss(logits, self.ids[0].tolist(), self.prompt_len, self.target, self.foil, metric)

    def atp_terms(self, metric: str) -> torch.Tensor:
        """-<O_t - O_corrupt_t, dL/dO_t> per (layer, position, head): [L, T, H] (taylor against the corrupt run)."""
        # a zero added to each o_proj input: its gradient is dL/dO (the graph through later layers stays)
        leaves = [torch.zeros_like(z).requires_grad_(True) for z in self.clean_z]
        logits = self._run(self.ids, lambda layer, x: x + leaves[layer].reshape(1, *x.shape[1:]).to(x.dtype))
        grads = torch.autograd.grad(self.loss(logits, metric), leaves)
        pairs = zip(self.clean_z, self.corrupt_z, grads, strict=True)
        return torch.stack([-((c - k) * g).sum(-1) for c, k, g in pairs])

    @torch.no_grad()
    def patched(self, metric: str, layer: int, head: int, position: int | None = None) -> float:
        """loss(head's output from the corrupted run, at all positions or one) - loss(clean)."""
        def swap(idx, x):
            if idx != layer:
                return x
            z = x.clone().view(*x.shape[:-1], HEADS, -1)
            where = slice(None) if position is None else slice(position, position + 1)
            z[0, where, head] = self.corrupt_z[layer][where, head]
            return z.view_as(x)
        return float(self.loss(self._run(self.ids, swap), metric) - self.loss(self._run(self.ids), metric))


def named_columns(ref: Reference, before: int) -> list[tuple[int, int]]:
    """(position t, column) pairs of one example: prompt tokens and every target token but the last."""
    return [(t, t - (ref.prompt_len - 1) + before) for t in range(ref.ids.shape[1] - 1)]


def by_task(values: list[torch.Tensor], examples: list[Example], tasks: list[str]) -> torch.Tensor:
    pairs = list(zip(values, examples, strict=True))
    return torch.stack([torch.stack([v for v, e in pairs if e.task == t]).mean(0) for t in tasks])


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().item()
    assert scale > 1e-4, f"{what}: the reference is trivially small"
    err = (got - want).abs().max().item()
    assert err <= REL * scale, f"{what}: max error {err:.3e} vs {REL:.0e} x {scale:.3e}"


CASES = [(fam, attn) for fam, (_, _, impls) in FAMILIES.items() if fam in ("llama", "gemma2") for attn in impls]


@pytest.mark.parametrize("family,attn", CASES)
@pytest.mark.parametrize("metric", METRICS)
def test_atp_and_per_position_match_reference(family, attn, metric):
    lm = tiny_model(family, layers=LAYERS, heads=HEADS, kv_heads=2, attn=attn, dtype=torch.float64, seed=3)
    examples = counterfactual_examples(7, seed=1)
    with softmax_in_input_dtype():
        got = headscore.score(lm, examples, baseline="corrupt", metric=metric, per_position=True, batch_size=3,
                              progress=False)
    refs = [Reference(lm, e) for e in examples]
    before = max(r.prompt_len for r in refs) - 1
    assert got.positions[before] == "end" and got.method == "atp-corrupt" and got.extra["metric"] == metric
    per_example = []
    for r in refs:
        terms = r.atp_terms(metric)  # [L, T, H]
        named = torch.zeros(LAYERS, HEADS, len(got.positions), dtype=torch.float64)
        for t, col in named_columns(r, before):
            named[:, :, col] = terms[:, t]
        per_example.append(named)
    want = by_task(per_example, examples, got.tasks)
    close(got.position_values, want, f"{family}-{attn} {metric} per position")
    close(got.values, want.sum(-1), f"{family}-{attn} {metric} AtP")
    close(got.example_values.double(), torch.stack(per_example).sum(-1), f"{family}-{attn} {metric} examples")


@pytest.mark.parametrize("metric,mode", [pytest.param(m, "prefix", marks=pytest.mark.slow) if m == "logit-diff"
                                         else (m, "prefix") for m in METRICS]
                         + [("logit-diff", "batched"), ("logit-diff", "naive")])
def test_activation_patching_matches_reference(metric, mode):
    lm = tiny_model("llama", layers=LAYERS, heads=HEADS, kv_heads=2, dtype=torch.float64, seed=4)
    examples = counterfactual_examples(5, seed=2)
    got = headscore.ablate(lm, examples, baseline="corrupt", metric=metric, mode=mode, batch_size=3, rows_per_pass=8,
                           progress=False)
    assert got.method == "ablation-corrupt" and got.extra["mode"] == mode
    want = torch.stack([torch.tensor([[r.patched(metric, layer, head) for head in range(HEADS)]
                                      for layer in range(LAYERS)]) for r in (Reference(lm, e) for e in examples)])
    close(got.example_values.double(), want, f"{metric} {mode} patching")


@pytest.mark.parametrize("metric", ["logit-diff", pytest.param("nll", marks=pytest.mark.slow)])
def test_per_position_patching_matches_reference(metric):
    lm = tiny_model("llama", layers=2, heads=HEADS, kv_heads=2, dtype=torch.float64, seed=5)
    examples = counterfactual_examples(3, seed=3)
    got = headscore.ablate(lm, examples, baseline="corrupt", metric=metric, per_position=True, batch_size=2,
                           progress=False)
    refs = [Reference(lm, e) for e in examples]
    before = max(r.prompt_len for r in refs) - 1
    per_example = []
    for r in refs:
        named = torch.zeros(2, HEADS, len(got.positions), dtype=torch.float64)
        for t, col in named_columns(r, before):
            for layer in range(2):
                for head in range(HEADS):
                    named[layer, head, col] = r.patched(metric, layer, head, t)
        per_example.append(named)
    close(got.position_values, by_task(per_example, examples, got.tasks), f"{metric} per-position patching")
    counts = torch.zeros(len(got.tasks), len(got.positions), dtype=torch.int64)
    for r, e in zip(refs, examples, strict=True):
        for _, col in named_columns(r, before):
            counts[got.tasks.index(e.task), col] += 1
    assert torch.equal(got.position_counts, counts)


def test_callable_metric_equals_builtin_and_orientation():
    """A callable computing the logit difference (higher is better) gives the built-in logit-diff's scores."""
    lm = tiny_model("llama", layers=LAYERS, heads=HEADS, dtype=torch.float64, seed=6)
    examples = counterfactual_examples(4, seed=4)

    def logit_diff(logits, batch):
        answer = batch.prompt_lengths - 1
        rows = torch.arange(batch.size)
        first = batch.input_ids[rows, batch.prompt_lengths]
        return logits[rows, answer, first] - logits[rows, answer, batch.foil_ids]

    builtin = headscore.score(lm, examples, baseline="corrupt", metric="logit-diff", progress=False)
    custom = headscore.score(lm, examples, baseline="corrupt", metric=Metric("ld", logit_diff, higher_is_better=True),
                             progress=False)
    assert custom.extra["metric"] == "ld" and custom.extra["metric_meaning"] == "drop in ld"
    close(custom.values, builtin.values, "callable metric")
    as_loss = headscore.score(lm, examples, baseline="corrupt", metric=lambda lg, b: -logit_diff(lg, b),
                              progress=False)
    close(as_loss.values, builtin.values, "callable metric as a loss")


def test_positions_of_a_metric_that_reads_every_token_sum_to_scores():
    """A user's metric may read the last token's logits: its per-position map keeps that token, so the map
    still sums to the head's score (gradient and exact patching alike); the built-in metrics' maps leave it out."""
    lm = tiny_model("llama", layers=LAYERS, heads=HEADS, dtype=torch.float64, seed=7)
    examples = counterfactual_examples(6, seed=5)

    def every_token(logits, batch):  # the mean log-partition over every real token, the last included
        mask = batch.attention_mask.to(logits.dtype)
        return (logits.logsumexp(-1) * mask).sum(1) / mask.sum(1)

    with pytest.warns(UserWarning, match="aligned at their last token"):
        grad = headscore.score(lm, examples, metric=every_token, per_position=True, batch_size=3, progress=False)
        exact = headscore.ablate(lm, examples, metric=every_token, per_position=True, baseline="corrupt",
                                 batch_size=3, progress=False)
        builtin = headscore.score(lm, examples, metric="nll", per_position=True, batch_size=3, progress=False)
    close(grad.position_values.sum(-1), grad.values, "every-token metric, gradient")
    assert grad.positions == [*builtin.positions, f"end+{len(builtin.positions) - builtin.positions.index('end')}"]
    assert float(grad.position_values[..., -1].abs().max()) > 1e-6  # the last token's term is not 0 here
    assert exact.positions == grad.positions and float(exact.position_values[..., -1].abs().max()) > 1e-6
    per_head = headscore.ablate(lm, examples, metric=every_token, baseline="corrupt", batch_size=3, progress=False)
    close(exact.values, per_head.values, "every-token metric, exact per-position run's head values")


def test_positions_sum_to_scores_and_survive_a_file(tmp_path):
    lm = tiny_model("llama", layers=LAYERS, heads=HEADS, dtype=torch.float64, seed=7)
    with pytest.warns(UserWarning, match="aligned at their last token"):
        scores = headscore.score(lm, counterfactual_examples(6, seed=5), metric="nll", per_position=True,
                                 progress=False)
    assert scores.method == "taylor"
    close(scores.position_values.sum(-1), scores.values, "zero-baseline positions sum")
    back = headscore.HeadScores.load(scores.save(tmp_path / "s.hs"))
    assert back.positions == scores.positions
    for key in ("position_values", "position_stderr", "position_counts"):
        assert torch.equal(getattr(back, key), getattr(scores, key)), key
    doc = json.loads(back.to_json(tmp_path / "s.json").read_text())
    assert doc["positions"] == scores.positions and torch.tensor(doc["position_values"]).shape == \
        scores.position_values.shape
    one = back.select([back.tasks[1]])
    assert torch.equal(one.position_values[0], scores.position_values[1])
    assert torch.equal(one.position_map(back.tasks[1]), scores.position_values[1])


@pytest.mark.parametrize("change,message", [
    (lambda e: Example(e.prompt, e.target, e.task, corrupt=e.corrupt + "x", foil=e.foil), "must have the same length"),
    (lambda e: Example(e.prompt, e.target, e.task, corrupt=e.corrupt), "needs a 'foil' field"),
    (lambda e: Example(e.prompt, e.target, e.task, foil=e.foil), "needs a 'corrupt' field"),
    (lambda e: Example(e.prompt, "ab", e.task, corrupt=e.corrupt, foil="ax"), "starts with the same token"),
])
def test_bad_counterfactual_input(change, message):
    lm = tiny_model("llama", layers=2, heads=HEADS)
    examples = counterfactual_examples(3, seed=6)
    examples[1] = change(examples[1])
    with pytest.raises(HeadscoreError, match=message):
        headscore.score(lm, examples, baseline="corrupt", metric="logit-diff", progress=False)


def test_foil_equal_to_target_and_bad_metric_output():
    with pytest.raises(HeadscoreError, match="equals the target"):
        headscore.score(tiny_model("llama", layers=2), [Example("abc", "d", "t", foil="d")], progress=False)
    with pytest.raises(HeadscoreError, match="must return a float tensor"):
        headscore.score(tiny_model("llama", layers=2), counterfactual_examples(2), metric=lambda lg, b: lg.sum(),
                        progress=False)
    with pytest.raises(HeadscoreError, match="unknown metric"):
        headscore.score(tiny_model("llama", layers=2), counterfactual_examples(2), metric="accuracy", progress=False)
