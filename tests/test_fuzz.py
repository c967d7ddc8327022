"""Fuzzing every file reader and the command line (issue 23, part 3): generated bad input must end in a
HeadscoreError (one line, exit 2 on the command line) or be accepted, never in another exception.

Readers: task JSONL, CSV and Parquet, CogQA JSON, scores files (``HeadScores.load``), checkpoints; the command
line: every command's options with hostile values, run through ``main`` up to the point where the model would
load (replaced by a sentinel), so every check that runs before work is exercised. Writers are fault-injected in
``tests/test_output_safety.py``.

The example count comes from a hypothesis profile: ``ci`` (default, bounded for the fast tier) or ``long``
(``HYPOTHESIS_PROFILE=long make test-fuzz-long``, thousands of examples per reader).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import headscore.cli.cogqa as cli_cogqa
import headscore.cli.common as cli_common
from headscore.accumulate import TaskAccumulator
from headscore.checkpoint import load_checkpoint, save_checkpoint
from headscore.cli import main
from headscore.data.tasks import load_tasks
from headscore.edge_maps import EdgeMaps
from headscore.edges.graph import EdgeGraph
from headscore.errors import HeadscoreError
from headscore.results import HeadScores

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,  # the same inputs every run
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# text with everything a file can hold: control characters, lone surrogates, NUL, bidi marks, astral planes
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)
GOOD = {"prompt": "The capital of France is", "target": " Paris", "task": "geo"}
FIELDS = ("prompt", "target", "task", "corrupt", "foil")


def dump(value) -> str:
    """JSON text of ``value`` (NaN and infinities as Python writes them; lone surrogates escaped)."""
    return json.dumps(value)


def _scratch(data: bytes, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


def damaged(valid: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    """``valid`` with each (offset, byte) of ``edits`` written over it, cut after ``cut`` bytes."""
    blob = bytearray(valid)
    for at, byte in edits:
        blob[at] = byte
    return bytes(blob[:cut])


def accepted_or_refused(fn, *args):
    """Call ``fn``: its result, or None after a HeadscoreError; any other exception fails the test."""
    try:
        return fn(*args)
    except HeadscoreError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(exc)
        return None


# ---------------------------------------------------------------------------------------------- task files


@st.composite
def task_lines(draw) -> bytes:
    """A JSONL file: good lines, lines with one field replaced by anything, JSON that is no object, junk."""
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["good", "field", "value", "junk", "deep", "number"]))
        if kind == "good":
            lines.append(dump(GOOD))
        elif kind == "field":
            line = dict(GOOD)
            line[draw(st.sampled_from(FIELDS))] = draw(json_values)
            lines.append(dump(line))
        elif kind == "value":
            lines.append(dump(draw(json_values)))
        elif kind == "deep":
            depth = draw(st.integers(1, 200_000))
            lines.append('{"prompt": ' + "[" * depth + "]" * depth + ', "target": " x", "task": "t"}')
        elif kind == "number":
            lines.append('{"prompt": "a", "target": " b", "task": ' + "9" * draw(st.integers(1, 6000)) + "}")
        else:
            lines.append(draw(st.binary(max_size=60)).decode("latin-1"))
    text = "\n".join(lines)
    return draw(st.sampled_from([text.encode("utf-8", "surrogatepass"), text.encode("utf-8", "replace"),
                                 text.encode("utf-16")]))


@given(data=task_lines())
def test_task_jsonl_reader(data):
    path = _scratch(data, ".jsonl")
    try:
        examples = accepted_or_refused(load_tasks, str(path))
        for ex in examples or []:
            for name in ("prompt", "target", "task"):
                value = getattr(ex, name)
                assert isinstance(value, str)
                value.encode("utf-8")  # valid text: no lone surrogate gets past the door
    finally:
        path.unlink()


@given(data=st.binary(max_size=300))
def test_task_jsonl_reader_on_any_bytes(data):
    path = _scratch(data, ".jsonl")
    try:
        accepted_or_refused(load_tasks, str(path))
    finally:
        path.unlink()


@st.composite
def csv_files(draw) -> bytes:
    """A CSV file: a header of task fields (and junk), rows of any text, cells missing or extra, quotes."""
    header = draw(st.lists(st.sampled_from([*FIELDS, "label", "text", "x"]), min_size=1, max_size=6))
    rows = [",".join(header)]
    for _ in range(draw(st.integers(0, 4))):
        cells = draw(st.lists(any_text | st.sampled_from(["", '"a,b"', '"x\ny"', "1", "nan", '"']), max_size=7))
        rows.append(",".join(cells))
    text = "\n".join(rows)
    return text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text.encode("utf-8", "replace")


@given(data=csv_files())
def test_task_csv_reader(data):
    path = _scratch(data, ".csv")
    try:
        for ex in accepted_or_refused(load_tasks, str(path)) or []:
            (ex.prompt + ex.target + ex.task).encode("utf-8")
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def parquet_bytes() -> bytes:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "task": "other", "foil": " Rome"}]), buf)
    return buf.getvalue()


@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 10_000))
def test_task_parquet_reader_on_damaged_files(parquet_bytes, edits, cut):
    valid = parquet_bytes
    path = _scratch(damaged(valid, [(at % len(valid), b) for at, b in edits], cut), ".parquet")
    try:
        accepted_or_refused(load_tasks, str(path))
    finally:
        path.unlink()


@st.composite
def cogqa_documents(draw):
    good_sub = {"subquestion": "What is 2+2?", "answer": "4", "cognitive_skill": "Math Calculation"}
    good = {"question": "Q?", "answer": "A", "generated": [good_sub]}
    kind = draw(st.sampled_from(["value", "question", "sub"]))
    if kind == "value":
        return draw(json_values)
    if kind == "question":
        doc = dict(good)
        doc[draw(st.sampled_from(["question", "answer", "generated"]))] = draw(json_values)
        return [good, doc]
    sub = dict(good_sub)
    sub[draw(st.sampled_from(["subquestion", "answer", "cognitive_skill"]))] = draw(json_values)
    return [good, {**good, "generated": [good_sub, sub]}]


@pytest.mark.filterwarnings("ignore:CogQA. dropped labels")  # the rare-label warning is expected here
@given(doc=cogqa_documents())
def test_cogqa_reader(doc):
    path = _scratch(dump(doc).encode(), ".json")
    try:
        accepted_or_refused(load_tasks, f"cogqa:{path}")
    finally:
        path.unlink()


# ------------------------------------------------------------------------------------- scores, checkpoints


def _valid_scores_bytes() -> bytes:
    """Scores of 2 tasks on 2 layers x 3 heads, with per-example values and edge scores."""
    graph = EdgeGraph(2, 3, 1)
    missing = ~graph.allowed

    def edges(*rows: int) -> torch.Tensor:
        return torch.rand(*rows, *graph.allowed.shape, dtype=torch.float64).masked_fill(missing, float("nan"))
    maps = EdgeMaps(graph.upstream, graph.downstream, edges(2), edges(2), edges(7).float())
    s = HeadScores(torch.rand(2, 2, 3, dtype=torch.float64), torch.rand(2, 2, 3, dtype=torch.float64),
                   torch.tensor([3, 4]), ["a", "b"], "taylor", "m", example_values=torch.rand(7, 2, 3),
                   example_tasks=torch.tensor([0, 0, 0, 1, 1, 1, 1]), edge_maps=maps)
    return s.to_bytes()


VALID_SCORES = _valid_scores_bytes()


def _use(scores: HeadScores) -> None:
    """What every command does with a loaded file: rank, export, select."""
    scores.top_k(1)
    scores.export_bytes(".csv")
    scores.export_bytes(".json")
    scores.select(list(reversed(scores.tasks)))
    if scores.has_edges:
        scores.edge_export_bytes(".csv")
        scores.edge_export_bytes(".json")


@given(edits=st.lists(st.tuples(st.integers(0, len(VALID_SCORES) - 1), st.integers(0, 255)), max_size=4),
       cut=st.integers(0, len(VALID_SCORES)))
def test_scores_file_with_damaged_bytes(edits, cut):
    """With its checksum, a scores file loads only as the very bytes that were written."""
    blob = damaged(VALID_SCORES, edits, cut)
    path = _scratch(blob, ".hs")
    try:
        loaded = accepted_or_refused(HeadScores.load, path)
        assert (loaded is not None) == (blob == VALID_SCORES)
        if loaded is not None:
            _use(loaded)
    finally:
        path.unlink()


dtypes = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.bool,
                          torch.uint8])
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=4).map(tuple)


@st.composite
def scores_without_checksum(draw) -> bytes:
    """A safetensors file that claims to be a scores file: random tensors and random metadata texts."""
    tensors = {}
    for name in ("values", "stderr", "counts", "example_values", "example_tasks", "position_values",
                 "position_stderr", "position_counts"):
        if draw(st.booleans()) or name in ("values", "stderr", "counts"):
            shape = draw(shapes)
            dtype = draw(dtypes)
            tensors[name] = (torch.rand(shape) * 10 - 3).to(dtype)
    meta = {"format": "headscore/1"}
    for key in ("tasks", "method", "model", "versions", "extra", "positions", "data_hash"):
        if draw(st.booleans()):
            meta[key] = draw(st.one_of(json_values.map(dump), any_text)).encode("utf-8", "replace").decode()
    return save(tensors, metadata=meta)


@given(blob=scores_without_checksum())
def test_scores_file_with_any_content(blob):
    path = _scratch(blob, ".hs")
    try:
        loaded = accepted_or_refused(HeadScores.load, path)
        if loaded is not None:
            _use(loaded)
    finally:
        path.unlink()


def _valid_checkpoint_bytes() -> bytes:
    acc = TaskAccumulator(["a", "b"], 2, 3)
    acc.add(torch.tensor([0, 1]), torch.rand(2, 2, 3, dtype=torch.float64))
    with tempfile.TemporaryDirectory() as d:
        return save_checkpoint(Path(d) / "c.ckpt", acc, 1, 4, {"model": "m"}).read_bytes()


VALID_CHECKPOINT = _valid_checkpoint_bytes()


@given(edits=st.lists(st.tuples(st.integers(0, len(VALID_CHECKPOINT) - 1), st.integers(0, 255)), max_size=4),
       cut=st.integers(0, len(VALID_CHECKPOINT)))
def test_checkpoint_with_damaged_bytes(edits, cut):
    path = _scratch(damaged(VALID_CHECKPOINT, edits, cut), ".ckpt")
    try:
        accepted_or_refused(load_checkpoint, path)
    finally:
        path.unlink()


# -------------------------------------------------------------------------------------------- command line


class ModelWouldLoad(Exception):
    """Raised instead of loading a model: every check before the work has passed."""


HOSTILE = ["", "\x00", "a\x00b", "\udcff", "-1", "0", "1", "2", "nan", "inf", "-inf", "1e23", "1.5", "9" * 5000,
           "0x10", "\u00e9", "\ud800", "a" * 300, "meta", "cuda", "cuda:7", "cpu", "/", "/dev/null", "/proc/self/mem",
           "nonexistent.hs", "out/", "x.csv", "x.json", "x.txt", "builtin", "ioi", "cogqa:", "cogqa:/nonexistent",
           "--", "-"]

OPTIONS = {
    "score": ["--model", "--device", "--dtype", "--batch-size", "--tasks", "--max-examples", "--method",
              "--baseline", "--metric", "--out", "--export", "--kernel", "--checkpoint", "--checkpoint-every",
              "--export-edges", "--columns", "--steps"],
    "ablate": ["--model", "--device", "--batch-size", "--tasks", "--max-examples", "--baseline", "--metric",
               "--mode", "--rows-per-pass", "--heads", "--gate", "--out", "--export", "--scores", "--top",
               "--export-edges", "--columns"],
    "circuit": ["--model", "--device", "--tasks", "--max-examples", "--edges", "--target-faithfulness", "--sizes",
                "--select", "--rows-per-pass", "--out", "--columns"],
    "compare": ["--k", "--json", "--misses", "--resamples", "--level", "--seed"],
    "bench": ["--model", "--device", "--rows-per-pass", "--methods", "--repeats", "--warmup", "--sample-heads",
              "--memory", "--threads", "--out"],
    "intervene": ["--model", "--device", "--scores", "--k", "--seeds", "--scale", "--others-per-function",
                  "--out", "--resamples", "--level", "--seed"],
    "report": ["--ablation", "--compare", "--out", "--k", "--resamples", "--level", "--seed", "--circuit-edges"],
    "reproduce-cogqa": ["--out", "--model", "--max-per-function", "--k", "--seeds", "--train-fraction", "--seed"],
}
FLAGS = ["--no-progress", "--per-position", "--resume", "--distributed", "--sample-ablation", "--chat-template",
         "--edges"]
POSITIONAL = {"compare": 2, "report": 1, "reproduce-cogqa": 1, "circuit": 1}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-cli")
    (d / "a.hs").write_bytes(VALID_SCORES)
    (d / "t.jsonl").write_text(json.dumps(GOOD) + "\n")
    (d / "folder").mkdir()
    return d


@st.composite
def command_lines(draw, workdir: Path) -> list[str]:
    command = draw(st.sampled_from(sorted(OPTIONS)))
    values = st.sampled_from(HOSTILE + [str(workdir / "a.hs"), str(workdir / "t.jsonl"), str(workdir / "folder"),
                                        str(workdir / "new.hs"), str(workdir / "new-dir")])
    argv = [command] + [draw(values) for _ in range(POSITIONAL.get(command, 0))]
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 4)) == 0:
            argv.append(draw(st.sampled_from(FLAGS)))
        else:
            argv += [draw(st.sampled_from(OPTIONS[command])), draw(values)]
    return argv


def _no_model(*args, **kwargs):
    raise ModelWouldLoad


@given(data=st.data())
@settings(max_examples=settings().max_examples * 2)
def test_command_line_options(data, workdir, monkeypatch, capsys):
    """Any command line ends with exit 0 or 2 (one line) or reaches the model load; no traceback, and no
    file written beside the inputs unless the command succeeded."""
    monkeypatch.setattr(cli_common, "load_model", _no_model)
    monkeypatch.setattr(cli_cogqa, "load_model", _no_model)
    monkeypatch.chdir(workdir)
    argv = data.draw(command_lines(workdir))
    before = sorted(os.listdir(workdir))
    try:
        code = main(argv)
    except ModelWouldLoad:
        code = None
    err = capsys.readouterr().err
    if code == 2:
        assert err.startswith("headscore: error: ") and err.count("\n") == 1, (argv, err)
    else:
        assert code in (0, None), (argv, code, err)
    if code != 0:
        assert sorted(os.listdir(workdir)) == before, argv
    else:
        for name in set(os.listdir(workdir)) - set(before):  # a successful compare --json or report
            path = workdir / name
            if path.is_dir():
                for child in path.iterdir():
                    child.unlink()
                path.rmdir()
            else:
                path.unlink()
    assert not [n for n in os.listdir(workdir) if n.startswith(".hs-")], argv


@pytest.mark.parametrize("bad", [{}, [], None, True, float("inf")])
def test_cogqa_fields_must_be_text_or_numbers(tmp_path, bad):
    """Found by the fuzzer: a dict as a cognitive skill became the label "{}"; now refused, naming the field."""
    sub = {"subquestion": "What is 2+2?", "answer": 4, "cognitive_skill": bad}
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"question": "Q?", "answer": "A", "generated": [sub]}]))
    with pytest.raises(HeadscoreError, match="question 0, sub-question 0: field 'cognitive_skill' must be text"):
        load_tasks(f"cogqa:{path}")


@pytest.mark.parametrize("arg", ["\ud800", "a\x00b"])
def test_arguments_no_file_name_can_hold(arg, capsys):
    """Found by the fuzzer: ``compare '\\ud800' x`` raised UnicodeEncodeError from a stat; now one line."""
    assert main(["compare", arg, "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("headscore: error: argument '") and "holds a NUL or a lone surrogate" in err, err
    with pytest.raises(HeadscoreError, match="no file can have this name"):
        HeadScores.load(arg)


@pytest.mark.parametrize("argv", [["intervene", "--scores", "a.hs", "--out", ""],
                                  ["compare", "a.hs", "a.hs", "--json", ""], ["report", "a.hs", "--out", ""]])
def test_empty_output_names(argv, workdir, monkeypatch, capsys):
    """Found by the long fuzz run: ``intervene --out ''`` raised ValueError from ``Path.with_suffix``."""
    monkeypatch.chdir(workdir)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("headscore: error: ") and err.count("\n") == 1 and ("empty" in err or "names no" in err), err


def test_an_os_error_about_a_typed_path_is_one_line(capsys, tmp_path):
    """Found by the long fuzz run: ``reproduce-cogqa`` with a 300-byte PATH raised ``OSError: File name too
    long`` from ``Path.is_dir``; an OS error naming a path the user typed is bad input, one line."""
    long_name = str(tmp_path / ("a" * 300))
    assert main(["reproduce-cogqa", long_name, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("headscore: error: ") and "File name too long" in err and err.count("\n") == 1, err
