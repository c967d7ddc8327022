"""Scaling curves: cost of all-head scoring vs ablation as heads, sequence length and batch size grow.

Random-weight Llama configs (head_dim 8, so 32 x 32 heads fits a CPU), byte tokenizer, fixed-length
examples. Every point is the median of ``--repeats`` interleaved rounds after one warm-up round.
Ablation sweeps over more than ``--sample-heads`` heads are timed on an evenly spaced head sample
and extrapolated to all L*H heads (``extrapolated`` = 1 in the CSV, hollow markers in the plot).

    .venv/bin/python benchmarks/scaling.py --out benchmarks/results/scaling
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import ByteTokenizer  # noqa: E402

from headscore import bench  # noqa: E402
from headscore.data.examples import Example  # noqa: E402
from headscore.models import LoadedModel  # noqa: E402

METHODS = ("floor", "taylor", "ablate-batched", "ablate-sequential")
COLORS = {"floor": "black", "taylor": "tab:green", "ablate-batched": "tab:blue", "ablate-sequential": "tab:red"}
NAMES = {"floor": "forward+backward floor", "taylor": "headscore taylor (one pass)",
         "ablate-batched": "ablation, batched", "ablate-sequential": "ablation, sequential"}


def llama(layers: int, heads: int, head_dim: int = 8, seed: int = 0) -> LoadedModel:
    """A random Llama with ``layers`` x ``heads`` heads of ``head_dim`` (GQA off)."""
    hidden = heads * head_dim
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   head_dim=head_dim, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    return LoadedModel(model, ByteTokenizer(), f"random-llama-{layers}x{heads}")


def examples(n: int, length: int, seed: int = 0) -> list[Example]:
    """``n`` examples of ``length`` tokens (BOS + prompt + 2 target tokens), two tasks."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    out = []
    for i in range(n):
        ids = torch.randint(0, len(letters), (length - 1,), generator=g).tolist()
        text = "".join(letters[j] for j in ids)
        out.append(Example(text[:-2], text[-2:], ("a", "b")[i % 2]))
    return out


def point(lm: LoadedModel, n: int, length: int, batch: int, sample: int, repeats: int) -> list[dict]:
    """Time every method on one configuration; one row per method."""
    ctx = bench.Context(lm, examples(n, length), batch_size=batch, rows_per_pass=64, sample_heads=sample,
                        full_ablation=False)
    fns = {m: bench.BUILTIN[m] for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    notes: dict[str, str] = {}
    for r in range(repeats + 1):  # round 0 is the warm-up
        for m, fn in fns.items():
            start = time.perf_counter()
            out = fn(ctx)
            t = out.seconds if out.seconds is not None else time.perf_counter() - start
            notes[m] = out.note
            if r:
                times[m].append(t)
    heads = ctx.num_heads_total
    return [{"model": lm.name, "heads": heads, "seq_len": length, "batch": batch, "examples": n, "method": m,
             "seconds": statistics.median(times[m]), "extrapolated": int("extrapolated" in notes[m]),
             "note": notes[m], "times": " ".join(f"{t:.4f}" for t in times[m])} for m in METHODS]


def plot(rows: list[dict], path: Path, meta: str) -> None:
    import matplotlib  # here, not at the top: the backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    sweeps = [("heads", "heads (L x H)", "heads", axes[0, 0], False),
              ("heads", "heads (L x H)", "heads", axes[0, 1], True),
              ("seq_len", "sequence length (tokens)", "seq", axes[1, 0], False),
              ("batch", "batch size (examples per pass)", "batch", axes[1, 1], False)]
    for key, xlabel, sweep, ax, ratio in sweeps:
        sub = [r for r in rows if r["sweep"] == sweep]
        floor = {r[key]: r["seconds"] for r in sub if r["method"] == "floor"}
        for m in METHODS:
            pts = sorted((r[key], r["seconds"] / (floor[r[key]] if ratio else 1), r["extrapolated"])
                         for r in sub if r["method"] == m)
            if not pts:
                continue
            xs, ys, ex = zip(*pts, strict=True)
            ax.plot(xs, ys, "-", color=COLORS[m], label=NAMES[m])
            ax.scatter([x for x, _, e in pts if not e], [y for _, y, e in pts if not e], color=COLORS[m], zorder=3)
            ax.scatter([x for x, _, e in pts if e], [y for _, y, e in pts if e], facecolors="white",
                       edgecolors=COLORS[m], zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel, fontsize=11)
        ax.set_ylabel("time / floor time" if ratio else "wall seconds (median)", fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9)
    axes[0, 0].set_title("cost vs number of heads (4x4 ... 32x32)")
    axes[0, 1].set_title("same, relative to forward+backward floor")
    axes[1, 0].set_title("cost vs sequence length (8x8 heads)")
    axes[1, 1].set_title("cost vs batch size (8x8 heads)")
    fig.suptitle("headscore scaling (hollow markers: ablation extrapolated from a head sample)\n" + meta, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/scaling")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sample-heads", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="fewer points (smoke test)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(4, 4), (8, 8), (16, 16), (32, 32)] if not args.quick else [(4, 4), (8, 8)]
    lengths = [16, 32, 64, 128, 256] if not args.quick else [16, 32]
    batches = [1, 2, 4, 8, 16] if not args.quick else [1, 4]
    rows = []
    for layers, heads in shapes:
        print(f"heads {layers}x{heads}", flush=True)
        rows += [{**r, "sweep": "heads"} for r in point(llama(layers, heads), 8, 32, 8, args.sample_heads,
                                                         args.repeats)]
    base = llama(8, 8)
    for length in lengths:
        print(f"seq {length}", flush=True)
        rows += [{**r, "sweep": "seq"} for r in point(base, 8, length, 8, args.sample_heads, args.repeats)]
    for b in batches:
        print(f"batch {b}", flush=True)
        rows += [{**r, "sweep": "batch"} for r in point(base, 16, 32, b, args.sample_heads, args.repeats)]
    info = bench.machine_info()
    meta = (f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, load {info['loadavg']}; "
            f"torch {torch.__version__}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    doc = {"machine": info, "versions": bench.versions(), "command": " ".join(["python", *sys.argv]),
           "loadavg_end": list(os.getloadavg()), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    plot(rows, out.with_suffix(".png"), meta)
    print(f"wrote {out.with_suffix('.csv')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
