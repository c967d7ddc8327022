"""Resumable scoring runs: accumulator checkpoints written atomically every N batches.

A checkpoint is one safetensors file holding the run's :class:`TaskAccumulator` sums and,
in its metadata, how many batches of the run are done and a *fingerprint* of the run: what the
model is (:func:`model_identity`: its config, a hash of its weights, dtype and device type, not
the name or path it was loaded by), its head layout, the attention kernel, method, metric
(a callable by :func:`callable_identity`), data and token hashes, task list, batch size, number
of batches, baseline, rank and world size. Resuming with a different fingerprint is refused with
a :class:`CheckpointMismatch` naming the fields that differ (a checkpoint of an older headscore,
whose fingerprint lacks fields, is refused as such); resuming a finished checkpoint returns its
result at once.

Writes go through :func:`headscore.output_files.atomic_write` (temporary file + rename), so a
run killed at any moment leaves either the previous checkpoint or the new one, never a
half-written file; each file carries a checksum (:mod:`headscore.checksum`), verified on
resume. In a distributed run every rank keeps its own file (``PATH.rankR``) with its local
(not yet all-reduced) sums.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import re
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from . import compat
from .accumulate import TaskAccumulator
from .checksum import checksummed, read_checked
from .distributed import all_reduce_accumulator, check_same_on_every_rank, rank_and_world
from .errors import HeadscoreError
from .output_files import atomic_write
from .output_paths import check_output_file

FORMAT = "headscore-checkpoint/1"
FINGERPRINT_VERSION = 3
"""Bumped when the fingerprint gains fields or a field's meaning changes (3: the weights' hash reads where values
sit; the baseline by its name, ``zero`` for none): a checkpoint with another version is refused as a mismatch."""
T = TypeVar("T")

__all__ = ["CheckpointMismatch", "ScoringRun", "fingerprint", "load_checkpoint", "save_checkpoint",
           "checkpoint_path", "tensor_hash", "repr_hash", "model_identity", "callable_identity"]


class CheckpointMismatch(HeadscoreError):
    """A checkpoint from a different run (model, method, data, batch size, ...)."""


def tensor_hash(t: torch.Tensor) -> str:
    """SHA-256 (16 hex digits) of a tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def repr_hash(value: object) -> str:
    """SHA-256 (16 hex digits) of ``repr(value)`` (for values whose repr shows all of them: token ids)."""
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def model_identity(model: torch.nn.Module) -> dict[str, str]:
    """What ``model`` is, whatever name or path it was loaded by: its config (without its path, dtype and
    transformers version), a hash of its parameters' values, its parameters' dtypes and device types, and its
    attention implementation (``sdpa``, ``eager``, ...).

    The weights' hash reads, per parameter, the sum of its bits taken as 64-bit integers (exact, so the same
    in any order of addition, on any device and thread count), its first rows and columns weighted by their
    place (so a parameter with two whole rows or columns swapped, two heads, is another model) and 8 strided
    elements: one reduction per parameter on its own device, a few small ones, and a few numbers copied to the
    host (about 0.1 s for SmolLM2-135M on one CPU thread). Parameters on the ``meta`` device (offloaded to
    disk) count by name, shape and dtype only.
    """
    params = dict(model.named_parameters())
    config = getattr(model, "config", None)
    config = {} if config is None else {k: v for k, v in config.to_dict().items()
                                        if not k.startswith("_") and k not in ("dtype", "torch_dtype",
                                                                               "transformers_version")}
    weights = hashlib.sha256()
    for name, p in params.items():
        weights.update(f"{name}{p.dtype}{tuple(p.shape)}".encode())
        if p.device.type != "meta" and p.numel():
            flat = p.detach().reshape(-1)
            bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}.get(flat.element_size(), torch.int64))
            try:  # 8 bytes at a time, wrapping around on overflow: exact in any order of addition
                total = flat.view(torch.int64).sum()
            except RuntimeError:  # a size or offset that is no multiple of 8 bytes
                total = bits.sum(dtype=torch.int64)
            sample = bits[::max(1, bits.numel() // 8)][:8].to(torch.int64)
            weights.update(torch.cat([total.reshape(1), sample, _placed(bits, p.shape)]).cpu().numpy().tobytes())
    return {"model_config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "weights": weights.hexdigest()[:16], "dtype": _kinds(p.dtype for p in params.values()),
            "device": _kinds(p.device.type for p in params.values()),
            "attention": str(compat.attention_implementation(model) if config else None)}


def _placed(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Two int64 sums that depend on where values sit: the first 4 rows' values weighted by column number and
    the first 4 columns' weighted by row number (a parameter as [its first dimension, the rest]; a vector as
    one column), so that swapping two whole rows or columns (two heads' projections) changes them, where the
    plain sum does not. Exact, in any order of addition (wrapping around on overflow, as that sum), and cheap:
    a few rows and columns, not the whole parameter."""
    grid = bits.reshape(shape[0] if len(shape) else 1, -1)
    top, left = grid[:4].to(torch.int64), grid[:, :4].to(torch.int64)
    return torch.stack([(top * torch.arange(1, top.shape[1] + 1, device=top.device)).sum(),
                        (left * torch.arange(1, left.shape[0] + 1, device=left.device)[:, None]).sum()])


def _kinds(values: Iterable[object]) -> str:
    return ",".join(sorted({str(v).removeprefix("torch.") for v in values}))


def callable_identity(fn: Callable) -> str:
    """A callable (a user's metric) as ``module.qualified.name:hash``.

    The hash covers its code (bytecode, constants and the names it reads, nested code objects included), its
    defaults and closure values (a tensor or a NumPy array by its bytes, a function by its own identity, lists,
    tuples, dicts and sets item by item, anything else by its ``repr`` where that shows no memory address), a
    ``functools.partial``'s arguments, and a callable object's class ``__call__`` and attributes. Not told
    apart: the values of globals it reads and the code of functions it calls by name (only the names are in its
    code), a bound method's object, and closure values, defaults or attributes whose ``repr`` shows an address
    (only their type counts).
    """
    h = hashlib.sha256()
    _feed_callable(h, fn, set())
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or ''}.{name}:{h.hexdigest()[:16]}"


def _feed_callable(h, fn: Callable, seen: set[int]) -> None:
    if id(fn) in seen:  # a recursive closure
        h.update(b"<again>")
        return
    seen.add(id(fn))
    if isinstance(fn, functools.partial):
        _feed_callable(h, fn.func, seen)
        _feed_value(h, (fn.args, sorted(fn.keywords.items())), seen)
        return
    func = getattr(fn, "__func__", fn)  # a bound method: its function
    if not isinstance(func, types.FunctionType):  # a builtin: its name; an object: its class's __call__, its attributes
        h.update(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}".encode())
        call = type(fn).__call__
        if isinstance(call, types.FunctionType):
            _feed_callable(h, call, seen)
            _feed_value(h, sorted(getattr(fn, "__dict__", {}).items()), seen)
        return
    _feed_code(h, func.__code__)
    _feed_value(h, (func.__defaults__, sorted((func.__kwdefaults__ or {}).items())), seen)
    for cell in func.__closure__ or ():
        try:
            _feed_value(h, cell.cell_contents, seen)
        except ValueError:  # an empty cell
            h.update(b"<empty>")


def _feed_code(h, code: types.CodeType) -> None:
    h.update(code.co_code + repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(h, const)
        else:
            h.update(repr(const).encode())


def _feed_value(h, value: object, seen: set[int]) -> None:
    if isinstance(value, torch.Tensor):
        h.update(tensor_hash(value).encode())
    elif type(value).__module__ == "numpy" and hasattr(value, "tobytes"):  # an array: every element, not its repr
        h.update(f"{getattr(value, 'dtype', '')}{getattr(value, 'shape', '')}".encode() + value.tobytes())
    elif callable(value) and not isinstance(value, type):
        _feed_callable(h, value, seen)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _feed_value(h, item, seen)
        h.update(b")")
    elif isinstance(value, dict):  # key and value each fed as itself (a dict's repr cuts a large tensor short)
        for key, item in sorted(value.items(), key=lambda kv: repr(kv[0])):
            _feed_value(h, key, seen)
            _feed_value(h, item, seen)
        h.update(b"}")
    elif isinstance(value, (set, frozenset)):
        for item in sorted(value, key=repr):
            _feed_value(h, item, seen)
        h.update(b"}")
    else:
        text = repr(value)
        h.update((type(value).__qualname__ if re.search(r" at 0x[0-9a-fA-F]+", text) else text).encode())


def fingerprint(**fields) -> dict[str, str]:
    """The identity of a run as strings (compared field by field on resume)."""
    return {k: json.dumps(v, sort_keys=True) if not isinstance(v, str) else v for k, v in sorted(fields.items())}


def checkpoint_path(path: str | Path, rank: int = 0, world: int = 1) -> Path:
    """The file of ``rank``: ``path`` itself in a single-process run, ``path.rankR`` otherwise."""
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.name}.rank{rank}")


def save_checkpoint(path: str | Path, acc: TaskAccumulator, done: int, total: int, print_: dict[str, str],
                    notes: dict[str, str] | None = None) -> Path:
    """Write the accumulator and progress atomically; ``notes``: what the run decided on its way (e.g. the mode a
    check fell back to), which a resumed run goes on with (not part of its identity)."""
    meta = {"format": FORMAT, "done": str(done), "total": str(total), "fingerprint": json.dumps(print_),
            "tasks": json.dumps(acc.tasks), "notes": json.dumps(notes or {})}
    tensors = {k: v.contiguous() for k, v in acc.state_dict().items()}
    return atomic_write(path, checksummed(tensors, meta))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], int, int, dict[str, str]]:
    """(accumulator state, batches done, total batches, fingerprint) from a checkpoint file."""
    return _read_checkpoint(path)[:4]


def _read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], int, int, dict[str, str], dict[str, str]]:
    """:func:`load_checkpoint`'s four and the run's notes ({} in a file written before notes)."""
    try:
        meta, tensors = read_checked(path)
        state = {k: tensors[k] for k in ("count", "sum", "sumsq")}
        state.update({k: tensors[k] for k in ("example_values", "example_tasks", "example_order") if k in tensors})
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        notes = json.loads(meta.get("notes", "{}"))
        if not isinstance(notes, dict) or not all(isinstance(v, str) for v in notes.values()):
            raise ValueError(f"notes {meta.get('notes')!r}")
        return state, int(meta["done"]), int(meta["total"]), json.loads(meta["fingerprint"]), notes
    except HeadscoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise HeadscoreError(f"{path}: not a headscore checkpoint ({exc})") from None


class ScoringRun:
    """The batch loop bookkeeping of one (possibly distributed, possibly resumed) scoring run.

    ``for batch in run.batches(all_batches): ...; acc.add(...)`` visits this rank's batches that are not
    done yet, checkpointing every ``every`` batches; ``run.save_interrupted()`` (from an ``except`` around
    the loop) writes the batches done when the loop stopped; ``run.finish()`` writes the final checkpoint
    and all-reduces the sums across ranks.
    """

    def __init__(self, acc: TaskAccumulator, total: int, print_: dict[str, str], *,
                 checkpoint: str | Path | None = None, every: int = 0, resume: bool = False,
                 distributed: bool | None = None, data: str = ""):
        """``data`` identifies what every rank must agree on (the examples in order, the batches): checked across
        ranks before any work in a distributed run."""
        if every < 0:
            raise HeadscoreError(f"checkpoint interval must be >= 0, got {every}")
        if (every or resume) and checkpoint is None:
            raise HeadscoreError("checkpoint_every and resume need a checkpoint path")
        self.acc = acc
        self.total = total
        self.rank, self.world = rank_and_world(distributed)
        if self.world > 1:
            check_same_on_every_rank(f"{data}|{total}|{acc.tasks}", "the examples or the batches")
        self.fingerprint = {**print_, **fingerprint(rank=self.rank, world_size=self.world, total_batches=total,
                                                    fingerprint_version=FINGERPRINT_VERSION)}
        self.every = every
        self.path = None if checkpoint is None else checkpoint_path(checkpoint, self.rank, self.world)
        self.done = 0  # batches of the global sequence before which everything of this rank is done
        self.resumed_from = 0
        self._since = 0
        self._current: tuple[int, tuple] | None = None  # the batch in progress and the accumulator before it
        # what the run decided on its way (saved with it, taken back on resume): e.g. ablate's mode after its check
        self.notes: dict[str, str] = {}
        if self.path is not None:  # writable where it goes: found now, not after the work it keeps
            check_output_file("checkpoint", self.path)
        if checkpoint is not None:
            self._refuse_other_world(Path(checkpoint))
        if self.path is not None and self.path.exists():
            if not resume:
                raise HeadscoreError(f"checkpoint {self.path} exists: pass resume (--resume) to continue that run, "
                                     "or delete it to start over")
            self._resume()

    def _refuse_other_world(self, path: Path) -> None:
        """CheckpointMismatch for checkpoint files of ``path`` that a run of another world size wrote: ``path`` in
        a single-process run, ``path.rankR`` in a distributed one (this run's rank 0 would not resume them)."""
        ours = {checkpoint_path(path, r, self.world).name for r in range(self.world)}
        names = re.compile(rf"{re.escape(path.name)}(\.rank\d+)?")
        found = sorted(p for p in path.parent.glob(f"{glob.escape(path.name)}*")
                       if names.fullmatch(p.name) and p.is_file())
        others = [p for p in found if p.name not in ours]
        # a smaller world's files have this run's names: the first one tells its world size (on every rank)
        first = others[0] if others else found[0] if found and self.world > 1 else None
        if first is None:
            return
        world = load_checkpoint(first)[3].get("world_size", "?" if others else str(self.world))
        if others or world != str(self.world):
            files = " and ".join(sorted({str(path) if p == path else f"{path}.rank*" for p in others or [first]}))
            raise CheckpointMismatch(f"checkpoint {first} is from a run of world size {world}, this one has "
                                     f"{self.world}: resume with {world} processes, or delete {files} to start over")

    def _resume(self) -> None:
        state, done, total, stored, notes = _read_checkpoint(self.path)
        if stored.get("fingerprint_version") != self.fingerprint["fingerprint_version"]:
            raise CheckpointMismatch(f"checkpoint {self.path} was written by another headscore version (fingerprint "
                                     f"version {stored.get('fingerprint_version', 1)}, now {FINGERPRINT_VERSION}) "
                                     "and cannot be checked against this run; delete it to start over or use "
                                     "another --checkpoint path")
        diff = [k for k in sorted(set(stored) | set(self.fingerprint)) if stored.get(k) != self.fingerprint.get(k)]
        if diff:
            detail = "; ".join(f"{k}: checkpoint {stored.get(k, '-')} vs now {self.fingerprint.get(k, '-')}"
                               for k in diff)
            raise CheckpointMismatch(f"checkpoint {self.path} is from a different run ({detail}); "
                                     "delete it or use another --checkpoint path")
        if not 0 <= done <= total:
            raise HeadscoreError(f"{self.path}: corrupt progress ({done} of {total} batches)")
        for key in ("count", "sum", "sumsq"):
            ours = getattr(self.acc, key).shape
            if state[key].shape != ours:
                raise CheckpointMismatch(f"checkpoint {self.path} holds {key} of shape {list(state[key].shape)}, this "
                                         f"run's is {list(ours)}; delete it or use another --checkpoint path")
        self.acc.load_state_dict(state)
        self.done = self.resumed_from = done
        self.notes.update(notes)

    def batches(self, items: Iterable[T]) -> Iterator[T]:
        """This rank's items (``i % world == rank``) from index ``done`` on."""
        for i, item in enumerate(items):
            if i < self.done or i % self.world != self.rank:
                continue
            # what a stop rewinds to (save_interrupted); without a checkpoint nothing is saved, so nothing is kept
            self._current = (i, self.acc.mark()) if self.path is not None else None
            yield item
            # done first: a stop between the two lines rewinds to the mark (done = i again); the other way round,
            # a stop there kept the batch's sums with done = i, and a resume counted the batch twice
            self.done = i + 1
            self._current = None
            self._since += 1
            if self.every and self._since >= self.every:
                self.save()

    @contextlib.contextmanager
    def saving_on_exit(self) -> Iterator[None]:
        """Around the batch loop: :meth:`save_interrupted` when an exception stops it, then the exception."""
        try:
            yield
        except BaseException:
            self.save_interrupted()
            raise

    def save_interrupted(self) -> None:
        """After the batch loop stopped by an exception (Ctrl-C, SIGTERM, an error): write the checkpoint of the
        batches done, with the batch in progress undone in the accumulator, however far it got; nothing without
        a checkpoint path. A failing write warns (the exception that stopped the run is the one to see)."""
        if self.path is None:
            return
        if self._current is not None:
            self.done, mark = self._current
            self.acc.rewind(mark)
            self._current = None
        try:
            self.save()
        except Exception as exc:  # noqa: BLE001 - the run's own exception follows; this one only warns
            warnings.warn(f"the checkpoint {self.path} could not be written after the run stopped ({exc})",
                          stacklevel=2)
            return
        warnings.warn(f"stopped after {self.done} of {self.total} batches; {self.path} holds them: resume to go on "
                      "(--resume, resume=True)", stacklevel=2)

    def save(self) -> None:
        """Write the checkpoint now (no-op without a path)."""
        if self.path is not None:
            save_checkpoint(self.path, self.acc, self.done, self.total, self.fingerprint, self.notes)
            self._since = 0

    def finish(self) -> TaskAccumulator:
        """Mark the run complete in the checkpoint and all-reduce the sums over ranks."""
        self.done = self.total
        self.save()
        if self.world > 1:
            all_reduce_accumulator(self.acc)
        return self.acc

    def remove(self) -> None:
        """Delete this rank's checkpoint (after the result is safely written)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    @property
    def extra(self) -> dict:
        """Metadata for the result: world size and the batch the run resumed from."""
        out = {}
        if self.world > 1:
            out["world_size"] = self.world
        if self.resumed_from:
            out["resumed_from_batch"] = self.resumed_from
        return out
