"""What the tracker reads on every forward pass besides the gates: the model's checkpointing mode (all of its
modules, or only those that can checkpoint, found once) and the finiteness of a step's gate gradient.

    .venv/bin/python benchmarks/track_bookkeeping.py [--model smollm2-135m] [--calls 200]
"""

from __future__ import annotations

import argparse
import time

import torch

import headscore
from headscore import compat


def per_call_ms(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = headscore.load_model(args.model, progress=False).model.train()
    found = compat.checkpointing_modules(model)
    grad = torch.ones(8, model.config.num_hidden_layers, model.config.num_attention_heads)
    rows = [
        (f"checkpointing mode, every module ({sum(1 for _ in model.modules())})",
         per_call_ms(lambda: compat.activation_checkpointing(model), args.calls)),
        (f"checkpointing mode, the {len(found)} modules found once",
         per_call_ms(lambda: compat.activation_checkpointing(model, found), args.calls)),
        (f"finite gate gradient {list(grad.shape)}", per_call_ms(lambda: bool(torch.isfinite(grad).all()), args.calls)),
    ]
    for label, ms in rows:
        print(f"{label}: {ms:.3f} ms per forward pass")


if __name__ == "__main__":
    main()
