"""Resumable scoring runs: accumulator checkpoints written atomically every N batches.

A checkpoint is one safetensors file holding the run's :class:`TaskAccumulator` sums and,
in its metadata, how many batches of the run are done and a *fingerprint* of the run (model
name, method, data hash, task list, batch size, number of batches, baseline, rank and world
size). Resuming with a different fingerprint is refused with a :class:`CheckpointMismatch`
naming the fields that differ; resuming a finished checkpoint returns its result at once.

Writes go through :func:`headscore.output_files.atomic_write` (temporary file + rename), so a
run killed at any moment leaves either the previous checkpoint or the new one, never a
half-written file; each file carries a checksum (:mod:`headscore.checksum`), verified on
resume. In a distributed run every rank keeps its own file (``PATH.rankR``) with its local
(not yet all-reduced) sums.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from .accumulate import TaskAccumulator
from .checksum import checksummed, read_checked
from .distributed import all_reduce_accumulator, rank_and_world
from .errors import HeadscoreError
from .output_files import atomic_write

FORMAT = "headscore-checkpoint/1"
T = TypeVar("T")

__all__ = ["CheckpointMismatch", "ScoringRun", "fingerprint", "load_checkpoint", "save_checkpoint",
           "checkpoint_path", "tensor_hash"]


class CheckpointMismatch(HeadscoreError):
    """A checkpoint from a different run (model, method, data, batch size, ...)."""


def tensor_hash(t: torch.Tensor) -> str:
    """SHA-256 (16 hex digits) of a tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def fingerprint(**fields) -> dict[str, str]:
    """The identity of a run as strings (compared field by field on resume)."""
    return {k: json.dumps(v, sort_keys=True) if not isinstance(v, str) else v for k, v in sorted(fields.items())}


def checkpoint_path(path: str | Path, rank: int = 0, world: int = 1) -> Path:
    """The file of ``rank``: ``path`` itself in a single-process run, ``path.rankR`` otherwise."""
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.name}.rank{rank}")


def save_checkpoint(path: str | Path, acc: TaskAccumulator, done: int, total: int, print_: dict[str, str]) -> Path:
    """Write the accumulator and progress atomically."""
    meta = {"format": FORMAT, "done": str(done), "total": str(total), "fingerprint": json.dumps(print_),
            "tasks": json.dumps(acc.tasks)}
    tensors = {k: v.contiguous() for k, v in acc.state_dict().items()}
    return atomic_write(path, checksummed(tensors, meta))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], int, int, dict[str, str]]:
    """(accumulator state, batches done, total batches, fingerprint) from a checkpoint file."""
    try:
        meta, tensors = read_checked(path)
        state = {k: tensors[k] for k in ("count", "sum", "sumsq")}
        state.update({k: tensors[k] for k in ("example_values", "example_tasks", "example_order") if k in tensors})
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        return state, int(meta["done"]), int(meta["total"]), json.loads(meta["fingerprint"])
    except HeadscoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise HeadscoreError(f"{path}: not a headscore checkpoint ({exc})") from None


class ScoringRun:
    """The batch loop bookkeeping of one (possibly distributed, possibly resumed) scoring run.

    ``for batch in run.batches(all_batches): ...; acc.add(...); run.batch_done()`` visits
    this rank's batches that are not done yet, checkpointing every ``every`` batches;
    ``run.finish()`` writes the final checkpoint and all-reduces the sums across ranks.
    """

    def __init__(self, acc: TaskAccumulator, total: int, print_: dict[str, str], *,
                 checkpoint: str | Path | None = None, every: int = 0, resume: bool = False,
                 distributed: bool | None = None):
        if every < 0:
            raise HeadscoreError(f"checkpoint interval must be >= 0, got {every}")
        if (every or resume) and checkpoint is None:
            raise HeadscoreError("checkpoint_every and resume need a checkpoint path")
        self.acc = acc
        self.total = total
        self.rank, self.world = rank_and_world(distributed)
        self.fingerprint = {**print_, **fingerprint(rank=self.rank, world_size=self.world, total_batches=total)}
        self.every = every
        self.path = None if checkpoint is None else checkpoint_path(checkpoint, self.rank, self.world)
        self.done = 0  # batches of the global sequence before which everything of this rank is done
        self.resumed_from = 0
        self._since = 0
        if self.path is not None and self.path.exists():
            if not resume:
                raise HeadscoreError(f"checkpoint {self.path} exists: pass resume (--resume) to continue that run, "
                                     "or delete it to start over")
            self._resume()

    def _resume(self) -> None:
        state, done, total, stored = load_checkpoint(self.path)
        diff = [k for k in sorted(set(stored) | set(self.fingerprint)) if stored.get(k) != self.fingerprint.get(k)]
        if diff:
            detail = "; ".join(f"{k}: checkpoint {stored.get(k, '-')} vs now {self.fingerprint.get(k, '-')}"
                               for k in diff)
            raise CheckpointMismatch(f"checkpoint {self.path} is from a different run ({detail}); "
                                     "delete it or use another --checkpoint path")
        if done > total:
            raise HeadscoreError(f"{self.path}: corrupt progress ({done} of {total} batches)")
        self.acc.load_state_dict(state)
        self.done = self.resumed_from = done

    def batches(self, items: Iterable[T]) -> Iterator[T]:
        """This rank's items (``i % world == rank``) from index ``done`` on."""
        for i, item in enumerate(items):
            if i < self.done or i % self.world != self.rank:
                continue
            yield item
            self.done = i + 1
            self._since += 1
            if self.every and self._since >= self.every:
                self.save()

    def save(self) -> None:
        """Write the checkpoint now (no-op without a path)."""
        if self.path is not None:
            save_checkpoint(self.path, self.acc, self.done, self.total, self.fingerprint)
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
