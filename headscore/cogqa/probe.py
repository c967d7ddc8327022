"""The CogQA study's probe: which heads carry the information that tells the cognitive functions apart.

1. :func:`collect_activations`: one forward-only pass through ``patch(...).observing`` keeps each
   head's pre-gate output (the input of ``o_proj``) averaged over the **answer tokens**, as the
   study does: the positions where ``batch.target_mask`` is True (the target tokens themselves,
   so the head has read the answer; ``positions="predict"`` averages instead over the positions
   that predict the target tokens, t - 1). Memory: one float32 [N, L, H, D] tensor on the CPU
   (2,683 CogQA examples on SmolLM2-135M: 185 MB); nothing per token is kept.
2. :func:`train_probe`: activations are standardised per (layer, head, dim) with the training
   split's mean and std; a linear projection D -> d (one matrix shared by every head, or one per
   head with ``shared=False``) maps each head to d features; a small MLP over the concatenated
   L * H * d features predicts the function. Adam, full batch, seeded.
3. :func:`probe_importance`: importance of head (l, h) for class c = mean over class-c examples of
   sum_j z[l, h, j] * d logit_c / d z[l, h, j] (gradient x activation at the head's projected
   features z), signed: positive means the head's features push towards the right function.

The probe is for prompt/target examples (the answer tokens are what it averages over); a sequence
classifier's examples have none, and :func:`probe_scores` refuses them. Its map is reproducible for
identical activations (same batch size, device, dtype and seed); float32 rounding that differs with
the batch size can move it (``docs/cogqa.md`` says by how much).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..accumulate import TaskAccumulator
from ..data.batching import weighted_tokens_only
from ..data.cogqa import question_ids, split_indices_by_question
from ..errors import HeadscoreError
from ..loss import run_forward
from ..models import is_sequence_classifier, load_model
from ..patch import patch
from ..prepared import prepare
from ..text import printable

POSITIONS = ("target", "predict")


@torch.no_grad()
def collect_activations(prep, batch_size: int = 8, *, positions: str = "target",
                        progress: bool = True) -> torch.Tensor:
    """Each head's output averaged over the answer positions: float32 [N, L, H, D] in ``prep.examples`` order.

    ``prep`` is a :class:`headscore.api.Prepared`. ``positions="target"`` averages over the target
    tokens, ``"predict"`` over the positions whose next token is a target token. An example with no such
    position (a sequence classifier's, which has no target) is refused: its average would be 0 / 0.
    """
    if positions not in POSITIONS:
        raise HeadscoreError(f"unknown probe positions {positions!r}; choose {' or '.join(POSITIONS)}")
    model = prep.lm.model
    acts: torch.Tensor | None = None
    state: dict = {}

    def observe(layer: int, out: torch.Tensor) -> None:
        w = state["weights"].to(out.dtype)
        h, d = out.shape[-2:]  # a layer with fewer or narrower heads fills the first entries (per-layer configs)
        acts[state["rows"], layer, :h, :d] = torch.einsum("bt,bthd->bhd", w, weighted_tokens_only(w, out)).to(
            "cpu", torch.float32)

    with patch(model) as heads:
        layout = heads.layout
        acts = torch.zeros(len(prep.examples), layout.num_layers, layout.num_heads, layout.head_dim)
        with heads.observing(observe), heads.using(None, None):
            for batch in prep.batches(batch_size, desc="probe activations", progress=progress):
                mask = batch.target_mask
                if positions == "predict":
                    mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
                w = mask.to(torch.float64)
                total = w.sum(1, keepdim=True)
                empty = batch.example_index.cpu()[(total[:, 0] == 0).cpu()].tolist()
                if empty:
                    named = ", ".join(prep.examples[i].describe(i) for i in empty[:5])
                    more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
                    where = {"target": "target tokens", "predict": "positions that predict a target token"}
                    raise HeadscoreError(f"the probe averages each head's output over the {where[positions]}, and "
                                         f"{named}{more} {'has' if len(empty) == 1 else 'have'} none")
                state["weights"] = w / total
                state["rows"] = batch.example_index.cpu()
                run_forward(model, batch)
    return acts


class HeadProbe(nn.Module):
    """Standardise, project each head D -> d (shared or per-head matrix), MLP over all L * H * d features."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, num_classes: int, *, proj_dim: int = 8,
                 hidden: int = 64, shared: bool = True):
        super().__init__()
        shape = (head_dim, proj_dim) if shared else (num_layers, num_heads, head_dim, proj_dim)
        self.proj = nn.Parameter(torch.randn(*shape) / head_dim ** 0.5)
        self.register_buffer("mean", torch.zeros(num_layers, num_heads, head_dim))
        self.register_buffer("std", torch.ones(num_layers, num_heads, head_dim))
        self.mlp = nn.Sequential(nn.Linear(num_layers * num_heads * proj_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def features(self, acts: torch.Tensor) -> torch.Tensor:
        """Projected per-head features z: [N, L, H, d]."""
        x = (acts - self.mean) / self.std
        eq = "nlhd,de->nlhe" if self.proj.dim() == 2 else "nlhd,lhde->nlhe"
        return torch.einsum(eq, x, self.proj)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Class logits [N, C] from the features z [N, L, H, d]."""
        return self.mlp(z.flatten(1))

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(acts))


@dataclass
class ProbeFit:
    """A trained probe and how well it does."""

    probe: HeadProbe
    train_accuracy: float
    test_accuracy: float
    chance_accuracy: float
    num_train: int
    num_test: int


def train_probe(acts: torch.Tensor, labels: torch.Tensor, train_idx: Sequence[int], test_idx: Sequence[int], *,
                num_classes: int | None = None, proj_dim: int = 8, hidden: int = 64, shared: bool = True,
                epochs: int = 300, lr: float = 1e-3, weight_decay: float = 1e-2, seed: int = 0) -> ProbeFit:
    """Train a :class:`HeadProbe` on ``acts[train_idx]`` (full-batch Adam, seeded) and score it on ``test_idx``.

    Chance accuracy is the test accuracy of always answering the training split's majority class.
    """
    train_idx, test_idx = torch.as_tensor(list(train_idx), dtype=torch.long), torch.as_tensor(list(test_idx),
                                                                                             dtype=torch.long)
    if len(train_idx) == 0:
        raise HeadscoreError("the probe needs at least one training example")
    labels = labels.long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    n, layers, heads, dim = acts.shape
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        probe = HeadProbe(layers, heads, dim, num_classes, proj_dim=proj_dim, hidden=hidden, shared=shared)
        probe = probe.to(acts.dtype)
        x, y = acts[train_idx], labels[train_idx]
        probe.mean.copy_(x.mean(0))
        probe.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(x[0]))
        opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(probe(x), y)
            loss.backward()
            opt.step()
    finally:
        torch.random.set_rng_state(gen_state)
    probe.eval()
    with torch.no_grad():
        train_acc = float((probe(x).argmax(1) == y).double().mean())
        if len(test_idx):
            test_acc = float((probe(acts[test_idx]).argmax(1) == labels[test_idx]).double().mean())
            majority = int(torch.bincount(y, minlength=num_classes).argmax())
            chance = float((labels[test_idx] == majority).double().mean())
        else:
            test_acc = chance = float("nan")
    return ProbeFit(probe, train_acc, test_acc, chance, len(train_idx), len(test_idx))


def probe_gradients(probe: HeadProbe, acts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example gradient x activation of the true class's logit at each head's features: [N, L, H]."""
    with torch.enable_grad():
        z = probe.features(acts).detach().requires_grad_(True)
        logits = probe.classify(z)
        picked = logits.gather(1, labels.long().view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(picked, z)
    return (grad * z).sum(-1).detach()


def probe_importance(probe: HeadProbe, acts: torch.Tensor, labels: torch.Tensor,
                     tasks: Sequence[str], example_index: torch.Tensor | None = None) -> TaskAccumulator:
    """Gradient x activation per head, accumulated by class: mean and stderr [C, L, H], and each example's
    value (kept in the order of ``example_index``, the examples' positions in the run, when given)."""
    values = probe_gradients(probe, acts, labels)
    acc = TaskAccumulator(tasks, acts.shape[1], acts.shape[2], keep_examples=True)
    acc.add(labels, values, example_index)
    return acc


def probe_scores(model, examples, *, train_fraction: float = 0.8, seed: int = 0, batch_size: int = 8,
                 positions: str = "target", importance_on: str = "all", activations: torch.Tensor | None = None,
                 progress: bool = True, **probe_options):
    """Probe importance of every head for every task, with held-out accuracy: HeadScores, method ``probe``.

    Examples with a ``question_id`` (CogQA) are split by main question
    (:func:`headscore.data.cogqa.split_indices_by_question`), others example by example; ``train_fraction``
    of them train the probe. ``importance_on`` picks the examples the importance is averaged over:
    ``all``, ``train`` or ``test``. ``activations`` skips the forward pass (from
    :func:`collect_activations` on the same examples). Other options go to :func:`train_probe`.
    The scores keep each of those examples' own value (``example_values``: the trained probe's
    gradient x activation), so figures of the map can be bootstrapped over examples with the probe
    held fixed.

    Refused before any forward pass: a sequence classifier (its labelled examples have no answer
    tokens to average over), fewer than two tasks, a split whose training part misses a task or whose
    held-out part is empty, and ``importance_on="train"``/``"test"`` where that part has no example of
    some task (its map would be all NaN).
    """
    if importance_on not in ("all", "train", "test"):
        raise HeadscoreError(f"importance_on must be all, train or test, got {importance_on!r}")
    start = time.perf_counter()
    lm = load_model(model) if isinstance(model, str) else model
    if is_sequence_classifier(lm.model):
        raise HeadscoreError(f"the probe averages each head's output over the answer tokens, and "
                             f"{type(lm.model).__name__} is a sequence classifier whose examples (text, label) have "
                             "none: score it with a gradient method (taylor, ig, ...) or ablate")
    prep = prepare(lm, examples)
    if len(prep.tasks) < 2:
        raise HeadscoreError("the probe needs at least two tasks to tell apart")
    if activations is not None and activations.shape[0] != len(prep.examples):
        raise HeadscoreError(f"activations have {activations.shape[0]} rows for {len(prep.examples)} examples")
    labels = torch.tensor([prep.tasks.index(ex.task) for ex in prep.examples])
    order = list(range(len(prep.examples)))
    train_idx, test_idx = split_indices_by_question(question_ids(prep.examples), train_fraction, seed)
    _check_split(prep.tasks, labels, train_idx, test_idx)
    rows = {"all": order, "train": train_idx, "test": test_idx}[importance_on]
    _check_importance_rows(prep.tasks, labels, rows, importance_on)
    acts = collect_activations(prep, batch_size, positions=positions, progress=progress) if activations is None \
        else activations
    fit = train_probe(acts, labels, train_idx, test_idx, num_classes=len(prep.tasks), seed=seed, **probe_options)
    acc = probe_importance(fit.probe, acts[rows], labels[rows], prep.tasks, example_index=torch.as_tensor(rows))
    return prep.result(acc, "probe", probe_accuracy=fit.test_accuracy, chance_accuracy=fit.chance_accuracy,
                       train_accuracy=fit.train_accuracy, num_train=fit.num_train, num_test=fit.num_test,
                       positions=positions, importance_on=importance_on, seed=seed, train_fraction=train_fraction,
                       seconds=time.perf_counter() - start, batch_size=batch_size,
                       **{k: v for k, v in probe_options.items() if isinstance(v, int | float | str | bool)})


def _check_split(tasks: Sequence[str], labels: torch.Tensor, train_idx: Sequence[int],
                 test_idx: Sequence[int]) -> None:
    """Refuse a split whose training part misses a task or whose held-out part is empty: the probe
    could not learn that task, and its accuracy and map would mean nothing."""
    in_train = set(labels[list(train_idx)].tolist())
    absent = [i for i in range(len(tasks)) if i not in in_train]
    if absent or not test_idx:
        counts = Counter(labels.tolist())
        what = ("its training split has no example of " + ", ".join(
            f"{printable(tasks[i])!r} ({counts[i]} in all)" for i in absent)) if absent else "nothing is held out"
        raise HeadscoreError(f"too few examples for the probe: {what}; give every task several examples "
                             "(10 or more for a meaningful probe)")


def _check_importance_rows(tasks: Sequence[str], labels: torch.Tensor, rows: Sequence[int], importance_on: str) -> None:
    """Refuse averaging the importance over a part of the split that has no example of some task: that
    task's map would be all NaN."""
    present = set(labels[list(rows)].tolist())
    absent = [i for i in range(len(tasks)) if i not in present]
    if absent:
        part = {"train": "training", "test": "held-out"}.get(importance_on, importance_on)
        counts = Counter(labels.tolist())
        named = ", ".join(f"{printable(tasks[i])!r} ({counts[i]} in all)" for i in absent)
        raise HeadscoreError(f"importance_on={importance_on!r}: the {part} split has no example of {named}; give "
                             "every task more examples (10 or more) or use importance_on='all'")
