"""Per-task greedy exact-match accuracy and mean target loss of a causal LM on a task file.

    python scripts/check_builtin_suite.py [--model smollm2-135m] [--suite headscore/data/builtin_suite.jsonl]
                                          [--show-wrong]

For each example the prompt and the target are tokenised separately and joined (the target's leading space
belongs to the target). Greedy decoding runs for len(target tokens) + 2 new tokens; an example counts as right
when the decoded continuation, stripped, starts with the stripped target. The loss is the mean negative
log-likelihood of the target tokens given the prompt. Plain text prompts, no chat template.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

import headscore

DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "headscore" / "data" / "builtin_suite.jsonl"
TASKS = ("Retrieval", "Knowledge Recall", "Logical Reasoning", "Decision-making", "Semantic Understanding",
         "Syntactic Understanding", "Inference", "Math Calculation")


def load_suite(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        for key in ("prompt", "target", "task"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"{path}:{n}: field {key!r} must be a non-empty string")
        rows.append(row)
    return rows


def prompt_ids(tok, prompt: str) -> list[int]:
    return tok(prompt)["input_ids"]  # with BOS if the tokenizer adds one


def target_ids(tok, target: str) -> list[int]:
    return tok(target, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def score(model, tok, prompt: str, target: str) -> tuple[str, float]:
    p, t = prompt_ids(tok, prompt), target_ids(tok, target)
    ids = torch.tensor([p + t])
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(p) - 1:-1], dim=-1)
    nll = -logp[torch.arange(len(t)), torch.tensor(t)].mean().item()
    pid = torch.tensor([p])
    out = model.generate(input_ids=pid, attention_mask=torch.ones_like(pid), max_new_tokens=len(t) + 2,
                         do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, len(p):], skip_special_tokens=True), nll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m",
                    help="a name for headscore.load_model: the embedded model, a local directory or a cached hub id")
    ap.add_argument("--suite", type=Path, default=DEFAULT_SUITE)
    ap.add_argument("--show-wrong", action="store_true", help="print the examples answered wrongly")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = load_suite(args.suite)
    unknown = sorted({r["task"] for r in rows} - set(TASKS))
    if unknown:
        print(f"warning: tasks not among the eight CogQA functions: {unknown}")
    lm = headscore.load_model(args.model)
    tok, model = lm.tokenizer, lm.model

    total, right, nll = defaultdict(int), defaultdict(int), defaultdict(float)
    max_len = 0
    for r in rows:
        got, loss = score(model, tok, r["prompt"], r["target"])
        max_len = max(max_len, len(prompt_ids(tok, r["prompt"])))
        ok = got.strip().startswith(r["target"].strip())
        total[r["task"]] += 1
        right[r["task"]] += ok
        nll[r["task"]] += loss
        if args.show_wrong and not ok:
            print(f"WRONG [{r['task']}] {r['prompt'][-70:]!r} -> {got!r} (want {r['target']!r}, nll {loss:.2f})")

    order = [t for t in TASKS if t in total] + sorted(set(total) - set(TASKS))
    print(f"{'task':<26}{'n':>5}{'accuracy':>10}{'mean NLL':>10}")
    for task in order:
        print(f"{task:<26}{total[task]:>5}{right[task] / total[task]:>10.2f}{nll[task] / total[task]:>10.3f}")
    n = sum(total.values())
    print(f"{'all':<26}{n:>5}{sum(right.values()) / n:>10.2f}{sum(nll.values()) / n:>10.3f}")
    print(f"longest prompt: {max_len} tokens")


if __name__ == "__main__":
    main()
