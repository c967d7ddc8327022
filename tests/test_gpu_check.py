"""`make gpu-check`'s CPU smoke run: every stage of the GPU verification runs at tiny shapes (issue 14).

On a CUDA machine the same script measures; here it proves that no stage has rotted before the rare GPU
session that needs it."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")


@pytest.mark.slow  # 5 min in a shared CI run: every stage in subprocesses, SmolLM2 included
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--device", "cpu", "--smoke"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all stages passed" in done.stdout
    for name in ("env.txt", "kernel-tests.log", "attention-bench.log", "e2e.log", "smollm2.log",
                 "gated_attention.png", "gated_attention.pdf"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "gated_attention.csv", newline="") as fh:
        impls = {r["impl"] for r in csv.DictReader(fh)}
    assert {"gated-attn (triton)", "sdpa+gate (unfused)", "gate_grad (triton)"} <= impls
    e2e = json.loads((out / "gpu_e2e.json").read_text())
    assert {"floor (fwd+bwd, input grads)", "taylor kernel=on", "taylor kernel=off", "ablation batched (extrapolated)",
            "ablation sequential (extrapolated)"} <= set(e2e["rows"])
    assert min(e2e["kernel_on_vs_off"]["spearman"].values()) > 0.99
    smol = json.loads((out / "gpu_smollm2.json").read_text())
    assert smol["passed"] and set(smol["compare"]) == {"kernel=off", "kernel=on"}
    assert all(len(r["spearman"]) == 3 for r in smol["compare"].values())  # the smoke run's three tasks
