"""Learn a sparse set of attention heads of SmolLM2-135M with hard-concrete L0 gates, on the CPU.

    python examples/learn_gates.py                  # 60 steps, 6 examples per task of the built-in suite
    python examples/learn_gates.py --steps 200 --max-examples 0 --out mask.pt   # longer, all examples

Trains one gate per head (model weights frozen), then prints how many heads the learned
mask keeps and the mean target loss over the examples with and without the mask.
"""

from __future__ import annotations

import argparse
import time

import torch

import headscore
from headscore.learn_gates import learn_gates


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="builtin", help="'builtin' or a JSONL file of prompt/target/task")
    p.add_argument("--max-examples", type=int, default=6, help="at most this many examples per task (0: all)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--sparsity", type=float, default=20.0, help="weight of E[L0] / number of heads")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="save the mask and log_alpha here (torch.save)")
    args = p.parse_args(argv)
    args.max_examples = args.max_examples or None
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    lm = headscore.load_model(args.model)
    if args.tasks == "builtin":
        examples = headscore.builtin_suite()
    else:
        examples = headscore.load_jsonl(args.tasks)
    result = learn_gates(lm, examples, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         sparsity=args.sparsity, max_examples=args.max_examples, seed=args.seed, progress=False)
    for row in result.history[:: max(1, len(result.history) // 8)]:
        print(f"step {row['step']:4d}  loss {row['loss']:.4f}  expected open heads {row['expected_l0']:.1f}")
    print(f"kept heads: {result.kept} / {result.num_heads}")  # the model's real heads (hybrid layers have none)
    print(f"loss without mask: {result.loss_full:.6f}")
    print(f"loss with mask:    {result.loss_masked:.6f}")
    print(f"change:            {result.loss_change:+.6f}")
    print(f"training {result.seconds:.1f}s, total {time.perf_counter() - start:.1f}s")
    if args.out:
        torch.save({"mask": result.mask, "log_alpha": result.log_alpha}, args.out)
    return {"result": result, "examples": examples, "lm": lm, "max_examples": args.max_examples,
            "batch_size": args.batch_size}


if __name__ == "__main__":
    main()
