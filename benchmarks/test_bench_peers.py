"""pytest-benchmark: headscore all-head scoring vs the floor, hook-based attribution and the peers.

Same model, data and device for every benchmark. The peers (nnsight, TransformerLens) are skipped
with the reason when they are not installed or cannot load the model:

    .venv/bin/python -m pytest benchmarks/test_bench_peers.py --benchmark-only            # no peers
    /work/peers-venv/bin/python -m pytest benchmarks/test_bench_peers.py --benchmark-only # with peers
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import random_examples, tiny_model  # noqa: E402

from headscore import bench  # noqa: E402


@pytest.fixture(scope="module")
def ctx():
    lm = tiny_model("llama", layers=8, heads=8, kv_heads=2, head_dim=16)
    # every head in every row: pytest-benchmark times the call, and a sampled sweep's call is a part of the
    # work (its Output.seconds, the extrapolation, would be ignored: ablation looked about 7x cheaper)
    return bench.Context(lm, random_examples(16), batch_size=8, sample_heads=None, full_ablation=True)


@pytest.mark.parametrize("method", ["floor", "taylor", "hooks-attribution", "ablate-batched", "ablate-sequential"])
def test_builtin(benchmark, ctx, method):
    fn = bench.BUILTIN[method]
    benchmark.pedantic(fn, args=(ctx,), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("method", ["nnsight-attribution", "tl-attribution", "tl-ablation"])
def test_peer(benchmark, ctx, method):
    reason = bench.unavailable(method)
    if reason:
        pytest.skip(reason)
    fn = bench.PEERS[method]
    try:
        fn.setup(ctx)
    except Exception as exc:  # noqa: BLE001 - e.g. TransformerLens cannot boot a model without an HF tokenizer
        pytest.skip(f"{method} cannot load this model: {type(exc).__name__}: {exc}")
    benchmark.pedantic(fn, args=(ctx,), rounds=5, iterations=1, warmup_rounds=1)
