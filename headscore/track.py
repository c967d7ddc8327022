"""Head importance from the training steps a loop already runs: no extra forward or backward pass.

``headscore.track(model)`` patches the model with trainable parameters, puts a gate tensor
of ones [B, L, H] (``requires_grad``) on every forward pass that records a graph, and hooks
that tensor: when the user's ``loss.backward()`` reaches it, its gradient, the per-row gate
gradient dL/dg[b, l, h] of *the loss the user backpropagates*, is added to running sums.
Gates of ones do not change the forward pass or the weight gradients, so training is the
same as without the tracker.

What is accumulated, per task (rows labelled with :meth:`Tracker.set_tasks` or a
``task_labels=`` argument to the model's forward; one task ``all`` otherwise):

- count, sum g, sum |g|, sum g^2 and sum g^4 over rows (float64), from which
  :meth:`Tracker.scores` gives ``taylor`` (mean -g), ``abs`` (mean |g|) and ``fisher``
  (mean g^2), with standard errors, exactly like :func:`headscore.score`;
- an exponential moving average (bias-corrected) of each step's per-task mean of -g, |g|, g^2.

The gradient is that of the loss as backpropagated: with the usual token-mean loss of a
batch, row b's gradient is its token-summed NLL gradient divided by the batch's token count;
with gradient accumulation the loss is usually divided by the number of micro-batches; with a
``GradScaler`` it is multiplied by the loss scale. :func:`headscore.score` differentiates the
sum over rows of each row's mean target NLL, so a loop whose loss is that sum gets exactly
``score()``'s numbers.

Each forward pass counts once, however many times the backward pass reaches its gate
tensor (gradient checkpointing with re-entrant recomputation reaches it once per layer):
contributions are summed per forward pass and folded into the sums at the next forward pass
or on :meth:`Tracker.flush` / :meth:`Tracker.scores`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .accumulate import TaskAccumulator
from .errors import HeadscoreError
from .patch import HeadGates, mark_absent_heads, patch
from .results import HeadScores

__all__ = ["Tracker", "track", "HeadscoreCallback", "TRACKED_METHODS"]

TRACKED_METHODS = ("taylor", "abs", "fisher")


@dataclass
class _Pending:
    """One forward pass whose gate gradient has not been folded into the sums yet."""

    gates: weakref.ref
    task_index: torch.Tensor
    grad: torch.Tensor | None = None


class Tracker:
    """Running per-head gate-gradient statistics of a model being trained (see :func:`track`).

    Attributes:
        tasks: task names (rows are labelled by index into this list).
        ema_decay: decay of the exponential moving average of per-step means.
        auto_step: every backward pass closes an EMA step (else call :meth:`step`).
        forwards: forward passes whose gradient has been counted.
        steps: EMA steps closed so far.
    """

    def __init__(self, model: torch.nn.Module, heads: HeadGates, *, ema: float = 0.99,
                 tasks: Sequence[str] | None = None, auto_step: bool = True):
        if not 0.0 <= ema < 1.0:
            raise HeadscoreError(f"ema must be in [0, 1), got {ema}")
        self.model = model
        self.heads = heads
        self.tasks = list(tasks) if tasks else ["all"]
        if len(set(self.tasks)) != len(self.tasks):
            raise HeadscoreError("task names must be unique")
        self.ema_decay = float(ema)
        self.auto_step = auto_step
        self.enabled = True
        self.forwards = 0
        self.steps = 0
        self._next_tasks: torch.Tensor | None = None
        self._pending: list[_Pending] = []
        self._sums: dict[str, torch.Tensor] | None = None
        self._step_sums: dict[str, torch.Tensor] | None = None
        self._ema: dict[str, torch.Tensor] | None = None
        self._ema_weight: torch.Tensor | None = None

    # ----- labelling and the hooks -----------------------------------------------------------
    def set_tasks(self, task_index: torch.Tensor | Sequence[int] | Sequence[str]) -> None:
        """Label the rows of the *next* forward pass with tasks (indices into :attr:`tasks` or names)."""
        if not isinstance(task_index, torch.Tensor):
            items = list(task_index)
            if items and isinstance(items[0], str):
                try:
                    items = [self.tasks.index(t) for t in items]
                except ValueError:
                    raise HeadscoreError(f"unknown task in {sorted(set(task_index))}; tasks are {self.tasks}") from None
            task_index = torch.tensor(items, dtype=torch.long)
        task_index = task_index.detach().long().flatten()
        if task_index.numel() and (int(task_index.min()) < 0 or int(task_index.max()) >= len(self.tasks)):
            raise HeadscoreError(f"task index out of range for {len(self.tasks)} task(s)")
        self._next_tasks = task_index

    def _pre_forward(self, module, args, kwargs):
        labels = kwargs.pop("task_labels", None)
        if labels is not None:
            self.set_tasks(labels)
        labels, self._next_tasks = self._next_tasks, None
        self.flush()
        if not (self.enabled and torch.is_grad_enabled()):
            self.heads.gates = None
            return args, kwargs
        ref = kwargs.get("input_ids", args[0] if args else None)
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None:
            raise HeadscoreError("headscore.track: cannot tell the batch size (no input_ids or inputs_embeds)")
        rows, device = int(ref.shape[0]), ref.device
        if labels is None:
            if len(self.tasks) > 1:
                raise HeadscoreError("headscore.track: several tasks but this batch has no task labels; call "
                                     "tracker.set_tasks(...) before the forward pass or pass task_labels=")
            labels = torch.zeros(rows, dtype=torch.long)
        if labels.shape[0] != rows:
            raise HeadscoreError(f"task labels for {labels.shape[0]} rows but the batch has {rows}")
        dtype = torch.promote_types(torch.float32, next(self.model.parameters()).dtype)
        gates = self.heads.ones(rows, device=device, requires_grad=True, dtype=dtype)
        record = _Pending(weakref.ref(gates), labels.to(device))
        gates.register_hook(lambda grad, record=record: self._on_grad(record, grad))
        self._pending.append(record)
        self.heads.gates = gates
        return args, kwargs

    @staticmethod
    def _on_grad(record: _Pending, grad: torch.Tensor) -> None:
        grad = grad.detach()
        record.grad = grad.clone() if record.grad is None else record.grad + grad

    # ----- accumulation --------------------------------------------------------------------------
    def _zeros(self, device: torch.device) -> dict[str, torch.Tensor]:
        shape = (len(self.tasks), self.heads.layout.num_layers, self.heads.layout.num_heads)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        out = {k: torch.zeros(shape, dtype=dtype, device=device) for k in ("g", "abs", "g2", "g4")}
        out["count"] = torch.zeros(len(self.tasks), dtype=torch.int64, device=device)
        return out

    def flush(self) -> None:
        """Fold the gradients of finished backward passes into the sums (called automatically)."""
        keep = []
        for record in self._pending:
            if record.grad is not None:
                self._add(record.task_index, record.grad)
                self.forwards += 1
                if self.auto_step:
                    self.step()
            elif record.gates() is not None:  # its graph may still be backpropagated
                keep.append(record)
        self._pending = keep

    def _add(self, task_index: torch.Tensor, grad: torch.Tensor) -> None:
        if self._sums is None:
            self._sums = self._zeros(grad.device)
        if self._step_sums is None:
            self._step_sums = self._zeros(grad.device)
        g = grad.to(self._sums["g"].dtype)
        idx = task_index.to(g.device)
        g2 = g * g
        for sums in (self._sums, self._step_sums):
            sums["count"].index_add_(0, idx, torch.ones_like(idx))
            sums["g"].index_add_(0, idx, g)
            sums["abs"].index_add_(0, idx, g.abs())
            sums["g2"].index_add_(0, idx, g2)
            sums["g4"].index_add_(0, idx, g2 * g2)

    def step(self) -> None:
        """Close one step: fold the per-task means of the rows since the last step into the EMA.

        Called after every counted backward pass when ``auto_step`` (the default); with gradient
        accumulation create the tracker with ``auto_step=False`` and call this after each
        optimizer step (:class:`HeadscoreCallback` does).
        """
        if not self.auto_step:
            self.flush()
        s = self._step_sums
        self._step_sums = None
        if s is None or int(s["count"].sum()) == 0:
            return
        self.steps += 1
        n = s["count"].to(s["g"].dtype)[:, None, None]
        present = (s["count"] > 0)[:, None, None]
        means = {"taylor": -s["g"] / n.clamp_min(1), "abs": s["abs"] / n.clamp_min(1),
                 "fisher": s["g2"] / n.clamp_min(1)}
        if self._ema is None:
            self._ema = {k: torch.zeros_like(v) for k, v in means.items()}
            self._ema_weight = torch.zeros(len(self.tasks), dtype=s["g"].dtype, device=s["g"].device)
        d = self.ema_decay
        for k, v in means.items():
            self._ema[k] = torch.where(present, d * self._ema[k] + (1 - d) * v, self._ema[k])
        self._ema_weight = torch.where(present[:, 0, 0], d * self._ema_weight + (1 - d), self._ema_weight)

    def ema(self, method: str = "taylor") -> torch.Tensor:
        """Bias-corrected EMA of the per-step mean [T, L, H] float64 (NaN for a task never seen)."""
        _check_method(method)
        self.flush()
        if self._ema is None:
            shape = (len(self.tasks), self.heads.layout.num_layers, self.heads.layout.num_heads)
            return torch.full(shape, float("nan"), dtype=torch.float64)
        w = self._ema_weight[:, None, None]
        out = self._ema[method] / w
        return out.where(w > 0, torch.nan).to("cpu", torch.float64)

    def accumulator(self, method: str = "taylor") -> TaskAccumulator:
        """The running sums of ``method``'s per-row values as a :class:`TaskAccumulator` (CPU, float64)."""
        _check_method(method)
        self.flush()
        layout = self.heads.layout
        acc = TaskAccumulator(self.tasks, layout.num_layers, layout.num_heads)
        if self._sums is None:
            return acc
        s = {k: v.to("cpu", torch.float64 if k != "count" else torch.int64) for k, v in self._sums.items()}
        total, square = {"taylor": (-s["g"], s["g2"]), "abs": (s["abs"], s["g2"]),
                         "fisher": (s["g2"], s["g4"])}[method]
        acc.load_state_dict({"count": s["count"], "sum": total, "sumsq": square})
        return acc

    def scores(self, method: str = "taylor", *, model_name: str | None = None) -> HeadScores:
        """The accumulated means as :class:`HeadScores` (per-row values, like :func:`headscore.score`)."""
        acc = self.accumulator(method)
        name = model_name or getattr(getattr(self.model, "config", None), "_name_or_path", "") or \
            type(self.model).__name__
        layout = self.heads.layout
        return HeadScores(mark_absent_heads(acc.mean, layout), mark_absent_heads(acc.stderr, layout),
                          acc.count.clone(), list(self.tasks), method, str(name),
                          extra={"source": "track", "forwards": self.forwards, "steps": self.steps,
                                 "ema": self.ema_decay})

    def reset(self) -> None:
        """Forget all sums, the EMA and pending gradients."""
        self._pending, self._sums, self._step_sums, self._ema, self._ema_weight = [], None, None, None, None
        self.forwards = self.steps = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside the block are not tracked (and run without gates)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled


def _check_method(method: str) -> None:
    if method not in TRACKED_METHODS:
        raise HeadscoreError(f"tracking gives {', '.join(TRACKED_METHODS)}; not {method!r}")


@contextlib.contextmanager
def track(model: torch.nn.Module, *, ema: float = 0.99, tasks: Sequence[str] | None = None,
          auto_step: bool = True, kernel: bool | None = False) -> Iterator[Tracker]:
    """Accumulate per-head gate gradients from the training steps run inside the block.

    Args:
        model: a transformers causal LM being trained (its parameters keep ``requires_grad``).
            Call it as usual; it may also take ``task_labels=`` ([B] task indices or names),
            which the tracker removes before the model sees the arguments.
        ema: decay of the exponential moving average of each step's per-task mean.
        tasks: task names for labelled rows (default: one task ``all``; with several tasks
            every tracked forward pass needs labels).
        auto_step: close an EMA step after every backward pass; pass False and call
            ``tracker.step()`` after each optimizer step when accumulating gradients.
        kernel: the fused Triton attention kernel (see :func:`headscore.patch`); off by default.

    Yields:
        A :class:`Tracker`. Forward passes without autograd (``torch.no_grad``, evaluation)
        run ungated and are not counted. On exit the model is restored.
    """
    with patch(model, freeze=False, kernel=kernel) as heads:
        tracker = Tracker(model, heads, ema=ema, tasks=tasks, auto_step=auto_step)
        handle = model.register_forward_pre_hook(tracker._pre_forward, with_kwargs=True)
        try:
            yield tracker
        finally:
            handle.remove()
            tracker.flush()
            heads.gates = None


class HeadscoreCallback:
    """A transformers ``TrainerCallback`` that tracks head importance during ``Trainer.train()``.

    The tracker starts at ``on_train_begin`` and stops at ``on_train_end``; each optimizer
    step closes an EMA step. Rows of a batch are labelled by a ``task_labels`` column
    (task indices into ``tasks``), which needs ``remove_unused_columns=False`` in the
    ``TrainingArguments`` (the tracker removes it before the model sees it).

    After training, :attr:`scores` holds ``taylor`` HeadScores (or ``method``), also
    written to ``output`` when given; :attr:`tracker` stays readable.

    It implements the ``TrainerCallback`` interface without subclassing it (every other
    ``on_*`` event is a no-op), so importing headscore does not import the Trainer.
    """

    def __init__(self, *, ema: float = 0.99, tasks: Sequence[str] | None = None, method: str = "taylor",
                 output: str | None = None):
        _check_method(method)
        self.ema, self.tasks, self.method, self.output = ema, tasks, method, output
        self.tracker: Tracker | None = None
        self.scores: HeadScores | None = None
        self._stack: contextlib.ExitStack | None = None

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda args, state, control, **kwargs: control
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise HeadscoreError("HeadscoreCallback needs the model in on_train_begin")
        self._stack = contextlib.ExitStack()
        self.tracker = self._stack.enter_context(track(model, ema=self.ema, tasks=self.tasks, auto_step=False))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.step()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._stack is None:
            return control
        self.tracker.step()
        self._stack.close()
        self._stack = None
        self.scores = self.tracker.scores(self.method)
        if self.output and getattr(state, "is_world_process_zero", True):
            self.scores.save(self.output)
        return control
