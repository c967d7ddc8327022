"""What ``headscore.track`` costs inside a training loop: AdamW fine-tuning with and without tracking.

The embedded SmolLM2-135M (``headscore.load_model()``) is fine-tuned with AdamW (lr 1e-5) on the built-in
suite's text (each example's prompt + target as one sequence, the plain causal-LM loss over its tokens,
right-padded batches), in a fixed shuffled order. One training step is forward, ``loss.backward()``,
``optimizer.step()`` and ``zero_grad()``; a tracked step runs the same inside ``with headscore.track(model)``
(as in docs/training.md), so it includes everything the tracker does per step (the gate tensor and its
hook, folding the previous step's gate gradient into the float64 sums, the EMA step).

Time: after ``--warmup`` untimed steps in each mode, ``--rounds`` rounds each run one block of
``--steps / --rounds`` steps tracked and one plain, on the *same* batches (in the same order), the block
order alternating from round to round (tracked first in even rounds), so drift and a shared machine's
noise hit both. Both modes train the one model and optimizer (tracking does not change training: the
tests check it bitwise). Each step is timed on its own (CUDA synchronised); the headline ratio is the
median over steps of tracked / plain for the same batch, with a 95% bootstrap interval; the mean per-step
ratio, the ratio of median step times and the median per-round ratio of block totals are reported beside it.

Memory: each mode in its own fresh worker process (this script with ``--memory-worker``, run like
``headscore bench``'s memory worker: glibc malloc told to map blocks of 64 KiB or more on their own and
to keep one arena, :data:`headscore.bench.memory.MALLOC_ENV`): load the model, ``--warmup`` steps
(page in the weights, create AdamW's state), then the peak over ``--memory-steps`` steps, read by
:func:`headscore.bench.measure_memory_here`: on the CPU the RSS high-water mark (``VmHWM``) of the whole
process and its rise above the trained state held before the steps (weights and AdamW state), on CUDA
``torch.cuda.max_memory_allocated`` the same two ways.

Targets (issue 23, part 5): tracked / plain <= 1.03x time and <= 1.02x peak memory (the whole process's).

The full run in benchmarks/RESULTS.md (40 minutes of wall time; one torch thread: on 2 CPU cores shared with
other jobs, two threads ran a step 4x slower than one; on a quiet machine drop ``--threads 1``):

    nice -n 5 .venv/bin/python benchmarks/track_cost.py --steps 100 --rounds 10 --batch-size 8 --threads 1 \\
        --out benchmarks/results/track-cost

Writes ``track_cost.json`` (every step time, the memory figures, machine and versions) and
``track_cost.md`` (the table) into ``--out``, which is checked for writability before the model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import headscore
from headscore.bench import Context, machine_info, measure_memory_here
from headscore.bench.memory import MALLOC_ENV, MARKER, _proc_status
from headscore.data.tasks import load_tasks
from headscore.errors import HeadscoreError
from headscore.output_files import atomic_write
from headscore.output_paths import OutputDir, check_outputs
from headscore.results import library_versions

MODES = ("plain", "tracked")
TARGETS = {"time": 1.03, "memory": 1.02}
LR = 1e-5
SEED = 0
FILES = ("track_cost.json", "track_cost.md")


# ----- data and the training step ---------------------------------------------------------------------------
def training_batches(lm, batch_size: int, count: int, device: str) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of the built-in suite's prompt + target texts, in a seeded shuffled order (a new
    permutation each pass over the suite), tokenised and right-padded; labels -100 on padding."""
    texts = [e.prompt + e.target for e in load_tasks("builtin")]
    tok = lm.tokenizer
    pad = next((i for i in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)) if i is not None),
               0)
    g = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    while len(order) < count * batch_size:
        order += torch.randperm(len(texts), generator=g).tolist()
    batches = []
    for i in range(count):
        ids = [tok(texts[j])["input_ids"] for j in order[i * batch_size:(i + 1) * batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        batches.append({"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                        "labels": input_ids.masked_fill(mask == 0, -100).to(device)})
    return batches


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    """One fine-tuning step: forward, backward, AdamW step, gradients cleared (set to None)."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(model, optimizer, batches, device, bar) -> tuple[list[float], list[float]]:
    """Wall seconds and loss of each step over ``batches``."""
    times, losses = [], []
    for batch in batches:
        _sync(device)
        start = time.perf_counter()
        loss = train_step(model, optimizer, batch)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
        bar.update(1)
    return times, losses


def mode_context(mode: str, model: torch.nn.Module):
    """``headscore.track(model)`` for the tracked mode, nothing for the plain one."""
    return headscore.track(model) if mode == "tracked" else contextlib.nullcontext()


def _blocks(steps: int, rounds: int) -> list[tuple[int, int]]:
    edges = [round(r * steps / rounds) for r in range(rounds + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


# ----- memory: one fresh worker per mode ----------------------------------------------------------------------
def memory_worker(mode: str, args: dict) -> None:
    """Load the model, train ``warmup`` steps in ``mode``, then print the peak over ``memory_steps`` more as one
    ``HEADSCORE_MEMORY {json}`` line: the whole process's and its rise above the trained state before them."""
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    lm = headscore.load_model(args["model"], device=args["device"], dtype=args["dtype"], progress=False)
    model = lm.model.train()
    batches = training_batches(lm, args["batch_size"], args["warmup"] + args["memory_steps"], args["device"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    warm, measured = batches[:args["warmup"]], batches[args["warmup"]:]
    with mode_context(mode, model):
        for batch in warm:  # pages in the weights, creates AdamW's state: the trained state the peak is above
            train_step(model, optimizer, batch)

        def run(_ctx):
            for batch in measured:
                train_step(model, optimizer, batch)

        step_mib, how = measure_memory_here(run, Context(lm, [], args["batch_size"]))
        if lm.device.type == "cuda":
            total = torch.cuda.max_memory_allocated(lm.device) / 2**20
        else:
            total = _proc_status("VmHWM")
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        how += ", malloc: mmap from 64 KiB, one arena"
    print(MARKER + json.dumps({"peak_mib": total, "step_peak_mib": step_mib, "how": how}), flush=True)


def worker_command(mode: str, settings: dict) -> list[str]:
    """The command line of the memory worker of ``mode`` (``settings``: what :func:`memory_worker` reads)."""
    return [sys.executable, str(Path(__file__).resolve()), "--memory-worker", mode, "--worker-args",
            json.dumps(settings)]


def read_worker(stdout: str, stderr: str) -> dict:
    """A memory worker's figures from its output, or None figures and why."""
    line = next((x for x in reversed(stdout.splitlines()) if x.startswith(MARKER)), None)
    if line is None:
        tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
        return {"peak_mib": None, "step_peak_mib": None, "how": f"memory worker failed: {tail[0]}"}
    return json.loads(line[len(MARKER):])


def measure_memory(settings: dict, timeout: float = 1800) -> dict[str, dict]:
    """Peak memory of each mode, from one fresh worker process per mode (run side by side: each reads its
    own process's peak), with malloc set up as for ``headscore bench``'s workers."""
    procs = {mode: subprocess.Popen(worker_command(mode, settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env={**MALLOC_ENV, **os.environ}) for mode in MODES}
    out = {}
    for mode, proc in procs.items():
        try:
            out[mode] = read_worker(*proc.communicate(timeout=timeout))
            out[mode]["how"] += " (fresh subprocess)"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            out[mode] = {"peak_mib": None, "step_peak_mib": None, "how": f"worker timed out after {timeout:.0f}s"}
    return out


# ----- the run ------------------------------------------------------------------------------------------------
def time_summary(plain: list[float], tracked: list[float], blocks: list[tuple[int, int]],
                 resamples: int = 2000) -> dict:
    """Step-time ratios tracked / plain: the median over steps of the per-step ratio (same batch) with its
    interquartile range and a 95% bootstrap interval (seeded), the mean per-step ratio, the ratio of the
    median step times and the median per-round ratio of block totals; the step times themselves."""
    paired = [t / p for t, p in zip(tracked, plain, strict=True)]
    q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
    rng = random.Random(SEED)
    boot = sorted(statistics.median(rng.choices(paired, k=len(paired))) for _ in range(resamples))
    per_round = [sum(tracked[lo:hi]) / sum(plain[lo:hi]) for lo, hi in blocks]
    median_plain, median_tracked = statistics.median(plain), statistics.median(tracked)
    return {"ratio": statistics.median(paired), "ratio_q1": q1, "ratio_q3": q3,
            "ratio_ci95": [boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]],
            "ratio_mean": statistics.mean(paired), "ratio_of_medians": median_tracked / median_plain,
            "ratio_per_round": statistics.median(per_round), "plain_median_s": median_plain,
            "tracked_median_s": median_tracked, "per_round_ratios": per_round, "plain_s": plain, "tracked_s": tracked}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(doc: dict) -> str:
    """The results as a Markdown table (plus one line saying what was run where)."""
    t, m = doc["time"], doc["memory"]
    target = {"time": f"<= {TARGETS['time']:.2f}x", "memory": f"<= {TARGETS['memory']:.2f}x"}

    def met(key: str) -> str:
        return {True: "met", False: "**not met**", None: "-"}[doc["met"][key]]

    mach = doc["machine"]
    lines = [
        f"{doc['model']}, {doc['device']} ({mach['cpu']}, {mach['torch_threads']} torch threads), {doc['dtype']}, "
        f"AdamW, batch {doc['batch_size']}, {doc['steps']} timed steps per mode in {doc['rounds']} interleaved "
        f"rounds (mean {doc['tokens_per_step']:.0f} tokens per step incl. padding), {doc['wall_s']:.0f} s wall.",
        "",
        "| | plain | tracked | tracked / plain | target |",
        "|---|---:|---:|---:|---|",
        f"| step time, median (s) | {t['plain_median_s']:.4f} | {t['tracked_median_s']:.4f} | "
        f"**{t['ratio']:.3f}x** (median per-step ratio, 95% CI {t['ratio_ci95'][0]:.3f}-{t['ratio_ci95'][1]:.3f}; "
        f"IQR {t['ratio_q1']:.3f}-{t['ratio_q3']:.3f}) | {target['time']}: {met('time')} |",
        f"| step time: mean per-step ratio / ratio of medians / median per-round ratio | | | "
        f"{t['ratio_mean']:.3f}x / {t['ratio_of_medians']:.3f}x / {t['ratio_per_round']:.3f}x | |",
        f"| peak memory, whole process (MiB) | {_fmt(m['plain']['peak_mib'], '.0f')} | "
        f"{_fmt(m['tracked']['peak_mib'], '.0f')} | **{_fmt(m['ratio'], '.3f')}x** | {target['memory']}: "
        f"{met('memory')} |",
        f"| peak memory above the trained state (MiB) | {_fmt(m['plain']['step_peak_mib'], '.0f')} | "
        f"{_fmt(m['tracked']['step_peak_mib'], '.0f')} | {_fmt(m['step_ratio'], '.3f')}x | |",
        "",
        f"Memory: a fresh worker process per mode, the peak over {m['steps_measured']} steps after {doc['warmup']} "
        f"warm-up steps: the whole process's (weights, AdamW state, activations, gradients) and its rise above the "
        f"trained state held before those steps; read as {m['tracked']['how']}.",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, command: str) -> dict:
    started = time.perf_counter()
    device = torch.device(args.device)
    lm = headscore.load_model(args.model, device=args.device, dtype=args.dtype, progress=not args.no_progress)
    model = lm.model.train()
    batches = training_batches(lm, args.batch_size, args.warmup + args.steps, args.device)
    warm, timed = batches[:args.warmup], batches[args.warmup:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    times: dict[str, list[float]] = {mode: [0.0] * args.steps for mode in MODES}
    losses: dict[str, list[float]] = {mode: [0.0] * args.steps for mode in MODES}
    tracked_forwards = 0
    bar = tqdm(total=2 * (args.warmup + args.steps), desc="track cost", unit="step", disable=args.no_progress,
               leave=False)
    with bar:
        for mode in MODES:  # warm-up: first calls, AdamW's state
            bar.set_postfix_str(f"warm-up, {mode}")
            with mode_context(mode, model):
                timed_steps(model, optimizer, warm, device, bar)
        for r, (lo, hi) in enumerate(_blocks(args.steps, args.rounds)):
            for mode in (MODES[::-1] if r % 2 == 0 else MODES):
                bar.set_postfix_str(f"round {r + 1}/{args.rounds}, {mode}")
                with mode_context(mode, model) as tracker:
                    times[mode][lo:hi], losses[mode][lo:hi] = timed_steps(model, optimizer, timed[lo:hi], device, bar)
                    if tracker is not None:
                        tracker.flush()
                        tracked_forwards += tracker.forwards
    if tracked_forwards != args.steps:
        raise RuntimeError(f"the tracker counted {tracked_forwards} forward passes of {args.steps} tracked steps")

    settings = {"model": args.model, "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
                "warmup": args.warmup, "memory_steps": args.memory_steps, "threads": torch.get_num_threads()}
    memory = measure_memory(settings)

    time_doc = time_summary(times["plain"], times["tracked"], _blocks(args.steps, args.rounds))
    mem_doc = {**memory, "ratio": _ratio(memory["tracked"]["peak_mib"], memory["plain"]["peak_mib"]),
               "step_ratio": _ratio(memory["tracked"]["step_peak_mib"], memory["plain"]["step_peak_mib"]),
               "steps_measured": args.memory_steps}
    tokens = [int(b["input_ids"].numel()) for b in timed]
    doc = {
        "model": lm.name, "device": str(device), "dtype": args.dtype, "batch_size": args.batch_size,
        "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "lr": LR, "optimizer": "AdamW",
        "data": "builtin suite, prompt + target, causal-LM loss", "tokens_per_step": statistics.mean(tokens),
        "time": time_doc, "memory": mem_doc, "targets": TARGETS,
        "met": {"time": time_doc["ratio"] <= TARGETS["time"],
                "memory": None if mem_doc["ratio"] is None else mem_doc["ratio"] <= TARGETS["memory"]},
        "loss": {"first": losses["plain"][0], "last": losses["plain"][-1]},
        "machine": machine_info(), "versions": library_versions(), "command": command,
        "wall_s": time.perf_counter() - started,
    }
    return doc


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=headscore.DEFAULT_MODEL, help="model to fine-tune (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="timed steps per mode (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds the steps are split into")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (and in each memory worker)")
    p.add_argument("--memory-steps", type=int, default=3, help="steps over which a memory worker reads its peak")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", required=True, help="directory for track_cost.json and track_cost.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("steps", "rounds", "batch_size", "memory_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.steps < args.rounds:
        p.error(f"--steps ({args.steps}) must be at least --rounds ({args.rounds})")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--memory-worker"]:  # ``--memory-worker MODE --worker-args JSON``: see measure_memory
        worker = argparse.ArgumentParser(prog="track_cost.py --memory-worker")
        worker.add_argument("--memory-worker", choices=MODES, required=True)
        worker.add_argument("--worker-args", required=True)
        wargs = worker.parse_args(argv)
        memory_worker(wargs.memory_worker, json.loads(wargs.worker_args))
        return 0
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        check_outputs(dirs=[OutputDir("--out", out, FILES)])
        doc = run(args, shlex.join(["python", "benchmarks/track_cost.py", *argv]))
    except HeadscoreError as exc:
        print(f"track_cost: {exc}", file=sys.stderr)
        return 2
    table = markdown(doc)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / FILES[0], json.dumps(doc, indent=1).encode())
    atomic_write(out / FILES[1], table.encode())
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
