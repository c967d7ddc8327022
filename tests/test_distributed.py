"""Data-parallel scoring: two gloo processes on the CPU give the single-process result; device_map loading."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from tiny import random_examples, tiny_model
from tiny_saved import save_tiny_model

import headscore
from headscore import checkpoint
from headscore.checkpoint import CheckpointMismatch
from headscore.cli import main
from headscore.distributed import rank_and_world, shard

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_is_a_deterministic_partition():
    items = list(range(11))
    parts = [[i for i, _ in shard(items, r, 3)] for r in range(3)]
    assert sorted(sum(parts, [])) == items and parts[1] == [1, 4, 7, 10]
    assert rank_and_world(None) == (0, 1) and rank_and_world(False) == (0, 1)
    with pytest.raises(headscore.HeadscoreError, match="process group"):
        rank_and_world(True)


def _rank_main(rank, world, port, out_dir, examples, options=None):
    """One rank of a forked two-process gloo group: score with the process group initialised."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        lm = tiny_model("llama", dtype=torch.float64)
        result = headscore.score(lm, examples, method="taylor", batch_size=2, progress=False,
                                 **(options or {}))  # auto-distributed
        result.save(out_dir / f"rank{rank}.hs")
    finally:
        dist.destroy_process_group()


def _run_two_ranks(out_dir, examples, options=None):
    """``_rank_main`` in two forked processes; both must exit 0."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, out_dir, examples, options)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_gloo_processes_equal_one_forked(tmp_path):
    """Fast variant (forked processes, the Python API): 2-rank gloo scores == 1-process scores."""
    examples = random_examples(15)
    single = headscore.score(tiny_model("llama", dtype=torch.float64), examples, batch_size=2, progress=False)
    _run_two_ranks(tmp_path, examples)
    for rank in range(2):
        dist = headscore.HeadScores.load(tmp_path / f"rank{rank}.hs")  # every rank has the reduced result
        assert dist.extra["world_size"] == 2 and torch.equal(dist.counts, single.counts)
        torch.testing.assert_close(dist.values, single.values, rtol=1e-6, atol=0)
        torch.testing.assert_close(dist.stderr, single.stderr, rtol=1e-6, atol=0)


def _refusing_rank(rank, world, port, out_dir, examples_of_rank):
    """One rank that scores its own example list and writes the error it gets (or "none")."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        headscore.score(tiny_model("llama", dtype=torch.float64), examples_of_rank[rank], batch_size=2,
                        progress=False)
        message = "none"
    except headscore.HeadscoreError as exc:
        message = str(exc)
    finally:
        dist.destroy_process_group()
    (out_dir / f"error{rank}").write_text(message)


@pytest.mark.parametrize("how", ["own-share", "shuffled", "rotated"])
def test_ranks_given_different_examples_are_refused(tmp_path, how):
    """Each rank given its own share (as a DistributedSampler would), its own shuffle, or the same examples in
    another order: refused on every rank before any work (the sums were merged as they came, under rank 0's
    task names)."""
    import multiprocessing
    import random

    examples = random_examples(12)
    if how == "own-share":
        per_rank = [examples[0::2], examples[1::2]]
    elif how == "shuffled":
        per_rank = [random.Random(r).sample(examples, len(examples)) for r in range(2)]
    else:
        per_rank = [examples, examples[1:] + examples[:1]]
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_refusing_rank, args=(r, 2, port, tmp_path, per_rank)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    for rank in range(2):
        assert (tmp_path / f"error{rank}").read_text().startswith("ranks disagree on the examples or the batches")


def test_resume_with_another_world_size_is_refused(tmp_path, monkeypatch):
    """Checkpoints of a 2-rank run (``c.rank0``, ``c.rank1``) are refused by a 1-process resume, naming world size
    2, not silently ignored; resumed by 2 ranks they give the single-process result. A 1-process checkpoint ``c``
    is refused by a 2-rank run alike."""
    examples = random_examples(9)
    lm = tiny_model("llama", dtype=torch.float64)
    single = headscore.score(lm, examples, batch_size=2, progress=False)
    ckpt = tmp_path / "c"
    _run_two_ranks(tmp_path, examples, {"checkpoint": str(ckpt), "checkpoint_every": 1})
    assert sorted(p.name for p in tmp_path.glob("c*")) == ["c.rank0", "c.rank1"]
    with pytest.raises(CheckpointMismatch, match=r"c\.rank0 is from a run of world size 2, this one has 1: resume "
                                                 r"with 2 processes, or delete .*c\.rank\* to start over"):
        headscore.score(lm, examples, batch_size=2, checkpoint=str(ckpt), resume=True, progress=False)
    with pytest.raises(CheckpointMismatch, match="world size 2"):  # starting over there would leave them behind
        headscore.score(lm, examples, batch_size=2, checkpoint=str(ckpt), progress=False)
    _run_two_ranks(tmp_path, examples, {"checkpoint": str(ckpt), "resume": True})
    for rank in range(2):
        resumed = headscore.HeadScores.load(tmp_path / f"rank{rank}.hs")
        assert resumed.extra["resumed_from_batch"] == 5 and torch.equal(resumed.counts, single.counts)
        torch.testing.assert_close(resumed.values, single.values, rtol=1e-6, atol=0)

    one = tmp_path / "one.ckpt"
    headscore.score(lm, examples, batch_size=2, checkpoint=str(one), progress=False)
    monkeypatch.setattr(checkpoint, "rank_and_world", lambda distributed: (1, 2))  # rank 1 of 2
    acc = headscore.prepare(lm, examples).accumulator()
    with pytest.raises(CheckpointMismatch, match=r"one\.ckpt is from a run of world size 1, this one has 2"):
        checkpoint.ScoringRun(acc, 5, {}, checkpoint=one, resume=True)
    monkeypatch.setattr(checkpoint, "rank_and_world", lambda distributed: (3, 4))  # rank 3 of 4: no file of its own
    with pytest.raises(CheckpointMismatch, match=r"c\.rank0 is from a run of world size 2, this one has 4"):
        checkpoint.ScoringRun(acc, 5, {}, checkpoint=ckpt, resume=True)


def test_cli_checks_every_rank_checkpoint(tmp_path, model_dir, monkeypatch, capsys):
    """Under a launcher (WORLD_SIZE=2) each rank's checkpoint file ``PATH.rankR`` is checked before any work
    against the outputs and inputs: rank 0's file as --out would be deleted after the scores are written there."""
    data = tmp_path / "t.rank1"
    data.write_text("".join(json.dumps(vars(ex)) + "\n" for ex in random_examples(4)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["score", "--model", str(model_dir), "--tasks", str(data), "--no-progress", "--kernel", "off"]
    cases = [(["--checkpoint", str(tmp_path / "c"), "--out", str(tmp_path / "c.rank0")],
              "--checkpoint (rank 0's file) and --out are the same file"),
             (["--checkpoint", str(tmp_path / "t"), "--out", str(tmp_path / "s.hs")],
              "--checkpoint (rank 1's file) t.rank1 is the input file of --tasks")]
    for extra, message in cases:
        capsys.readouterr()
        assert main([*argv, *extra]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in last.replace(f"{tmp_path}/", ""), last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.rank1"]


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path, model_dir):
    """torchrun + the command line, two gloo ranks on 127.0.0.1 (slow: two fresh interpreters)."""
    data = tmp_path / "tasks.jsonl"
    examples = random_examples(21)
    data.write_text("".join(json.dumps(vars(ex)) + "\n" for ex in examples))
    lm = headscore.load_model(str(model_dir), dtype="float32")
    single = headscore.score(lm, examples, method="fisher", batch_size=2, progress=False)

    out = tmp_path / "dist.hs"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "headscore.cli", "score",
           "--model", str(model_dir), "--tasks", str(data), "--method", "fisher", "--batch-size", "2",
           "--out", str(out), "--no-progress", "--checkpoint-every", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fisher: 3 tasks, 21 examples") == 1  # only rank 0 reports
    dist = headscore.HeadScores.load(out)
    assert dist.extra["world_size"] == 2 and torch.equal(dist.counts, single.counts)
    torch.testing.assert_close(dist.values, single.values, rtol=1e-6, atol=0)
    torch.testing.assert_close(dist.stderr, single.stderr, rtol=1e-6, atol=0)
    assert not list(tmp_path.glob("dist.hs.ckpt*"))  # per-rank checkpoints removed after the output


def test_device_map_loading(model_dir, tmp_path):
    examples = random_examples(6)
    plain = headscore.score(headscore.load_model(str(model_dir)), examples, batch_size=3, progress=False)
    mapped = headscore.load_model(str(model_dir), device_map={"": "cpu"})
    assert mapped.device.type == "cpu"
    torch.testing.assert_close(headscore.score(mapped, examples, batch_size=3, progress=False).values, plain.values)
    # accelerate's dispatch hooks: the last layer offloaded to disk, moved in for each forward pass
    import transformers

    pytest.importorskip("accelerate")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), device_map=device_map, offload_folder=str(tmp_path / "offload"), attn_implementation="sdpa")
    offloaded = headscore.LoadedModel(model.eval(), mapped.tokenizer, "offloaded")
    torch.testing.assert_close(headscore.score(offloaded, examples, batch_size=3, progress=False).values,
                               plain.values)
