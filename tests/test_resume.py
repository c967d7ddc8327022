"""Resumable runs: a scoring run killed midway and resumed equals an uninterrupted run."""

import contextlib
import copy
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny import random_examples, tiny_model
from tiny_saved import save_tiny_model

import headscore
from headscore.checkpoint import CheckpointMismatch, callable_identity, load_checkpoint, save_checkpoint
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


@pytest.mark.parametrize("every", [0, 1])
@pytest.mark.parametrize("method", ["taylor", "atp-mean"])
def test_resume_from_every_batch_equals_uninterrupted(tmp_path, monkeypatch, method, every):
    """Stopped after k batches (an exception inside the loop), the checkpoint holds those k, also where it is
    written only at the end (``checkpoint_every=0``: the stop writes it), and the resumed run equals the
    uninterrupted one for every k."""
    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(7)
    full = headscore.score(lm, examples, method=method, batch_size=2, progress=False)
    for k in range(4):
        ckpt = tmp_path / f"{method}{k}-{every}.ckpt"
        with _stopping_after(monkeypatch, k), pytest.raises(KeyboardInterrupt), \
                pytest.warns(UserWarning, match=f"stopped after {k} of 4 batches"):
            headscore.score(lm, examples, method=method, batch_size=2, checkpoint=str(ckpt), checkpoint_every=every,
                            progress=False)
        assert load_checkpoint(ckpt)[1] == k
        resumed = headscore.score(lm, examples, method=method, batch_size=2, checkpoint=str(ckpt), resume=True,
                                  progress=False)
        assert torch.equal(resumed.values, full.values) and torch.equal(resumed.counts, full.counts)
        assert torch.equal(resumed.example_values, full.example_values)  # kept across the checkpoint, in order
        assert torch.equal(resumed.example_tasks, full.example_tasks)
        again = headscore.score(lm, examples, method=method, batch_size=2, checkpoint=str(ckpt), resume=True,
                                progress=False)  # a finished checkpoint: the result at once
        assert torch.equal(again.values, full.values)


def test_a_stop_inside_the_accumulation_undoes_that_batch(tmp_path, monkeypatch):
    """An interrupt that comes after the batch's sums were added (inside the accumulator's add, or right after
    it): the checkpoint holds the batches before it and not a half or a double of it; the resumed run equals the
    uninterrupted one."""
    from headscore.accumulate import TaskAccumulator

    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(7)
    full = headscore.score(lm, examples, batch_size=2, progress=False)
    add, calls = TaskAccumulator.add, []

    def stopping(self, *args, **kwargs):
        add(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            self.sumsq.zero_()  # a partial state, as an interrupt between two of add's steps could leave
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.ckpt"
    with monkeypatch.context() as m:
        m.setattr(TaskAccumulator, "add", stopping)
        with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="stopped after 2 of 4 batches"):
            headscore.score(lm, examples, batch_size=2, checkpoint=str(ckpt), progress=False)
    assert load_checkpoint(ckpt)[1] == 2
    resumed = headscore.score(lm, examples, batch_size=2, checkpoint=str(ckpt), resume=True, progress=False)
    assert resumed.extra["resumed_from_batch"] == 2
    assert torch.equal(resumed.values, full.values) and torch.equal(resumed.stderr, full.stderr)
    assert torch.equal(resumed.example_values, full.example_values)


@contextlib.contextmanager
def _stopping_after(monkeypatch, batches, step="gate_gradients"):
    """Inside the block, scoring stops with a KeyboardInterrupt after ``batches`` batches (the command line
    then exits 130): at the batch's call of ``step``, one of ``headscore.api``'s names (``clean_losses`` for
    ablation)."""
    import headscore.api as api

    original, calls = getattr(api, step), []

    def failing(*args, **kwargs):
        if len(calls) == batches:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(api, step, failing)
        yield


def _interrupted(monkeypatch, batches, run):
    """``run()`` stopped by a KeyboardInterrupt after ``batches`` batches."""
    with _stopping_after(monkeypatch, batches), pytest.raises(KeyboardInterrupt):
        run()


def test_resume_refuses_another_dtype_or_kernel(tmp_path, monkeypatch):
    """A float32 checkpoint resumed in float64 (or with the kernel forced on) is refused; the checkpoint stays
    good for the run it is from: resuming that equals the uninterrupted run."""
    lm = tiny_model("llama")
    examples = random_examples(8)
    full = headscore.score(lm, examples, batch_size=2, progress=False)
    ckpt = str(tmp_path / "run.ckpt")
    run = lambda model, **kw: headscore.score(model, examples, batch_size=2, checkpoint=ckpt, progress=False,  # noqa: E731
                                              **kw)
    _interrupted(monkeypatch, 2, lambda: run(lm, checkpoint_every=1, kernel=False))
    with pytest.raises(CheckpointMismatch, match="dtype: checkpoint float32 vs now float64"):
        run(tiny_model("llama", dtype=torch.float64), resume=True, kernel=False)
    with pytest.raises(CheckpointMismatch, match="kernel: checkpoint false vs now true"):
        run(lm, resume=True, kernel=True)
    resumed = run(lm, resume=True, kernel=None)  # auto = off on a CPU: the same run
    assert resumed.extra["resumed_from_batch"] == 2
    assert torch.equal(resumed.values, full.values) and torch.equal(resumed.counts, full.counts)


def test_resume_knows_the_model_by_its_weights_not_its_path(tmp_path, monkeypatch, data_file, capsys):
    """The same directory spelled ``m`` and ``./m`` resumes (== uninterrupted); other weights there are refused."""
    monkeypatch.chdir(tmp_path)
    save_tiny_model(tmp_path / "m")
    ref = tmp_path / "ref.hs"
    assert main(_argv("m", data_file, ref)) == 0
    out = tmp_path / "out.hs"
    with _stopping_after(monkeypatch, 3):
        assert main(_argv("m", data_file, out, "--checkpoint-every", "1")) == 130
    assert main(_argv("./m", data_file, out, "--resume")) == 0
    a, b = headscore.HeadScores.load(ref), headscore.HeadScores.load(out)
    assert b.extra["resumed_from_batch"] == 3
    assert torch.equal(a.values, b.values) and torch.equal(a.counts, b.counts)

    out = tmp_path / "other.hs"
    with _stopping_after(monkeypatch, 3):
        assert main(_argv("m", data_file, out, "--checkpoint-every", "1")) == 130
    save_tiny_model(tmp_path / "m", seed=1)  # retrained: the same shapes, other values
    capsys.readouterr()
    assert main(_argv("m", data_file, out, "--resume")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"different run \(weights: checkpoint \w+ vs now \w+\)", last), last
    assert not out.exists()


def _metric(token: int, sign: float = 1.0):
    return lambda logits, batch: sign * logits[:, -1, token]


def test_resume_refuses_another_callable_metric(tmp_path, monkeypatch):
    """Every lambda is ``<lambda>``: another one (other code, closure values or defaults) is refused; the same
    code and values resume to the uninterrupted result."""
    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(8)
    ckpt = str(tmp_path / "m.ckpt")
    run = lambda metric, **kw: headscore.score(lm, examples, metric=metric, batch_size=2, checkpoint=ckpt,  # noqa: E731
                                               progress=False, **kw)
    _interrupted(monkeypatch, 2, lambda: run(_metric(5), checkpoint_every=1))
    others = [lambda logits, batch: -logits[:, -1, 7], _metric(6), _metric(5, -1.0),
              lambda logits, batch, token=4: logits[:, -1, token], functools.partial(lambda k, logits, batch: k, 2)]
    for other in others:
        with pytest.raises(CheckpointMismatch, match="metric: checkpoint"):
            run(other, resume=True)
    resumed = run(_metric(5), resume=True)  # a new closure of the same code and values
    full = headscore.score(lm, examples, metric=_metric(5), batch_size=2, progress=False)
    assert resumed.extra["resumed_from_batch"] == 2 and torch.equal(resumed.values, full.values)


def test_callable_identity():
    def outer(k):
        def inner(x):
            return x * k
        return lambda logits, batch: inner(logits)

    same = lambda a: a + 1  # noqa: E731
    ids = [callable_identity(f) for f in (outer(1), outer(2), same, lambda a: a + 2, lambda a: a - 1,
                                         functools.partial(same, 1), functools.partial(same, 2))]
    assert len(set(ids)) == len(ids)
    assert callable_identity(outer(1)) == callable_identity(outer(1))
    assert callable_identity(lambda a: a + 1) == callable_identity(same)  # the same code: told apart by name only
    assert callable_identity(same).startswith(f"{__name__}.test_callable_identity.<locals>.<lambda>:")
    assert callable_identity(functools.partial(same, torch.softmax)) != \
        callable_identity(functools.partial(same, torch.log_softmax))  # builtins by name
    assert callable_identity(torch.tensor([1.0]).add) == callable_identity(torch.tensor([2.0]).add)  # documented


def test_callable_identity_reads_every_element_of_dicts_sets_and_arrays():
    """Closure values told apart element by element: a dict or set of tensors, a NumPy array, where the values
    differ in the middle of 2,000 (their repr cuts that short: they had one identity)."""
    def weighted(weights):
        return lambda logits, batch: logits[:, -1] * 0 + len(weights)

    a, b = torch.zeros(2000), torch.zeros(2000)
    b[1000] = 1.0
    assert repr({"w": a}) == repr({"w": b}) and repr(a.numpy()) == repr(b.numpy())  # why the repr did not do
    for make in (lambda t: {"w": t}, lambda t: t.numpy(), lambda t: {"w": t.numpy()}, lambda t: [{1: t}],
                 lambda t: frozenset([tuple(t.tolist())])):
        assert callable_identity(weighted(make(a))) != callable_identity(weighted(make(b)))
        assert callable_identity(weighted(make(a))) == callable_identity(weighted(make(a.clone())))


def test_model_identity_tells_swapped_heads_apart():
    """Swapping two heads' rows of a query projection or columns of an output projection keeps every parameter's
    sum of bits: the identity reads where values sit too (it did not), and stays the same for an equal copy."""
    from headscore.checkpoint import model_identity

    lm = tiny_model("llama", dtype=torch.float64)
    before = model_identity(lm.model)["weights"]
    assert model_identity(copy.deepcopy(lm.model))["weights"] == before
    attention = lm.model.model.layers[1].self_attn
    # heads 1 and 2's columns of o_proj; rows 9 and 17 of q_proj (none of them among the 8 strided samples)
    for weight, dim, at, width in ((attention.o_proj.weight, 1, (8, 16), 8), (attention.q_proj.weight, 0, (9, 17), 1)):
        with torch.no_grad():
            original = weight.clone()
            first, second = weight.narrow(dim, at[0], width).clone(), weight.narrow(dim, at[1], width).clone()
            weight.narrow(dim, at[0], width).copy_(second)
            weight.narrow(dim, at[1], width).copy_(first)
        assert model_identity(lm.model)["weights"] != before
        with torch.no_grad():
            weight.copy_(original)
    assert model_identity(lm.model)["weights"] == before


def test_checkpoint_is_checked_before_work_and_baselines_by_name(tmp_path, monkeypatch):
    """A checkpoint that cannot be written is refused before any batch (the API found it after the last one and
    lost the run); ``baseline=None`` and ``"zero"`` (``atp-mean``: ``"mean"``) are one run on resume."""
    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(8)
    (tmp_path / "afile").write_text("")
    import headscore.api

    batches = []
    estimate = headscore.api._estimate
    monkeypatch.setattr(headscore.api, "_estimate", lambda *a, **k: batches.append(1) or estimate(*a, **k))
    with pytest.raises(headscore.HeadscoreError, match="checkpoint .*afile/run.ckpt"):
        headscore.score(lm, examples, batch_size=2, checkpoint=str(tmp_path / "afile" / "run.ckpt"), progress=False)
    assert not batches
    monkeypatch.undo()
    for method, implied in (("taylor", "zero"), ("atp-mean", "mean")):
        ckpt = str(tmp_path / f"{method}.ckpt")
        full = headscore.score(lm, examples, method=method, batch_size=2, progress=False)
        _interrupted(monkeypatch, 2, lambda method=method, ckpt=ckpt: headscore.score(
            lm, examples, method=method, batch_size=2, checkpoint=ckpt, checkpoint_every=1, progress=False))
        resumed = headscore.score(lm, examples, method=method, baseline=implied, batch_size=2, checkpoint=ckpt,
                                  resume=True, progress=False)
        assert resumed.extra["resumed_from_batch"] == 2 and torch.equal(resumed.values, full.values)


def test_resume_refuses_another_head_layout(tmp_path, monkeypatch, model_dir, data_file, capsys):
    """A checkpoint of a 3-layer model resumed with a 4-layer one: a one-line CheckpointMismatch, no traceback."""
    ckpt = tmp_path / "c.ckpt"
    examples = headscore.load_jsonl(data_file)
    headscore.score(tiny_model("llama"), examples, batch_size=2, checkpoint=str(ckpt), progress=False)
    with pytest.raises(CheckpointMismatch, match=r"heads_per_layer: checkpoint \[4, 4, 4\] vs now \[4, 4, 4, 4\]"):
        headscore.score(tiny_model("llama", layers=4), examples, batch_size=2, checkpoint=str(ckpt), resume=True,
                        progress=False)
    # the command line, the model directory replaced by a 4-layer model in place
    shutil.copytree(model_dir, tmp_path / "m")
    out = tmp_path / "s.hs"
    with _stopping_after(monkeypatch, 2):
        assert main(_argv(tmp_path / "m", data_file, out, "--checkpoint-every", "1")) == 130
    shutil.rmtree(tmp_path / "m")
    save_tiny_model(tmp_path / "m", layers=4)
    capsys.readouterr()
    assert main(_argv(tmp_path / "m", data_file, out, "--resume")) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("headscore: error: checkpoint") and "heads_per_layer" in last


def test_checkpoint_state_is_checked(tmp_path):
    """Sums of another shape under a matching fingerprint, negative progress, and an older fingerprint (without
    the fields added since) are refused with one-line errors."""
    from headscore.accumulate import TaskAccumulator
    from headscore.checkpoint import ScoringRun, save_checkpoint

    tasks = ["a", "b"]
    ident = ScoringRun(TaskAccumulator(tasks, 3, 4), 5, {}).fingerprint
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, TaskAccumulator(tasks, 3, 4), 2, 5, ident)
    with pytest.raises(CheckpointMismatch, match=r"holds count of shape \[2\], this run's is \[3\]"):
        ScoringRun(TaskAccumulator([*tasks, "c"], 3, 4), 5, {}, checkpoint=path, resume=True)
    with pytest.raises(CheckpointMismatch, match=r"holds sum of shape \[2, 3, 4\], this run's is \[2, 4, 4\]"):
        ScoringRun(TaskAccumulator(tasks, 4, 4), 5, {}, checkpoint=path, resume=True)
    save_checkpoint(path, TaskAccumulator(tasks, 3, 4), -1, 5, ident)
    with pytest.raises(headscore.HeadscoreError, match=r"corrupt progress \(-1 of 5 batches\)"):
        ScoringRun(TaskAccumulator(tasks, 3, 4), 5, {}, checkpoint=path, resume=True)


def test_old_checkpoint_is_refused_as_a_mismatch(tmp_path):
    """A checkpoint whose fingerprint lacks the fields added since (the model's weights, dtype, ...) is refused
    with a clear CheckpointMismatch, not resumed and not a crash."""
    lm = tiny_model("llama")
    examples = random_examples(6)
    ckpt = tmp_path / "old.ckpt"
    headscore.score(lm, examples, batch_size=2, checkpoint=str(ckpt), progress=False)
    state, done, total, stored = load_checkpoint(ckpt)
    old = {k: v for k, v in stored.items() if k not in ("weights", "dtype", "device", "kernel", "fingerprint_version")}
    acc = headscore.prepare(lm, examples).accumulator()
    acc.load_state_dict(state)
    save_checkpoint(ckpt, acc, done, total, {**old, "model": "tiny-llama"})
    with pytest.raises(CheckpointMismatch, match=r"written by another headscore version \(fingerprint version 1, "
                                                 r"now \d+\).*delete it"):
        headscore.score(lm, examples, batch_size=2, checkpoint=str(ckpt), resume=True, progress=False)


def test_ablation_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """``ablate`` with a checkpoint, stopped after k batches (Ctrl-C in the middle of a batch): the checkpoint
    holds k batches, the resumed run equals the uninterrupted one bit for bit (values, stderr, per-example
    values); another mode or baseline is refused; a finished checkpoint gives the result at once."""
    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(7)
    full = headscore.ablate(lm, examples, batch_size=2, progress=False)
    for k in (0, 2, 3):
        ckpt = str(tmp_path / f"a{k}.ckpt")
        with _stopping_after(monkeypatch, k, "clean_losses"), pytest.raises(KeyboardInterrupt), \
                pytest.warns(UserWarning, match=f"stopped after {k} of 4"):
            headscore.ablate(lm, examples, batch_size=2, checkpoint=ckpt, progress=False)
        assert load_checkpoint(ckpt)[1] == k
        with pytest.raises(CheckpointMismatch, match="mode: checkpoint prefix vs now batched"):
            headscore.ablate(lm, examples, batch_size=2, mode="batched", checkpoint=ckpt, resume=True,
                             progress=False)
        with pytest.raises(CheckpointMismatch, match="baseline: checkpoint zero vs now mean"):
            headscore.ablate(lm, examples, batch_size=2, baseline="mean", checkpoint=ckpt, resume=True,
                             progress=False)
        resumed = headscore.ablate(lm, examples, batch_size=2, checkpoint=ckpt, resume=True, progress=False)
        assert resumed.extra.get("resumed_from_batch", 0) == k
        for field in ("values", "stderr", "counts", "example_values", "example_tasks"):
            assert torch.equal(getattr(resumed, field), getattr(full, field)), field
        again = headscore.ablate(lm, examples, batch_size=2, checkpoint=ckpt, resume=True, progress=False)
        assert torch.equal(again.values, full.values)


def test_resumed_ablation_goes_on_in_the_mode_its_check_chose(tmp_path, monkeypatch):
    """Where the first batch's prefix check fails (planted), ablation runs ``batched``; stopped and resumed, it
    goes on ``batched`` without asking the check again (another batch could pass it, and the run would mix two
    modes' round-off), and says so in ``extra["mode"]``, a finished checkpoint too (nothing runs there)."""
    import headscore.api as api

    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(7)
    asked = []

    def failing_check(*args, **kwargs):
        asked.append(1)
        return False

    monkeypatch.setattr(api, "prefix_reuse_works", failing_check)
    full = headscore.ablate(lm, examples, batch_size=2, progress=False)
    assert full.extra["mode"] == "batched" and len(asked) == 1
    ckpt = str(tmp_path / "a.ckpt")
    with _stopping_after(monkeypatch, 2, "clean_losses"), pytest.raises(KeyboardInterrupt), \
            pytest.warns(UserWarning, match="stopped after 2 of 4"):
        headscore.ablate(lm, examples, batch_size=2, checkpoint=ckpt, progress=False)
    monkeypatch.setattr(api, "prefix_reuse_works", lambda *a, **k: pytest.fail("the check was asked again"))
    resumed = headscore.ablate(lm, examples, batch_size=2, checkpoint=ckpt, resume=True, progress=False)
    assert resumed.extra["mode"] == "batched"
    assert torch.equal(resumed.values, full.values) and torch.equal(resumed.example_values, full.example_values)
    again = headscore.ablate(lm, examples, batch_size=2, checkpoint=ckpt, resume=True, progress=False)
    assert again.extra["mode"] == "batched" and torch.equal(again.values, full.values)


def test_ablate_command_resumes_and_refuses_checkpoints_where_none_is_kept(tmp_path, monkeypatch, model_dir,
                                                                          data_file, capsys):
    ref, out = tmp_path / "ref.hs", tmp_path / "out.hs"
    base = ["ablate", "--model", str(model_dir), "--tasks", str(data_file), "--batch-size", "2", "--no-progress"]
    assert main([*base, "--out", str(ref)]) == 0
    with _stopping_after(monkeypatch, 2, "clean_losses"):
        assert main([*base, "--out", str(out), "--checkpoint-every", "1"]) == 130
    assert "stopped after 2 of" in capsys.readouterr().err and not out.exists()
    assert main([*base, "--out", str(out), "--resume"]) == 0
    a, b = headscore.HeadScores.load(ref), headscore.HeadScores.load(out)
    assert b.extra["resumed_from_batch"] == 2 and torch.equal(a.values, b.values)
    assert not (tmp_path / "out.hs.ckpt").exists()  # deleted once the output is written
    for extra in (["--heads", "0.1"], ["--per-position"], ["--edges"]):
        capsys.readouterr()
        assert main([*base, "--out", str(tmp_path / "x.hs"), "--resume", *extra]) == 2
        assert f"checkpoints keep ablate's per-head map: they do not go with {extra[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("line", ["self.done = i + 1", "self._current = None"])
def test_a_stop_on_either_line_after_a_batch_resumes_to_the_same_result(tmp_path, line):
    """A KeyboardInterrupt raised as ScoringRun.batches reaches each of the two lines after a batch (a signal lands
    anywhere): the checkpoint's sums and its batch count agree, and a resume equals the uninterrupted run (with
    the batch marked done after the mark was cleared, one window counted the batch twice: counts [6, 5, 1] for
    [4, 4, 1])."""
    from tiny import random_examples, tiny_model

    import headscore.checkpoint as checkpoint_module

    lm = tiny_model("llama", dtype=torch.float64)
    examples = random_examples(9)
    full = headscore.score(lm, examples, batch_size=3, progress=False)
    ckpt = tmp_path / "run.ckpt"
    source = open(checkpoint_module.__file__, encoding="utf-8").read().splitlines()
    target = next(n for n, text in enumerate(source, 1) if text.strip() == line)
    hits = []

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != checkpoint_module.__file__ or frame.f_code.co_name != "batches":
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == target:
                hits.append(1)
                if len(hits) == 2:  # as the second batch ends
                    raise KeyboardInterrupt
            return local
        return local

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="stopped after 1 of 3 batches"):
            headscore.score(lm, examples, batch_size=3, progress=False, checkpoint=ckpt)
    finally:
        sys.settrace(None)
    resumed = headscore.score(lm, examples, batch_size=3, progress=False, checkpoint=ckpt, resume=True)
    assert torch.equal(resumed.counts, full.counts)
    assert torch.equal(resumed.values, full.values) and torch.equal(resumed.stderr, full.stderr)
