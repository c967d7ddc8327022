"""Data-parallel scoring with ``torch.distributed``: each rank scores its shard, the sums are all-reduced.

Launch with ``torchrun --nproc-per-node N -m headscore.cli score ...`` (or ``headscore score
--distributed`` under any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``).
The command line scores distributed automatically when ``WORLD_SIZE`` > 1; the library's
:func:`headscore.score` does when a process group is initialised with more than one rank (or
with ``distributed=True``).

Every rank is given all the examples, in the same order (not a share of its own: a run whose ranks
disagree on the examples, their order or the batch size is refused before any work). Sharding is
deterministic and by batch: the examples are batched exactly as in a single-process run (sorted by
length, then by example index) and batch ``i`` goes to rank ``i % world_size``. Every example therefore
sees the same padding and gets bit-for-bit the gradient it gets in one process; only the order of the
float64 additions differs, so the result equals a single-process run to ~1e-15 relative.

Backends: ``gloo`` on CPUs (tested here with two processes), ``nccl`` on CUDA GPUs (one rank
per GPU, device ``cuda:LOCAL_RANK``; not testable on the CPU-only CI machine).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from .accumulate import TaskAccumulator
from .errors import HeadscoreError

T = TypeVar("T")

__all__ = ["init", "rank_and_world", "env_world_size", "shard", "all_reduce_accumulator", "is_main_process",
           "check_same_on_every_rank"]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by torchrun), 1 when unset."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init(backend: str | None = None, *, device: str = "cpu", timeout_s: float = 600) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (if not already) -> (rank, world).

    ``backend`` defaults to ``nccl`` for a CUDA ``device`` and ``gloo`` otherwise.
    """
    if not dist.is_available():
        raise HeadscoreError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise HeadscoreError(f"distributed scoring needs {', '.join(missing)} in the environment: "
                                 "launch with torchrun")
        backend = backend or ("nccl" if str(device).startswith("cuda") else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def rank_and_world(distributed: bool | None = None) -> tuple[int, int]:
    """This process's (rank, world size) for a scoring run; (0, 1) when not distributed.

    ``None`` = distributed iff a process group with more than one rank is initialised;
    ``True`` requires one; ``False`` ignores it.
    """
    if distributed is False:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if distributed:
        raise HeadscoreError("distributed scoring needs an initialised process group (launch with torchrun; "
                             "headscore.distributed.init() sets it up)")
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (or without torch.distributed)."""
    return rank_and_world(None)[0] == 0


def shard(items: Iterable[T], rank: int, world: int) -> Iterator[tuple[int, T]]:
    """``(i, item)`` for the items with ``i % world == rank``: rank ``rank``'s deterministic share."""
    for i, item in enumerate(items):
        if i % world == rank:
            yield i, item


def check_same_on_every_rank(identity: str, what: str) -> None:
    """HeadscoreError on every rank unless every rank passed the same ``identity`` (one int64 all-reduce; nothing
    without a process group of 2+ ranks). ``what`` says what must agree, for the message."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    value = int(hashlib.sha256(identity.encode()).hexdigest()[:15], 16)  # 60 bits: -value fits an int64
    ours = torch.tensor([value, -value], dtype=torch.int64)
    seen = ours.to(_reduce_device(), copy=True)  # reduced in place: ours stays as it was
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    if not torch.equal(seen.cpu(), ours):
        raise HeadscoreError(f"ranks disagree on {what}: every rank must be given the same examples in the same "
                             "order (headscore shards them by batch itself), with the same settings")


def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_accumulator(acc: TaskAccumulator) -> TaskAccumulator:
    """Sum ``acc``'s count, sum and sum of squares over all ranks, in place (one float64 all-reduce).

    Every rank must call it with accumulators of the same tasks and shape. Returns ``acc``. Per-example
    values (``keep_examples``) are not gathered: a multi-process run drops them (its scores have no
    bootstrap intervals).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return acc
    acc.drop_examples()
    flat = torch.cat([acc.count.to(torch.float64), acc.sum.flatten(), acc.sumsq.flatten()])
    # a header with the shape guards against ranks whose accumulators differ in shape (check_same_on_every_rank,
    # called before the work, is the check that they scored the same data)
    header = torch.tensor([float(len(acc.tasks)), *acc.sum.shape[1:]], dtype=torch.float64)
    device = _reduce_device()
    check = torch.stack([header, -header]).to(device)
    dist.all_reduce(check, op=dist.ReduceOp.MAX)
    if not torch.equal(check[0].cpu(), header) or not torch.equal(-check[1].cpu(), header):
        raise HeadscoreError("ranks disagree on the tasks or the model's heads; every rank must score the same "
                             "examples with the same model")
    flat = flat.to(device)
    dist.all_reduce(flat)
    flat = flat.cpu()
    n = len(acc.tasks)
    size = acc.sum.numel()
    if (flat[:n] > 2 ** 53).any():
        raise HeadscoreError("example count too large to all-reduce exactly")
    acc.count.copy_(flat[:n].round().to(torch.int64))
    acc.sum.copy_(flat[n:n + size].view_as(acc.sum))
    acc.sumsq.copy_(flat[n + size:].view_as(acc.sumsq))
    return acc
