"""What several commands share: model and task options, checked numbers, output checks, printing."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..data.examples import Example, did_you_mean
from ..data.tables import FIELDS
from ..data.tasks import load_tasks, task_source
from ..errors import HeadscoreError
from ..models import DEFAULT_MODEL, DTYPES, EMBEDDED_MODELS, LoadedModel, cache_dir, check_device, load_model
from ..output_files import OutputSet
from ..output_paths import OutputDir, check_outputs
from ..results import HeadScores
from ..text import printable

EXPORT_SUFFIXES = (".csv", ".json")


def at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``; a one-line usage error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


MAX_THREADS = 65536
"""The most torch CPU threads ``--threads`` takes (torch refuses numbers past a C int with a traceback)."""


def load_head_scores(path: str, label: str) -> HeadScores:
    """The scores file at ``path`` for a use that reads its head values; an exact edge-patching file (``ablate
    --edges``: every head value NaN) is refused naming ``label``."""
    scores = HeadScores.load(path)
    if scores.edges_only:
        raise HeadscoreError(f"{label} {path} holds exact edge values only (ablate --edges), no head values: give "
                             "a file of head scores")
    return scores


MAX_SEED = 2**63 - 1
"""The largest seed every random generator headscore seeds takes (torch's takes 64-bit integers)."""


def seed_value(text: str) -> int:
    """An argparse type: a seed, a whole number from 0 to :data:`MAX_SEED`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED} (2**63 - 1), got {text}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a finite number (not inf or nan, which would reach the loss as a NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def open_fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    value = finite_float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def fraction_up_to_one(text: str) -> float:
    """An argparse type: a number above 0 and at most 1 (a faithfulness to reach: 1 = the whole model's)."""
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def device_name(text: str) -> str:
    """An argparse type: a torch device that can hold the model here (see :func:`headscore.models.check_device`),
    checked before anything loads; the text is kept as given."""
    try:
        check_device(text)
    except HeadscoreError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def column_map(text: str) -> dict[str, str]:
    """An argparse type: ``FIELD=COLUMN[,FIELD=COLUMN...]``, the table's column for each field named otherwise,
    e.g. ``prompt=question,target=answer``."""
    mapping: dict[str, str] = {}
    for part in text.split(","):
        field, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not field or not column:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not FIELD=COLUMN (e.g. prompt=question)")
        if field not in FIELDS:
            raise argparse.ArgumentTypeError(f"unknown field {field!r}{did_you_mean(field, FIELDS)} (the fields are "
                                             f"{', '.join(FIELDS)})")
        if field in mapping:
            raise argparse.ArgumentTypeError(f"field {field!r} is named twice")
        mapping[field] = column
    return mapping


def add_interval_args(parser: argparse.ArgumentParser) -> None:
    """``--resamples``, ``--level`` and ``--seed`` of the bootstrap intervals over examples."""
    parser.add_argument("--resamples", type=at_least(0), default=1000,
                        help="bootstrap resamples of the examples for the intervals (default 1000; 0 = none)")
    parser.add_argument("--level", type=open_fraction, default=0.95,
                        help="confidence level of the intervals (default 0.95)")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the resampling (default 0; 0 to 2**63 - 1)")


def interval_options(args: argparse.Namespace) -> dict:
    """The keyword options of :func:`headscore.intervals.agreement_table` from :func:`add_interval_args` (and
    ``--no-progress``)."""
    return {"resamples": args.resamples, "level": args.level, "seed": args.seed,
            "progress": not getattr(args, "no_progress", False)}


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """``--tasks`` and ``--max-examples``."""
    parser.add_argument("--tasks", default="builtin",
                        help="examples: 'builtin' (the built-in suite, default), 'ioi', 'cogqa:PATH' (a CogQA JSON "
                             'file), a JSONL file of {"prompt", "target", "task"} objects, or a .csv or .parquet '
                             "file or a datasets save_to_disk directory with those columns")
    parser.add_argument("--columns", type=column_map, default=None, metavar="FIELD=COLUMN[,...]",
                        help="for a .csv/.parquet/datasets --tasks: the column of each field named otherwise, e.g. "
                             "prompt=question,target=answer,task=kind")
    parser.add_argument("--max-examples", type=at_least(1), default=None, help="at most this many examples per task")


def add_model_args(parser: argparse.ArgumentParser, *, tasks: bool = True) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--batch-size``, ``--no-progress`` (and the task options)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"{DEFAULT_MODEL} (embedded, default), a local model directory, or a cached hub id")
    parser.add_argument("--device", type=device_name, default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--batch-size", type=at_least(1), default=8, help="examples per forward pass (default: 8)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if tasks:
        add_task_args(parser)


def model_dir(name: str) -> Path | None:
    """The directory a ``--model`` value loads from, where it is one (to keep outputs out of its files)."""
    if name in EMBEDDED_MODELS:
        return cache_dir() / "models" / name
    return Path(name) if Path(name).is_dir() else None


def input_files(args: argparse.Namespace, *extra: tuple[str, str | None]) -> list[tuple[str, str | None]]:
    """(label, path) of the files a command reads: its task file and the extra ones given."""
    tasks = getattr(args, "tasks", None)
    source = task_source(tasks) if tasks else None
    return [("--tasks", None if source is None else str(source)), *extra]


def check_command_outputs(args: argparse.Namespace, files: Iterable[tuple[str, str | None]] = (),
                          dirs: Sequence[OutputDir] = (), inputs: Iterable[tuple[str, str | None]] = ()) -> None:
    """Every output of a command checked against its inputs (task file, model files, ``inputs``), before work."""
    files = list(files)
    for label, path in files:
        if label in ("--export", "--export-edges") and path is not None and \
                Path(path).suffix.lower() not in EXPORT_SUFFIXES:
            raise HeadscoreError(f"{path}: {label} needs a .csv or .json file name")
    model = getattr(args, "model", None)
    check_outputs(files, dirs, inputs=input_files(args, *inputs),
                  input_dirs=[("--model", model_dir(model))] if model else [])


def check_scores_out(path: str | None) -> None:
    """Refuse a scores file (``--out``) named like a table: it would hold the binary .hs format."""
    if path is not None and Path(path).suffix.lower() in EXPORT_SUFFIXES:
        raise HeadscoreError(f"--out {path} is the scores file (.hs, safetensors); for a {Path(path).suffix.lower()} "
                             f"table give --out a .hs name and add --export {path}")


def load_model_and_tasks(args: argparse.Namespace) -> tuple[LoadedModel, list[Example]]:
    """The examples first (bad data fails before a slow model load), then the model."""
    examples = load_tasks(args.tasks, args.columns)
    lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=not args.no_progress)
    return lm, examples


def print_top(scores: HeadScores, k: int = 3) -> None:
    """The ``k`` most important heads of each task, one line per task."""
    for task in scores.tasks:
        top = ", ".join(f"L{layer}.H{head} ({value:+.3g})" for layer, head, value in scores.top_k(k, task))
        print(f"  {printable(task)}: {top}")


def save_scores(scores: HeadScores, out: str, exports: Sequence[str], edge_exports: Sequence[str] = ()) -> None:
    """Write the scores file and its exports (``edge_exports``: the edge scores), all or nothing, then say what
    was written."""
    with OutputSet() as outputs:
        outputs.write(out, scores.to_bytes(), label="--out")
        for path in exports:
            outputs.write(path, scores.export_bytes(Path(path).suffix), label="--export")
        for path in edge_exports:
            outputs.write(path, scores.edge_export_bytes(Path(path).suffix), label="--export-edges")
    n = int(scores.counts.sum())
    heads = f"{scores.num_layers}x{scores.num_heads} heads"
    if scores.has_edges:
        heads += f", {scores.edge_maps.num_edges} edges"
    print(f"{scores.method}: {len(scores.tasks)} tasks, {n} examples, {heads} in "
          f"{scores.extra.get('seconds', 0):.1f}s -> {out}")
    if scores.edges_only:
        print_top_edges(scores)
    else:
        print_top(scores)


def print_top_edges(scores: HeadScores, k: int = 3) -> None:
    """The ``k`` edges with the largest value of each task, one line per task."""
    up, down = scores.edge_nodes
    for task in scores.tasks:
        grid = scores.edges(task)
        flat = grid.nan_to_num(nan=-float("inf")).flatten()
        top = flat.topk(min(k, int((~grid.isnan()).sum()))).indices.tolist()
        shown = ", ".join(f"{up[i // len(down)]} -> {down[i % len(down)]} ({float(flat[i]):+.3g})" for i in top)
        print(f"  {printable(task)}: {shown}")
