"""benchmarks/track_cost.py (what headscore.track costs in a training loop) on a tiny saved model, 2 steps."""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from tiny_saved import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("track_cost", ROOT / "benchmarks" / "track_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_thread")  # --threads 1 sets torch's threads: the fixture restores them
def test_track_cost_smoke(tmp_path, capsys, monkeypatch):
    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    script = _script()

    def in_process(settings):  # the workers' own code, here (a fresh process costs an import of torch et al.)
        figures = {}
        for mode in script.MODES:
            script.memory_worker(mode, settings)
            figures[mode] = script.read_worker(*capsys.readouterr())
            figures[mode]["how"] += " (in process)"
        return figures

    monkeypatch.setattr(script, "measure_memory", in_process)
    rc = script.main(["--model", str(model), "--steps", "2", "--rounds", "2", "--warmup", "1",
                         "--memory-steps", "1", "--batch-size", "4", "--threads", "1", "--no-progress",
                         "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "track_cost.json").read_text())
    assert doc["steps"] == 2 and doc["rounds"] == 2 and doc["batch_size"] == 4
    t = doc["time"]
    assert len(t["plain_s"]) == len(t["tracked_s"]) == 2 and min(t["plain_s"] + t["tracked_s"]) > 0
    assert len(t["per_round_ratios"]) == 2
    assert t["ratio"] > 0 and t["ratio_q1"] <= t["ratio"] <= t["ratio_q3"]
    assert t["ratio_ci95"][0] <= t["ratio"] <= t["ratio_ci95"][1] and t["ratio_mean"] > 0
    assert t["ratio_of_medians"] == pytest.approx(t["tracked_median_s"] / t["plain_median_s"])
    m = doc["memory"]
    for mode in ("plain", "tracked"):  # the whole process's peak and its rise above the trained state
        assert m[mode]["peak_mib"] > m[mode]["step_peak_mib"] > 0, m[mode]["how"]
        assert m[mode]["how"].startswith("VmHWM - VmRSS")
    assert m["ratio"] == pytest.approx(m["tracked"]["peak_mib"] / m["plain"]["peak_mib"])
    assert set(doc["met"]) == {"time", "memory"} and doc["targets"] == {"time": 1.03, "memory": 1.02}
    assert doc["machine"]["torch_threads"] == 1 and "torch" in doc["versions"]
    assert doc["command"].startswith("python benchmarks/track_cost.py --model ")
    table = (out / "track_cost.md").read_text()
    assert "| step time, median (s) |" in table and "| peak memory, whole process (MiB) |" in table
    assert table in capsys.readouterr().out


def test_track_cost_refuses_an_unwritable_out_before_loading(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = _script().main(["--model", str(tmp_path / "no-such-model"), "--steps", "2", "--rounds", "2",
                         "--out", str(blocker), "--no-progress"])
    assert rc == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.slow  # 7-12 s on 2 cores: a fresh Python worker
def test_track_cost_memory_worker_runs_in_a_fresh_process(tmp_path):
    script = _script()
    settings = {"model": str(save_tiny_model(tmp_path / "model")), "device": "cpu", "dtype": "float32",
                "batch_size": 2, "warmup": 1, "memory_steps": 1, "threads": 1}
    done = subprocess.run(script.worker_command("tracked", settings), capture_output=True, text=True, timeout=300,
                          env={**script.MALLOC_ENV, **os.environ})
    figures = script.read_worker(done.stdout, done.stderr)
    assert done.returncode == 0 and figures["peak_mib"] > figures["step_peak_mib"] > 0, figures
    assert figures["how"] == "VmHWM - VmRSS, malloc: mmap from 64 KiB, one arena"
