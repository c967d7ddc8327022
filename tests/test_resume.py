"""Resumable runs: a scoring run killed midway and resumed equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny import random_examples, tiny_model
from tiny_saved import save_tiny_model

import headscore
from headscore.checkpoint import CheckpointMismatch, load_checkpoint
from headscore.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


# The real command line in a subprocess, each batch slowed down so that it can be killed midway.
SLOW_CLI = """
import os, sys, time
import torch
torch.set_num_threads(int(os.environ["HEADSCORE_TEST_THREADS"]))  # as in the parent: the same float reductions
import headscore.api as api
original = api.gate_gradients
def slow(*args, **kwargs):
    time.sleep(0.25)
    return original(*args, **kwargs)
api.gate_gradients = slow
from headscore.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tasks.jsonl"
    path.write_text("".join(json.dumps(vars(ex)) + "\n" for ex in random_examples(24)))
    return path


def _argv(model_dir, data_file, out, *extra):
    return ["score", "--model", str(model_dir), "--tasks", str(data_file), "--batch-size", "2", "--out", str(out),
            "--no-progress", "--kernel", "off", "--dtype", "float64", *extra]


def _forked_slow_cli(argv):
    """The command line in a forked child (fast to start), each batch slowed down; exits via os._exit."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            import headscore.api as api

            original = api.gate_gradients

            def slow(*args, **kwargs):
                time.sleep(0.25)
                return original(*args, **kwargs)

            api.gate_gradients = slow
            with open(os.devnull, "w") as null:
                sys.stdout = sys.stderr = null
                code = main(argv)
        finally:
            os._exit(code)
    return pid


@pytest.mark.parametrize("how", ["fork", pytest.param("subprocess", marks=pytest.mark.slow)])
def test_killed_run_resumes_to_the_same_result(tmp_path, model_dir, data_file, capsys, how):
    """SIGKILL the command line after its first checkpoint; --resume gives the uninterrupted result."""
    ref = tmp_path / "ref.hs"
    assert main(_argv(model_dir, data_file, ref)) == 0
    out, ckpt = tmp_path / "run.hs", tmp_path / "run.hs.ckpt"
    argv = _argv(model_dir, data_file, out, "--checkpoint-every", "2")
    if how == "fork":
        pid = _forked_slow_cli(argv)
        alive = lambda: os.waitpid(pid, os.WNOHANG) == (0, 0)  # noqa: E731
    else:
        env = {**os.environ, "HEADSCORE_TEST_THREADS": str(torch.get_num_threads()), "PYTHONWARNINGS": "ignore"}
        proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *argv], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        pid = proc.pid
        alive = lambda: proc.poll() is None  # noqa: E731
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert alive(), "the scoring process ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
    finally:
        if how == "fork":
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        else:
            proc.wait(timeout=30)
            killed = proc.returncode == -signal.SIGKILL
    assert killed
    _, done, total, _ = load_checkpoint(ckpt)  # the checkpoint is whole
    assert 0 < done < total == 12
    assert not out.exists()  # no (half-written) output from the killed run

    assert main(_argv(model_dir, data_file, out, "--checkpoint-every", "2", "--resume")) == 0
    a, b = headscore.HeadScores.load(ref), headscore.HeadScores.load(out)
    assert torch.equal(a.values, b.values) and torch.equal(a.stderr, b.stderr) and torch.equal(a.counts, b.counts)
    assert b.extra["resumed_from_batch"] == done
    assert not ckpt.exists()  # removed once the output is written
    capsys.readouterr()


def test_checkpoint_refusals(tmp_path, model_dir, data_file, capsys):
    out = tmp_path / "s.hs"
    lm = headscore.load_model(str(model_dir))
    examples = headscore.load_jsonl(data_file)
    ckpt = tmp_path / "run.ckpt"
    headscore.score(lm, examples, batch_size=2, checkpoint=str(ckpt), checkpoint_every=3, progress=False)
    assert ckpt.exists()
    with pytest.raises(headscore.HeadscoreError, match="exists: pass resume"):
        headscore.score(lm, examples, batch_size=2, checkpoint=str(ckpt), progress=False)
    with pytest.raises(CheckpointMismatch, match="batch_size: checkpoint 2 vs now 4"):
        headscore.score(lm, examples, batch_size=4, checkpoint=str(ckpt), resume=True, progress=False)
    with pytest.raises(CheckpointMismatch, match="method"):
        headscore.score(lm, examples, method="fisher", batch_size=2, checkpoint=str(ckpt), resume=True,
                        progress=False)
    with pytest.raises(CheckpointMismatch, match="data_hash"):
        headscore.score(lm, examples[1:], batch_size=2, checkpoint=str(ckpt), resume=True, progress=False)
    code = main(_argv(model_dir, data_file, out, "--batch-size", "3", "--checkpoint", str(ckpt), "--resume"))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("headscore: error:") and "different run" in last and not out.exists()
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 10)
    with pytest.raises(headscore.HeadscoreError, match="not a headscore checkpoint"):
        headscore.score(lm, examples, batch_size=2, checkpoint=str(tmp_path / "junk.ckpt"), resume=True,
                        progress=False)


@pytest.mark.parametrize("method", ["taylor", "atp-mean"])
def test_resume_from_every_batch_equals_uninterrupted(tmp_path, method):
    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(7)
    full = headscore.score(lm, examples, method=method, batch_size=2, progress=False)
    # stop after k batches (an exception inside the loop), then resume: the same result for every k
    import headscore.api as api

    original = api.gate_gradients
    for k in range(4):
        ckpt = tmp_path / f"{method}{k}.ckpt"
        calls = []

        def failing(*args, calls=calls, k=k, **kwargs):
            if len(calls) == k:
                raise KeyboardInterrupt
            calls.append(1)
            return original(*args, **kwargs)

        api.gate_gradients = failing
        try:
            with pytest.raises(KeyboardInterrupt):
                headscore.score(lm, examples, method=method, batch_size=2, checkpoint=str(ckpt), checkpoint_every=1,
                                progress=False)
        finally:
            api.gate_gradients = original
        assert (load_checkpoint(ckpt)[1] == k) if k else not ckpt.exists()
        resumed = headscore.score(lm, examples, method=method, batch_size=2, checkpoint=str(ckpt), resume=True,
                                  progress=False)
        assert torch.equal(resumed.values, full.values) and torch.equal(resumed.counts, full.counts)
        assert torch.equal(resumed.example_values, full.example_values)  # kept across the checkpoint, in order
        assert torch.equal(resumed.example_tasks, full.example_tasks)
        again = headscore.score(lm, examples, method=method, batch_size=2, checkpoint=str(ckpt), resume=True,
                                progress=False)  # a finished checkpoint: the result at once
        assert torch.equal(again.values, full.values)
