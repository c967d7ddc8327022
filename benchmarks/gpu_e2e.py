"""GPU end to end: all-head taylor scoring vs the plain forward+backward and vs ablation, LLaMA-7B shape.

A random-weight Llama with LLaMA-7B's layer shape (hidden 4096, 32 heads of 128, MLP 11008, vocab 32000),
``--layers`` layers, bf16, SDPA attention, random token examples of ``--seq-len`` tokens. Times (median of
``--repeats`` after one warm-up) and peak memory above the weights, for:

  * floor            the plain forward + backward (loss on the target tokens, gradient to the inputs only)
  * taylor kernel=on   headscore.score, fused Triton gated attention
  * taylor kernel=off  headscore.score, the model's own SDPA attention with the gate around it
  * ablation, batched    headscore.ablate (all heads), timed once
  * ablation, sequential one forward per head, timed on ``--sample-heads`` heads and extrapolated

Also checks that kernel on and off give the same scores (Spearman per task) and that the GPU scores of a
small float32 model equal its CPU scores (SmolLM2's: benchmarks/gpu_smollm2.py). With 32 layers the model
is LLaMA-7B's whole 32 x 32 heads; ``--ablation-sample`` then extrapolates batched ablation from the head
sample too, as sequential ablation always is.

    python benchmarks/gpu_e2e.py --layers 32 --ablation-sample --out benchmarks/results/gpu_e2e.json

Needs a CUDA GPU (``--smoke``: tiny shapes on a CPU, the kernel through Triton's interpreter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import examples  # noqa: E402  (benchmarks/scaling.py: random-letter examples)
from tiny import ByteTokenizer  # noqa: E402

import headscore  # noqa: E402
from headscore import bench  # noqa: E402
from headscore.compare import spearman  # noqa: E402
from headscore.models import LoadedModel  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def llama(layers: int, *, hidden: int = 4096, heads: int = 32, kv_heads: int = 32, head_dim: int = 128,
          mlp: int = 11008, vocab: int = 32000, dtype=torch.bfloat16, device=DEVICE, seed: int = 0) -> LoadedModel:
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   head_dim=head_dim, max_position_embeddings=16384, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
    return LoadedModel(model, ByteTokenizer(), f"random-llama-{layers}x{heads}-h{hidden}")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0


def reset_peak() -> int:
    """Reset the peak counter; the bytes allocated now."""
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    return allocated()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if CUDA else 0


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(median seconds, peak bytes above the start, last result) over repeats after one warm-up."""
    fn()
    sync()
    times = []
    base = reset_peak()
    out = None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak_bytes() - base, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sample-heads", type=int, default=16)
    p.add_argument("--rows-per-pass", type=int, default=16)
    p.add_argument("--skip-batched-ablation", action="store_true")
    p.add_argument("--ablation-sample", action="store_true",
                   help="batched ablation of the head sample, extrapolated (for 32 layers, where all heads take long)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, also on a CPU (checks the script runs)")
    p.add_argument("--out", default="benchmarks/results/gpu_e2e.json")
    args = p.parse_args(argv)
    if not CUDA and not args.smoke:
        print("gpu_e2e.py needs a CUDA GPU (or --smoke); nothing was measured.", file=sys.stderr)
        return 2
    shape = dict(hidden=64, heads=4, kv_heads=4, head_dim=16, mlp=128, vocab=96) if args.smoke else {}
    res: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
                 "transformers": transformers.__version__, "args": vars(args)}
    lm = llama(args.layers, **shape)
    exs = examples(args.examples, args.seq_len)
    L, H = args.layers, shape.get("heads", 32)
    weights = allocated()
    res["weights_gib"] = weights / 2**30
    rows = {}

    def record(name, sec, peak, note=""):
        rows[name] = {"seconds": sec, "peak_gib_above_weights": peak / 2**30, "note": note}
        print(f"  {name:<34} {sec:9.4f} s  peak {peak / 2**30:7.2f} GiB  {note}", flush=True)

    print(f"{res['device']} | torch {torch.__version__} | {L} layers x {H} heads, T={args.seq_len}, "
          f"{args.examples} examples, batch {args.batch_size}", flush=True)
    ctx = bench.Context(lm, exs, batch_size=args.batch_size, sample_heads=args.sample_heads)
    sec, peak, _ = timed(lambda: bench.run_floor(ctx), args.repeats)  # same loss as taylor, input grads only
    record("floor (fwd+bwd, input grads)", sec, peak)
    scores = {}
    for kernel in (True, False):
        def run(kernel=kernel):
            return headscore.score(lm, exs, method="taylor", batch_size=args.batch_size, progress=False,
                                   kernel=kernel)
        sec, peak, scores[kernel] = timed(run, args.repeats)
        record(f"taylor kernel={'on' if kernel else 'off'}", sec, peak)
    agree = {t: spearman(scores[True].values[i].flatten(), scores[False].values[i].flatten())
             for i, t in enumerate(scores[True].tasks)}
    diff = (scores[True].values - scores[False].values).abs().max().item()
    scale = scores[False].values.abs().max().item()
    res["kernel_on_vs_off"] = {"spearman": agree, "max_abs_diff": diff, "max_abs": scale}
    print(f"  kernel on vs off: spearman {agree}, max |diff| {diff:.3g} of max |score| {scale:.3g}", flush=True)

    base = reset_peak()
    out = bench.sampled_ablation(ctx, "sequential")  # the bench's head sample and extrapolation
    sync()
    record("ablation sequential (extrapolated)", out.seconds, peak_bytes() - base, out.note)
    if args.ablation_sample:
        base = reset_peak()
        out = bench.sampled_ablation(ctx, "prefix")
        sync()
        record("ablation batched (extrapolated)", out.seconds, peak_bytes() - base, out.note)
    elif not args.skip_batched_ablation:
        t = time.perf_counter()
        base = reset_peak()
        headscore.ablate(lm, exs, mode="batched", batch_size=args.batch_size, rows_per_pass=args.rows_per_pass,
                         progress=False)
        sync()
        record("ablation batched (all heads, once)", time.perf_counter() - t, peak_bytes() - base)
    res["rows"] = rows
    fl = rows["floor (fwd+bwd, input grads)"]
    for k in ("taylor kernel=on", "taylor kernel=off"):
        rows[k]["x_floor_time"] = rows[k]["seconds"] / fl["seconds"]
        rows[k]["x_floor_peak"] = rows[k]["peak_gib_above_weights"] / max(fl["peak_gib_above_weights"], 1e-9)
    best = min(rows["taylor kernel=on"]["seconds"], rows["taylor kernel=off"]["seconds"])
    res["sequential_over_taylor"] = rows["ablation sequential (extrapolated)"]["seconds"] / best
    ratios = {k: {kk: v[kk] for kk in v if kk.startswith("x_")} for k, v in rows.items() if "x_floor_time" in v}
    print(f"  vs floor: {json.dumps(ratios)}")
    print(f"  sequential ablation / best taylor: {res['sequential_over_taylor']:.1f}x at {L * H} heads"
          + (" (target >= 400x at 32 x 32)" if L * H == 1024 else ""), flush=True)

    # CPU vs GPU: a small float32 model scores the same on both devices
    small_cpu = llama(2, hidden=256, heads=8, kv_heads=4, head_dim=32, mlp=512, vocab=96, dtype=torch.float32,
                      device="cpu", seed=1)
    small_exs = examples(8, 64, seed=1)
    cpu = headscore.score(small_cpu, small_exs, progress=False, kernel=False)
    if not CUDA:
        print("  (no GPU: CPU vs GPU comparison skipped)")
        gpu = {}
    else:
        small_gpu = LoadedModel(small_cpu.model.to("cuda"), small_cpu.tokenizer, small_cpu.name)
        gpu = {k: headscore.score(small_gpu, small_exs, progress=False, kernel=k) for k in (False, True)}
    res["cpu_vs_gpu"] = {}
    for k, g in gpu.items():
        rho = {t: spearman(cpu.values[i].flatten(), g.values[i].flatten()) for i, t in enumerate(cpu.tasks)}
        d = (cpu.values - g.values).abs().max().item()
        res["cpu_vs_gpu"][f"kernel={'on' if k else 'off'}"] = {"spearman": rho, "max_abs_diff": d,
                                                                "max_abs": cpu.values.abs().max().item()}
        print(f"  CPU vs GPU (fp32 small model, kernel={'on' if k else 'off'}): spearman {rho}, max |diff| {d:.3g}",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
