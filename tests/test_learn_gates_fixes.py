"""learn_gates on models with absent heads (a hybrid's layer without attention, per-layer head counts): no gate,
no penalty, never kept, NaN like the maps; the penalty is the expected fraction of the real heads open; the
caller's global random stream is left alone."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import model_matrix
import pytest
import torch
from tiny import random_examples, tiny_model
from tiny_saved import char_tokenizer

import headscore
from headscore.learn_gates import learn_gates

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
INIT = 2.0
BETA, LO, HI = 2 / 3, -0.1, 1.1
# family -> heads of each layer (qwen3_next: layer 0 is Gated DeltaNet, no attention; laguna: 4 and 2 heads)
ABSENT_FAMILIES = {"qwen3_next": (0, 4), "laguna": (4, 2)}


def fresh_model(family: str) -> headscore.LoadedModel:
    """A tiny float64 model of ``family`` never prepared before (so learn_gates must find its layout itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_matrix.build_model(family)
    return headscore.LoadedModel(model, char_tokenizer(), f"tiny-{family}")


def real_heads(heads_per_layer: tuple[int, ...], width: int) -> torch.Tensor:
    """bool [L, width]: True for the first ``heads_per_layer[l]`` heads of layer l."""
    return torch.arange(width)[None, :] < torch.tensor(heads_per_layer)[:, None]


def prob_open(log_alpha: float) -> float:
    """P(z != 0) of a hard-concrete gate, from its closed form."""
    return 1 / (1 + math.exp(-(log_alpha - BETA * math.log(-LO / HI))))


class RecordingOptimizer(torch.optim.SGD):
    """Stands in for Adam: records the gradient of every step and leaves the parameters as they are."""

    grads: list[torch.Tensor] = []

    def __init__(self, params, lr: float = 0.0):
        super().__init__(params, lr=0.0)

    def step(self, closure=None):
        RecordingOptimizer.grads.append(self.param_groups[0]["params"][0].grad.detach().clone())
        return super().step(closure)


@pytest.mark.parametrize("family", sorted(ABSENT_FAMILIES))
def test_absent_heads_get_no_gate(family):
    """Before: every [L, H] cell had a gate, absent heads were 'kept' and counted in E[L0] (7.79 expected open
    heads of qwen3_next's 4)."""
    lm = fresh_model(family)
    counts = ABSENT_FAMILIES[family]
    real = real_heads(counts, max(counts))
    result = learn_gates(lm, random_examples(6), steps=3, batch_size=3, init=INIT, progress=False)
    assert result.gates.shape == result.log_alpha.shape == result.mask.shape == real.shape
    assert result.gates[~real].isnan().all() and result.log_alpha[~real].isnan().all()
    assert torch.isfinite(result.gates[real]).all() and torch.isfinite(result.log_alpha[real]).all()
    assert not result.mask[~real].any()
    assert result.num_heads == sum(counts) and result.kept <= sum(counts)
    # E[L0] at the first step (before any update): the real heads' P(open) at the initial log_alpha
    assert result.history[0]["expected_l0"] == pytest.approx(sum(counts) * prob_open(INIT), rel=1e-6)
    # the learned mask is what the model is run with: its loss is the one the dropped real heads give
    dropped = [(int(li), int(h)) for li, h in (real & ~result.mask).nonzero()]
    if dropped:
        effects = headscore.ablate_heads(lm, random_examples(6), dropped, batch_size=3, progress=False)
        total = sum(e.count for e in effects.values())
        change = sum(e.delta * e.count for e in effects.values()) / total
        assert change == pytest.approx(result.loss_change, rel=1e-5, abs=1e-9)
    else:
        assert result.loss_masked == pytest.approx(result.loss_full, rel=1e-12)


@pytest.mark.parametrize("family", sorted(ABSENT_FAMILIES))
def test_penalty_is_the_fraction_of_real_heads(family, monkeypatch):
    """The sparsity term's gradient on log_alpha is sparsity * dP(open)/dlog_alpha / (number of real heads) on a
    real head and 0 on an absent one: two runs that differ only in ``sparsity`` draw the same gates, so the
    difference of their first gradients is the penalty's alone. Before: / (L * H) and absent heads penalised."""
    lm = fresh_model(family)
    counts = ABSENT_FAMILIES[family]
    real = real_heads(counts, max(counts))
    monkeypatch.setattr(torch.optim, "Adam", RecordingOptimizer)
    first = []
    for sparsity in (0.0, 3.0):
        RecordingOptimizer.grads = []
        learn_gates(lm, random_examples(6), steps=1, batch_size=3, init=INIT, sparsity=sparsity, progress=False)
        first.append(RecordingOptimizer.grads[0].double().cpu())
    penalty = (first[1] - first[0]) / 3.0
    p = prob_open(INIT)
    expected = torch.where(real, p * (1 - p) / sum(counts), 0.0).double()
    torch.testing.assert_close(penalty, expected, rtol=1e-5, atol=1e-9)


def test_example_script_counts_the_real_heads(tmp_path, monkeypatch, capsys):
    """examples/learn_gates.py prints 'kept heads: X / Y' with Y the model's heads (4 on the hybrid, not 8)."""
    import importlib.util

    lm = fresh_model("qwen3_next")
    monkeypatch.setattr(headscore, "load_model", lambda name: lm)
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": ex.prompt, "target": ex.target, "task": ex.task}) + "\n"
                             for ex in random_examples(6)))
    spec = importlib.util.spec_from_file_location("learn_gates_example", ROOT / "examples" / "learn_gates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--tasks", str(tasks), "--steps", "2", "--batch-size", "3", "--max-examples", "0"])
    printed = capsys.readouterr().out
    assert f"kept heads: {out['result'].kept} / 4\n" in printed


def test_learn_gates_leaves_the_global_random_stream_alone():
    """Before: torch.manual_seed(seed) inside learn_gates restarted the caller's stream at ``seed``."""
    lm, examples = tiny_model("llama"), random_examples(6)
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    learn_gates(lm, examples, steps=2, batch_size=3, progress=False)
    assert torch.equal(torch.rand(5), expected)


def test_learn_gates_does_not_depend_on_the_global_random_state():
    """Its own seeded generator is all it draws from: any global state gives the same gates."""
    lm, examples = tiny_model("llama"), random_examples(6)
    runs = []
    for global_seed in (0, 99):
        torch.manual_seed(global_seed)
        runs.append(learn_gates(lm, examples, steps=4, batch_size=3, lr=0.3, sparsity=5.0, seed=7, progress=False))
    assert torch.equal(runs[0].log_alpha, runs[1].log_alpha) and torch.equal(runs[0].mask, runs[1].mask)
    assert runs[0].history == runs[1].history
