"""pytest-benchmark: one-pass scoring vs sequential and batched ablation on a small random Llama.

    .venv/bin/python -m pytest benchmarks/test_bench_engine.py --benchmark-only
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import random_examples, tiny_model  # noqa: E402

import headscore  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    lm = tiny_model("llama", layers=8, heads=8, kv_heads=2, head_dim=16)
    return lm, random_examples(16)


@pytest.mark.parametrize("method", ["taylor", "atp-mean"])
def test_score(benchmark, setup, method):
    lm, examples = setup
    benchmark(headscore.score, lm, examples, method=method, batch_size=8, progress=False)


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_ablate(benchmark, setup, mode):
    lm, examples = setup
    benchmark.pedantic(headscore.ablate, args=(lm, examples), kwargs=dict(mode=mode, batch_size=8, progress=False),
                       rounds=3, iterations=1)
