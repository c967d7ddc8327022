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
``GradScaler`` it is multiplied by the loss scale, unless the tracker is given the scaler
(``scaler=``), which divides each pass's gradient by the scale it was made with. A pass whose
gate gradient is not all finite (a step the scaler skips) is not counted (:attr:`Tracker.skipped`).
:func:`headscore.score` differentiates the sum over rows of each row's mean target NLL, so a
loop whose loss is that sum gets exactly ``score()``'s numbers.

Each forward pass counts once, however many times the backward pass reaches its gate
tensor (gradient checkpointing with re-entrant recomputation reaches it once per layer):
contributions are summed per forward pass and folded into the sums at the next forward pass
or on :meth:`Tracker.flush` / :meth:`Tracker.scores`. Under re-entrant checkpointing each pass's
saved tensors carry its gates (``saved_tensors_hooks``), so a layer recomputed in the backward pass
uses the gates of the forward pass it belongs to, however many passes await one backward.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import compat
from .accumulate import TaskAccumulator
from .errors import HeadscoreError
from .gate import gate_dtype
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
    folded: bool = False


class Tracker:
    """Running per-head gate-gradient statistics of a model being trained (see :func:`track`).

    Attributes:
        tasks: task names (rows are labelled by index into this list).
        ema_decay: decay of the exponential moving average of per-step means.
        auto_step: every counted forward pass closes an EMA step (in the usual loop, one forward and one
            backward pass per optimizer step, that is every step; else call :meth:`step`).
        forwards: forward passes whose gradient has been counted.
        skipped: forward passes whose gradient was not all finite (not counted; e.g. a step a
            ``GradScaler`` skips).
        late: gradients that reached a forward pass after it was counted (not counted: a second backward
            pass through one graph, ``retain_graph=True``, after :meth:`scores` or a later forward pass).
        steps: EMA steps closed so far.
        scaler: the ``GradScaler`` whose scale each gradient is divided by, or None.
    """

    def __init__(self, model: torch.nn.Module, heads: HeadGates, *, ema: float = 0.99,
                 tasks: Sequence[str] | None = None, auto_step: bool = True,
                 scaler: torch.amp.GradScaler | None = None):
        if not 0.0 <= ema < 1.0:
            raise HeadscoreError(f"ema must be in [0, 1), got {ema}")
        self.model = model
        self.heads = heads
        self.tasks = list(tasks) if tasks else ["all"]
        if len(set(self.tasks)) != len(self.tasks):
            raise HeadscoreError("task names must be unique")
        self.ema_decay = float(ema)
        self.auto_step = auto_step
        self.scaler = scaler
        self.enabled = True
        self.forwards = 0
        self.skipped = 0
        self.late = 0
        self.steps = 0
        self._checkpointing = compat.checkpointing_modules(model)  # read each forward pass: found once
        self._saved_hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._previous: weakref.ref | None = None
        self._ungate_after = False
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
        # the previous pass's gates now live on only in its graph; a pass without autograd (or a refused one)
        # gives them back to heads.gates afterwards (_post_forward), for its recomputation under checkpointing
        previous, self.heads.gates = self.heads.gates, None
        self._previous = None if previous is None else weakref.ref(previous)
        del previous
        self.flush()
        if not torch.is_grad_enabled():
            return args, kwargs
        checkpointing = compat.activation_checkpointing(self.model, self._checkpointing)
        if not self.enabled:  # paused, with a graph: it runs, and is recomputed, ungated
            self._previous = None
            self._carry_gates(checkpointing, None)
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
        dtype = gate_dtype(self.model)
        gates = self.heads.ones(rows, device=device, requires_grad=True, dtype=dtype)
        self._check_recomputation(checkpointing, gates)
        record = _Pending(weakref.ref(gates), labels.to(device))
        gates.register_hook(lambda grad, record=record: self._on_grad(record, grad))
        self._pending.append(record)
        self.heads.gates, self._previous = gates, None
        # without checkpointing nothing reads the gates after the pass: a call that bypasses model(...) (the
        # inner model for an extra loss, model.forward) must not be gated by them, nor its gradient counted
        self._ungate_after = checkpointing is None
        self._carry_gates(checkpointing, gates)
        return args, kwargs

    def _carry_gates(self, checkpointing: str | None, gates: torch.Tensor | None) -> None:
        """Under re-entrant checkpointing, make the tensors this forward pass saves carry (and keep) its gates,
        until :meth:`_post_forward`."""
        if checkpointing in ("reentrant", "other"):
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(
                lambda t: (t.detach(), gates), self._unpack_saved)  # detached: no reference cycle
            self._saved_hooks.__enter__()

    def _post_forward(self, module, args, output):
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None
        if self._previous is not None:
            self.heads.gates, self._previous = self._previous(), None
        if self._ungate_after:
            self.heads.gates, self._ungate_after = None, False

    def _unpack_saved(self, saved: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        # the backward pass reads a tensor of this pass (first of all, a checkpointed layer's inputs
        # before it is recomputed): the recomputation gates with this pass's gates
        tensor, self.heads.gates = saved
        return tensor

    def _check_recomputation(self, checkpointing: str | None, gates: torch.Tensor) -> None:
        """Refuse a forward pass whose layers' recomputation could not tell it from an earlier pass
        that still awaits its backward pass."""
        if checkpointing in (None, "reentrant"):
            return
        waiting = [r.gates() for r in self._pending]
        if checkpointing == "other" and waiting:
            raise HeadscoreError("headscore.track: a forward pass started while an earlier one awaits its backward "
                                 "and the model checkpoints activations with its own function (offload=True?); "
                                 "backpropagate each pass first, or use activation_checkpointing_enable()")
        if any(g is not None and g.shape != gates.shape for g in waiting):
            raise HeadscoreError("headscore.track: a forward pass of another shape started while an earlier one "
                                 "awaits its backward under non-reentrant checkpointing (its recomputation reads "
                                 "the latest gates); backpropagate each pass first, or use use_reentrant=True")

    def _on_grad(self, record: _Pending, grad: torch.Tensor) -> None:
        if record.folded:  # a second backward through a graph (retain_graph) after its pass was counted
            if not self.late:
                warnings.warn("headscore.track: a backward pass reached a forward pass whose gradient was already "
                              "counted (backpropagated again after tracker.scores() or a later forward pass); "
                              "such gradients are not counted (tracker.late)", RuntimeWarning, stacklevel=2)
            self.late += 1
            return
        grad = grad.detach()
        if self.scaler is not None:  # the scale this gradient was made with (a tensor: no host sync)
            grad = grad / self.scaler.scale(torch.ones((), dtype=grad.dtype, device=grad.device))
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
            if record.grad is not None and not bool(torch.isfinite(record.grad).all()):
                if not self.skipped:
                    warnings.warn("headscore.track: a forward pass's gate gradient is not finite (a step a "
                                  "GradScaler skips?); such passes are not counted (tracker.skipped)",
                                  RuntimeWarning, stacklevel=2)
                self.skipped += 1
            elif record.grad is not None:
                self._add(record.task_index, record.grad)
                record.folded, record.grad = True, None
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

        Called after every counted forward pass when ``auto_step`` (the default); with gradient
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
        return mark_absent_heads(out.where(w > 0, torch.nan).to("cpu", torch.float64), self.heads.run_layout())

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
        layout = self.heads.run_layout()
        return HeadScores(mark_absent_heads(acc.mean, layout), mark_absent_heads(acc.stderr, layout),
                          acc.count.clone(), list(self.tasks), method, str(name),
                          extra={"source": "track", "forwards": self.forwards, "skipped": self.skipped,
                                 "steps": self.steps, "ema": self.ema_decay})

    def reset(self) -> None:
        """Forget all sums, the EMA and pending gradients."""
        self._pending, self._sums, self._step_sums, self._ema, self._ema_weight = [], None, None, None, None
        self.forwards = self.skipped = self.steps = 0

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
          auto_step: bool = True, kernel: bool | None = False,
          scaler: torch.amp.GradScaler | None = None) -> Iterator[Tracker]:
    """Accumulate per-head gate gradients from the training steps run inside the block.

    Args:
        model: a transformers causal LM being trained (its parameters keep ``requires_grad``).
            Call it as usual; it may also take ``task_labels=`` ([B] task indices or names),
            which the tracker removes before the model sees the arguments.
        ema: decay of the exponential moving average of each step's per-task mean.
        tasks: task names for labelled rows (default: one task ``all``; with several tasks
            every tracked forward pass needs labels).
        auto_step: close an EMA step after every counted forward pass (one forward and one backward pass per
            optimizer step: every step); pass False and call ``tracker.step()`` after each optimizer step when
            accumulating gradients, or when one backward pass serves several forward passes.
        kernel: the fused Triton attention kernel (see :func:`headscore.patch`); off by default.
        scaler: the ``torch.amp.GradScaler`` that scales the loss: each pass's gradient is divided by
            the scale it was made with (read as the gradient arrives, before ``scaler.update()``).

    Yields:
        A :class:`Tracker`. Forward passes without autograd (``torch.no_grad``, evaluation)
        run ungated and are not counted. On exit the model is restored.

    A hybrid model's layers without attention (or a layer whose attention ran in no tracked pass) are absent,
    NaN, in :meth:`Tracker.scores` and :meth:`Tracker.ema`, as in :func:`headscore.score`; so are the heads a
    layer does not have (per-layer head counts).
    """
    with patch(model, freeze=False, kernel=kernel, training=True) as heads:
        tracker = Tracker(model, heads, ema=ema, tasks=tasks, auto_step=auto_step, scaler=scaler)
        handles = (model.register_forward_pre_hook(tracker._pre_forward, with_kwargs=True),
                   model.register_forward_hook(tracker._post_forward, always_call=True))
        try:
            yield tracker
        finally:
            for handle in handles:
                handle.remove()
            tracker._post_forward(model, (), None)  # a forward pass interrupted by a BaseException (Ctrl-C)
            tracker.flush()
            heads.gates = None


class HeadscoreCallback:
    """A transformers ``TrainerCallback`` that tracks head importance during ``Trainer.train()``.

    The tracker starts at ``on_train_begin`` and stops at ``on_train_end``; each optimizer
    step closes an EMA step. Rows of a batch are labelled by a ``task_labels`` column
    (task indices into ``tasks``), which needs ``remove_unused_columns=False`` in the
    ``TrainingArguments`` (the tracker removes it before the model sees it).

    After training, :attr:`scores` holds ``taylor`` HeadScores (or ``method``), also
    written to ``output`` when given; :attr:`tracker` stays readable. Under fp16 mixed precision
    the Trainer's ``GradScaler`` (its optimizer's ``scaler``) is divided out.

    When ``train()`` raises (Ctrl-C, out of memory, another callback's error) the Trainer sends no
    ``on_train_end``: call :meth:`close` (or ``try: trainer.train() finally: callback.close()``) to
    restore the model; the next ``on_train_begin`` closes a tracker left open too.

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

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise HeadscoreError("HeadscoreCallback needs the model in on_train_begin")
        self.close()  # a run that raised left its tracker open
        scaler = getattr(optimizer, "scaler", None)  # accelerate's optimizer under fp16: the loss scaler
        self._stack = contextlib.ExitStack()
        self.tracker = self._stack.enter_context(track(model, ema=self.ema, tasks=self.tasks, auto_step=False,
                                                       scaler=scaler))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.step()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._stack is None:
            return control
        self.close()
        if self.output and getattr(state, "is_world_process_zero", True):
            self.scores.save(self.output)
        return control

    def close(self) -> None:
        """Stop tracking and restore the model (a no-op when not tracking); :attr:`scores` then holds the
        rows counted so far. ``on_train_end`` calls it; call it yourself when ``trainer.train()`` raises."""
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        try:
            self.tracker.step()
            self.scores = self.tracker.scores(self.method)
        finally:
            stack.close()
