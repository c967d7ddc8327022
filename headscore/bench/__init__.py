"""``headscore bench``: all-head scoring against the alternatives, on one model, data set and device, in one run.

One module per job:

- :mod:`.methods`: what every method gets (:class:`Context`) and returns (:class:`Output`), the bench's
  own methods (``floor``, ``taylor``, ``ablate-batched``, ``ablate-sequential``, ``hooks-attribution``),
  and what the peers share with them: the loss from full logits, gradient x activation per head, the
  head sample and the timed sampled-ablation sweep;
- :mod:`.peers`: nnsight and TransformerLens (imported only when they run: a peer that cannot be
  imported is reported as ``unavailable: <reason>``);
- :mod:`.registry`: the method names, their labels, and :func:`resolve`;
- :mod:`.memory`: peak memory, in a fresh ``python -m headscore.bench --memory-worker`` subprocess
  per method on the CPU (VmHWM), in process on CUDA;
- :mod:`.runner`: :func:`run_bench`, warm-up and interleaved rounds, agreement with ablation;
- :mod:`.tables`: the rows, the Markdown table, the json/csv/md files, machine and versions.

Timing: every method runs once as warm-up, then ``repeats`` rounds interleave the methods
(round robin, so load drift on a shared machine hits all of them alike); the median is
reported. Memory: the peak above the loaded model, on the CPU the RSS high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) of a fresh subprocess per method, measured on
its second run (the first one pages in the memory-mapped weights, a cost common to all), on
CUDA ``torch.cuda.max_memory_allocated``. Agreement: mean over tasks of the Spearman
correlation with batched zero ablation (:func:`headscore.compare`).

The command line (``headscore bench``) lives in :mod:`headscore.cli.bench`.
"""

from .memory import measure_memory_here, measure_memory_subprocess, sampled_batched, worker_args, worker_main
from .methods import (
    BUILTIN,
    Context,
    Method,
    Output,
    attribution_from_acts,
    floor_pass,
    head_sample,
    losses_from_logits,
    o_proj_modules,
    run_ablate_batched,
    run_ablate_sequential,
    run_floor,
    run_hooks_attribution,
    run_taylor,
    sampled_ablation,
    timed_head_sweep,
)
from .peers import PEERS, nnsight_attribution, tl_ablation, tl_attribution, unavailable
from .registry import DEFAULT_METHODS, HEAVY, LABELS, resolve
from .runner import run_bench
from .tables import Row, format_table, machine_info, versions, write_outputs

__all__ = [
    "BUILTIN", "DEFAULT_METHODS", "HEAVY", "LABELS", "PEERS", "Context", "Method", "Output", "Row",
    "attribution_from_acts", "floor_pass", "format_table", "head_sample", "losses_from_logits", "machine_info",
    "measure_memory_here", "measure_memory_subprocess", "nnsight_attribution", "o_proj_modules", "resolve",
    "run_ablate_batched", "run_ablate_sequential", "run_bench", "run_floor", "run_hooks_attribution", "run_taylor",
    "sampled_ablation", "sampled_batched", "timed_head_sweep", "tl_ablation", "tl_attribution", "unavailable",
    "versions", "worker_args", "worker_main", "write_outputs",
]
