"""``HeadScores``: a [tasks, layers, heads] importance map with its provenance, saved as one file."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checksum import ChecksumError, checksummed, read_checked
from .edge_maps import EdgeMaps
from .errors import HeadscoreError
from .output_files import atomic_write
from .text import lone_surrogate, printable

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of headscore, torch and transformers, recorded with every result."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("headscore", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def data_hash(rows: Iterable[tuple[str, ...]]) -> str:
    """SHA-256 (first 16 hex digits) of the examples, so results can be matched to their data."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(list(row)).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _plain(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Detached CPU copies (values that track gradients or sit on a GPU convert to NumPy)."""
    return tuple(t.detach().cpu() for t in tensors)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with a copy of each one whose memory another already uses (safetensors refuses shared memory:
    ``HeadScores(v, v, ...)`` is a valid object)."""
    seen: set[tuple] = set()
    out = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.device) if t.numel() else None
        out[name] = t.clone() if key in seen else t
        if key is not None:
            seen.add(key)
    return out


def _non_text_key(value: object) -> object | None:
    """A dict key anywhere in ``value`` that is not a string (the first found), else None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return key
            found = _non_text_key(item)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for item in value:
            found = _non_text_key(item)
            if found is not None:
                return found
    return None


def whole_at_least(value: object, minimum: int, what: str) -> int:
    """``value`` when it is a whole number (an int, not a bool) of at least ``minimum``; else HeadscoreError
    ``"{what} >= {minimum} (a whole number), got {value!r}"`` (``what``: e.g. ``"compare needs k"``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HeadscoreError(f"{what} >= {minimum} (a whole number), got {value!r}")
    return value


def _nan_as_null(value: object) -> object:
    """``value`` (JSON-like: dicts, lists, tuples, numbers, text) with every non-finite float as None. Written
    with ``map`` rather than comprehensions, so it reaches as deep as :mod:`json` itself does."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return dict(zip(value, map(_nan_as_null, value.values()), strict=True))
    if isinstance(value, (list, tuple)):
        return list(map(_nan_as_null, value))
    return value


def json_bytes(doc: object, *, default: Callable[[object], object] | None = None) -> bytes:
    """``doc`` as indented UTF-8 JSON with every non-finite number (NaN: a head its layer does not have, a
    standard error of one example, an undefined correlation; +-inf) written as null: JSON (RFC 8259) has no NaN
    or Infinity, and strict parsers (JavaScript's ``JSON.parse``) refuse Python's bare ``NaN``. Dumped with
    ``allow_nan=False``, so none slips through (every JSON file headscore writes uses it). ``default``: as
    :func:`json.dumps`'s, for values JSON has no form for."""
    return json.dumps(_nan_as_null(doc), indent=1, allow_nan=False, default=default).encode()


def _has_lone_surrogate(value: object) -> bool:
    """Whether a JSON-like value holds a string with a lone surrogate (JSON allows it; UTF-8 cannot write it)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if lone_surrogate(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _examples_problem(values: torch.Tensor | None, tasks: torch.Tensor | None, shape: tuple[int, ...]) -> str:
    """Why per-example values do not fit maps of ``shape`` [T, L, H] ('' when they do or are absent)."""
    if values is None and tasks is None:
        return ""
    if values is None or tasks is None:
        return "example_values and example_tasks come together"
    if values.dim() != 3 or tuple(values.shape[1:]) != shape[1:] or not values.is_floating_point():
        return f"example_values must be float [N, {shape[1]}, {shape[2]}], got {values.dtype} {list(values.shape)}"
    if tasks.shape != (values.shape[0],) or tasks.is_floating_point():
        return f"example_tasks must be integers, one per example, got {tasks.dtype} {list(tasks.shape)}"
    if len(tasks) and (int(tasks.min()) < 0 or int(tasks.max()) >= shape[0]):
        return "example_tasks must index the task rows"
    return ""


def _positions_problem(names: list[str] | None, values: torch.Tensor | None, stderr: torch.Tensor | None,
                       counts: torch.Tensor | None, shape: tuple[int, ...]) -> str:
    """Why per-position maps do not fit maps of ``shape`` [T, L, H] ('' when they do or are absent)."""
    given = [x is not None for x in (names, values, stderr, counts)]
    if not any(given):
        return ""
    if not all(given):
        return "positions, position_values, position_stderr and position_counts come together"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return "positions must be distinct strings"
    want = (*shape, len(names))
    if tuple(values.shape) != want or not values.is_floating_point():
        return f"position_values must be float {list(want)}, got {values.dtype} {list(values.shape)}"
    if stderr.shape != values.shape:
        return f"position_stderr is {list(stderr.shape)}, position_values {list(values.shape)}"
    if tuple(counts.shape) != (shape[0], len(names)) or counts.is_floating_point():
        return f"position_counts must be integers [tasks, positions], got {counts.dtype} {list(counts.shape)}"
    return ""


def _exact_problem(exact: torch.Tensor | None, shape: tuple[int, ...]) -> str:
    """Why an exact mask does not fit maps of ``shape`` [T, L, H] ('' when it does or is absent)."""
    if exact is None:
        return ""
    if tuple(exact.shape) != tuple(shape) or exact.dtype != torch.bool:
        return f"exact must be a bool mask {list(shape)}, got {exact.dtype} {list(exact.shape)}"
    return ""


_POSITION_TENSORS = ("position_values", "position_stderr", "position_counts")


def _csv_bytes(columns: list[str], rows: list[dict], exact: bool) -> bytes:
    """CSV of ``rows`` with a header of ``columns`` (and ``exact`` last, when the values carry an exact mask)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns + (["exact"] if exact else []))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


@dataclass
class HeadScores:
    """Importance of every attention head for every task.

    Attributes:
        values: float64 [T, L, H]; larger = more important (for ``taylor`` and ablation it
            estimates / measures the loss increase when the head is removed).
        stderr: float64 [T, L, H], standard error of each value over the task's examples.
        counts: int64 [T], examples per task.
        tasks: task names, in the order of the first axis.
        method: how the values were made (``taylor``, ``abs``, ``fisher``, ``atp-mean``,
            ``ablation-zero``, ``ablation-mean``, ``probe``).
        model: the model's name.
        data_hash: hash of the examples (see :func:`data_hash`).
        versions: library versions that produced it.
        extra: free-form metadata (JSON-serialisable).
        example_values: optional float32 [N, L, H], each example's own value (what ``values``
            averages by task), kept for bootstrap intervals over examples.
        example_tasks: int64 [N], each kept example's row in ``tasks`` (with ``example_values``).
        positions: for per-position maps, the position names (see :mod:`headscore.positions`:
            ``end`` = the last prompt token, ``end-1`` the one before, ``end+1`` the first target token).
        position_values: float64 [T, L, H, P], each head's value at each position (mean over the
            task's examples; summed over positions it is ``values``).
        position_stderr: float64 [T, L, H, P], standard errors of ``position_values``.
        position_counts: int64 [T, P], how many of the task's examples have a token at each position.
        exact: optional bool [T, L, H]; True where the value is exact (measured by ablation or
            patching), False where it is an estimate (a verified run: an estimator scores every head,
            exact ablation then replaces some heads' values). None: no claim either way (every file
            made before the mask existed, and every ordinary run). :meth:`select` and
            ``dataclasses.replace`` keep it; maps derived across tasks (e.g.
            :func:`headscore.cogqa.findings.specificity`) and results rebuilt from accumulators drop
            it, as no value of theirs is a single head's measurement.
        edge_maps: optional :class:`~headscore.edge_maps.EdgeMaps`, edge scores of every task (``score(...,
            edges=True)``; see :meth:`edges` and :attr:`edge_nodes`).
    """

    values: torch.Tensor
    stderr: torch.Tensor
    counts: torch.Tensor
    tasks: list[str]
    method: str
    model: str
    data_hash: str = ""
    versions: dict[str, str] = field(default_factory=library_versions)
    extra: dict = field(default_factory=dict)
    example_values: torch.Tensor | None = None
    example_tasks: torch.Tensor | None = None
    positions: list[str] | None = None
    position_values: torch.Tensor | None = None
    position_stderr: torch.Tensor | None = None
    position_counts: torch.Tensor | None = None
    exact: torch.Tensor | None = None
    edge_maps: EdgeMaps | None = None

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    def _problem(self) -> str:
        """Why these fields make no scores file ('' when they do): the one set of checks that construction and
        :meth:`load` both make, so that whatever can be built can be saved and loaded back."""
        text = {"tasks": self.tasks, "positions": self.positions, "extra": self.extra, "versions": self.versions,
                "method": self.method, "model": self.model, "data_hash": self.data_hash}
        for key, kind in (("method", str), ("model", str), ("data_hash", str), ("versions", dict), ("extra", dict)):
            if not isinstance(text[key], kind):
                return f"{key!r} must be a {'string' if kind is str else 'dict'}, got {type(text[key]).__name__}"
        try:
            json.dumps([self.extra, self.versions])
        except (TypeError, ValueError, RecursionError) as exc:
            return f"'extra' and 'versions' must hold JSON values only ({exc})"
        key = _non_text_key([self.extra, self.versions])
        if key is not None:  # JSON would write it as text: a load gives another dict (1 and '1' would merge)
            return f"'extra' and 'versions' must have text keys only, got {type(key).__name__} {key!r:.40}"
        bad_text = next((key for key, value in text.items() if _has_lone_surrogate(value)), None)
        if bad_text:
            return f"metadata {bad_text!r} holds a lone surrogate (\\ud800-\\udfff), which is no valid text"
        tasks, values, stderr, counts = self.tasks, self.values, self.stderr, self.counts
        if not all(isinstance(t, str) for t in tasks) or len(set(tasks)) != len(tasks):
            return "'tasks' must be distinct strings"
        if values.dim() != 3 or not values.is_floating_point():
            return f"values must be a float [tasks, layers, heads] tensor, got {values.dtype} {list(values.shape)}"
        if stderr.shape != values.shape:
            return f"stderr is {list(stderr.shape)}, values {list(values.shape)}"
        if counts.shape != (values.shape[0],) or counts.is_floating_point():
            return f"counts must be integers, one per task row, got {counts.dtype} {list(counts.shape)}"
        if len(counts) and int(counts.min()) < 0:
            return f"counts must not be negative, got {int(counts.min())}"
        if len(tasks) != values.shape[0]:
            return f"{len(tasks)} task names for {values.shape[0]} rows of values"
        shape = tuple(values.shape)
        return _examples_problem(self.example_values, self.example_tasks, shape) or \
            _positions_problem(self.positions, self.position_values, self.position_stderr, self.position_counts,
                               shape) or _exact_problem(self.exact, shape) or self._edges_problem()

    def _edges_problem(self) -> str:
        if self.edge_maps is None:
            return ""
        kept = None if self.example_values is None else int(self.example_values.shape[0])
        return self.edge_maps.problem(len(self.tasks), kept)

    @property
    def has_edges(self) -> bool:
        """Whether edge scores are present (``score(..., edges=True)``)."""
        return self.edge_maps is not None

    @property
    def edges_only(self) -> bool:
        """Whether only the edges were measured (exact edge patching: ``ablate --edges``; every head value NaN)."""
        return self.has_edges and bool(self.values.isnan().all())

    @property
    def edge_nodes(self) -> tuple[list[str], list[str]]:
        """(upstream, downstream) node names of the edge scores, e.g. ``["emb", "L0.H0", ..., "L0.mlp", ...]``
        and ``["L0.H0.q", ..., "L0.KV0.k", ..., "L0.mlp", ..., "logits"]`` (HeadscoreError without edges)."""
        maps = self._edges()
        return list(maps.upstream), list(maps.downstream)

    def edges(self, task: str) -> torch.Tensor:
        """The dense float64 [upstream, downstream] edge scores of one task, NaN where no edge exists."""
        maps = self._edges()
        try:
            return maps.values[self.tasks.index(task)]
        except ValueError:
            raise HeadscoreError(f"no task {task!r}; tasks are {', '.join(self.tasks)}") from None

    def _edges(self) -> EdgeMaps:
        if self.edge_maps is None:
            raise HeadscoreError("these scores have no edge scores (score with edges=True, or --edges)")
        return self.edge_maps

    @property
    def has_exact(self) -> bool:
        """Whether the scores say which values are exact (see ``exact``)."""
        return self.exact is not None

    def exact_counts(self) -> list[int] | None:
        """Per task, how many heads have an exact value (None without an ``exact`` mask)."""
        return None if self.exact is None else [int(n) for n in self.exact.sum((1, 2))]

    @property
    def has_positions(self) -> bool:
        """Whether per-position maps are present."""
        return self.positions is not None

    def position_map(self, name: str) -> torch.Tensor:
        """The [L, H, P] per-position map of one task (HeadscoreError without per-position maps)."""
        if self.position_values is None:
            raise HeadscoreError("these scores have no per-position maps (score with per_position=True)")
        try:
            return self.position_values[self.tasks.index(name)]
        except ValueError:
            raise HeadscoreError(f"no task {name!r}; tasks are {', '.join(self.tasks)}") from None

    @property
    def has_examples(self) -> bool:
        """Whether per-example values are kept (bootstrap intervals over examples are possible)."""
        return self.example_values is not None

    @property
    def num_layers(self) -> int:
        """Number of layers (L)."""
        return int(self.values.shape[1])

    @property
    def num_heads(self) -> int:
        """Number of heads per layer (H)."""
        return int(self.values.shape[2])

    def task(self, name: str) -> torch.Tensor:
        """The [L, H] map of one task."""
        try:
            return self.values[self.tasks.index(name)]
        except ValueError:
            raise HeadscoreError(f"no task {name!r}; tasks are {', '.join(self.tasks)}") from None

    def top_k(self, k: int = 10, task: str | None = None) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest value as (layer, head, value), for one task or the mean over tasks;
        NaN (a head its layer does not have) last, ties in head order (layer, then head), as the report ranks."""
        whole_at_least(k, 1, "top_k needs k")
        grid = (self.values.mean(0) if task is None else self.task(task)).flatten()
        k = min(k, grid.numel())
        from .frames import rank_order

        idx = rank_order(grid)[:k]
        return [(int(i) // self.num_heads, int(i) % self.num_heads, float(grid[i])) for i in idx]

    def select(self, tasks: Sequence[str]) -> HeadScores:
        """A copy restricted to ``tasks`` (in that order)."""
        rows = [self.tasks.index(t) for t in tasks]
        ex_values = ex_tasks = keep = None
        if self.example_values is not None:
            new_row = torch.full((len(self.tasks),), -1, dtype=torch.int64)
            new_row[rows] = torch.arange(len(rows))
            keep = new_row[self.example_tasks] >= 0
            ex_values, ex_tasks = self.example_values[keep], new_row[self.example_tasks[keep]]
        pos = (None,) * 4 if self.positions is None else (
            list(self.positions), self.position_values[rows], self.position_stderr[rows], self.position_counts[rows])
        return HeadScores(self.values[rows], self.stderr[rows], self.counts[rows], list(tasks), self.method,
                          self.model, self.data_hash, dict(self.versions), dict(self.extra), ex_values, ex_tasks,
                          *pos, exact=None if self.exact is None else self.exact[rows],
                          edge_maps=None if self.edge_maps is None else self.edge_maps.select(rows, keep))

    def _repr_html_(self) -> str:
        """A notebook's view: method, model, shape, examples, exact heads, the heatmap grid (one small PNG per
        task on one colour scale) and a table of tasks (:func:`headscore.display.scores_html`)."""
        from .display import scores_html

        return scores_html(self)

    def plot(self, task: str | None = None, ax: Any = None, *, positions: bool = False) -> Figure:
        """A matplotlib Figure: the heatmap grid of every task (``task=None``), of one task, or that task drawn on
        the matplotlib axes ``ax`` (with its own colour bar; ``ax.figure`` is returned). ``positions=True``: the
        head x position maps instead (per-position scores; no ``ax``)."""
        from .display import plot_scores

        return plot_scores(self, task, ax, positions=positions)

    def to_pandas(self, kind: str = "heads") -> pd.DataFrame:
        """A long-form pandas DataFrame (needs pandas: ``pip install 'headscore[notebook]'``).

        ``kind="heads"``: one row per task, layer and head: task, layer, head, score, stderr, count, rank (within
        the task, 1 = largest, NaN last, as :meth:`top_k`), and exact when the scores have an ``exact`` mask.
        ``"positions"``: one row per task, layer, head and position of the per-position maps: ..., position,
        score, stderr, count (examples with a token there), rank (within task and position).
        ``"examples"``: one row per kept example, layer and head: example, task, layer, head, score, rank
        (within the example). The frame's ``attrs`` hold method, model and data_hash; :meth:`from_pandas`
        reads a ``"heads"`` frame back.
        """
        from . import frames

        if kind == "heads":
            df = frames.heads_frame(*_plain(self.values, self.stderr, self.counts), self.tasks, self.exact)
        elif kind == "positions":
            if self.positions is None:
                raise HeadscoreError("these scores have no per-position maps (score with per_position=True)")
            df = frames.positions_frame(*_plain(self.position_values, self.position_stderr, self.position_counts),
                                        self.tasks, self.positions)
        elif kind == "examples":
            if self.example_values is None:
                raise HeadscoreError("these scores keep no per-example values")
            df = frames.examples_frame(*_plain(self.example_values, self.example_tasks), self.tasks)
        else:
            raise HeadscoreError(f"to_pandas: unknown kind {kind!r}; choose one of {', '.join(frames.KINDS)}")
        df.attrs.update(method=self.method, model=self.model, data_hash=self.data_hash)
        return df

    @classmethod
    def from_pandas(cls, df: pd.DataFrame, *, method: str | None = None, model: str | None = None) -> HeadScores:
        """Scores from a frame of :meth:`to_pandas` (``kind="heads"``) or one like it: columns task, layer,
        head, score; optionally stderr (else NaN), count (else 0) and exact. ``method`` and ``model`` default
        to the frame's ``attrs`` (which :meth:`to_pandas` sets); ``from_pandas(s.to_pandas())`` equals ``s`` in
        values, stderr, counts, tasks and exact."""
        from .frames import heads_from_frame

        fields = heads_from_frame(df)
        attrs = getattr(df, "attrs", {})
        named = {"method": method if method is not None else attrs.get("method"),
                 "model": model if model is not None else attrs.get("model")}
        for key, value in named.items():
            if not isinstance(value, str):
                raise HeadscoreError(f"from_pandas needs {key}= (the frame's attrs do not say)")
        return cls(fields["values"], fields["stderr"], fields["counts"], fields["tasks"], named["method"],
                   named["model"], str(attrs.get("data_hash", "")), exact=fields["exact"])

    def _metadata(self) -> dict[str, str]:
        meta = {"format": f"headscore/{FORMAT_VERSION}", "tasks": json.dumps(self.tasks), "method": self.method,
                "model": self.model, "data_hash": self.data_hash, "versions": json.dumps(self.versions),
                "extra": json.dumps(self.extra)}
        if self.positions is not None:
            meta["positions"] = json.dumps(self.positions)
        if self.edge_maps is not None:
            meta.update(self.edge_maps.metadata())
        return meta

    def to_bytes(self) -> bytes:
        """The scores file's bytes: safetensors with the metadata and a checksum (see :mod:`headscore.checksum`)."""
        tensors = {"values": self.values.contiguous(), "stderr": self.stderr.contiguous(),
                   "counts": self.counts.contiguous()}
        if self.example_values is not None:
            tensors["example_values"] = self.example_values.contiguous()
            tensors["example_tasks"] = self.example_tasks.contiguous()
        if self.positions is not None:
            for key in _POSITION_TENSORS:
                tensors[key] = getattr(self, key).contiguous()
        if self.exact is not None:
            tensors["exact"] = self.exact.contiguous()
        if self.edge_maps is not None:
            tensors.update(self.edge_maps.tensors())
        return checksummed(_unshared(tensors), self._metadata())

    def save(self, path: str | Path) -> Path:
        """Write everything to one safetensors file (atomically); :meth:`load` reads it back exactly."""
        return atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> HeadScores:
        """Read a file written by :meth:`save`; HeadscoreError (naming the file and the problem) otherwise.

        The file's checksum is verified (files written before checksums existed load without one).
        """
        path = Path(path)
        try:
            if path.is_dir():
                raise HeadscoreError(f"{path} is a directory, not a scores file")
            meta, tensors = read_checked(path)
        except ChecksumError as exc:
            raise HeadscoreError(f"{path}: not a headscore scores file, or a damaged one ({exc})") from None
        except FileNotFoundError:
            raise HeadscoreError(f"{path}: no such file") from None
        except OSError as exc:
            raise HeadscoreError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
        except ValueError:  # a NUL or a lone surrogate in the name: no file can have it
            raise HeadscoreError(f"{printable(str(path))}: no file can have this name") from None
        if not meta.get("format", "").startswith("headscore/"):
            raise HeadscoreError(f"{path}: not a headscore scores file")
        missing = [k for k in ("values", "stderr", "counts") if k not in tensors]
        if missing:
            raise HeadscoreError(f"{path}: broken scores file (no tensor {', '.join(missing)})")
        return cls._from_file(path, meta, tensors)

    @classmethod
    def _from_file(cls, path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> HeadScores:
        def fail(reason: str) -> HeadscoreError:
            return HeadscoreError(f"{path}: broken scores file ({reason})")

        fields: dict[str, object] = {}
        for key, kind, required in (("tasks", list, True), ("versions", dict, False), ("extra", dict, False),
                                    ("positions", list, False)):
            if key not in meta:
                if required:
                    raise fail(f"no {key!r} in its metadata")
                fields[key] = kind()
                continue
            try:
                fields[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                raise fail(f"metadata {key!r} is not JSON") from None
            except RecursionError:
                raise fail(f"metadata {key!r} is JSON nested too deep") from None
            if not isinstance(fields[key], kind):
                raise fail(f"metadata {key!r} is not a JSON {kind.__name__}")
        for key in ("method", "model"):
            if key not in meta:
                raise fail(f"no {key!r} in its metadata")
        try:
            edge_maps = EdgeMaps.from_file(meta, tensors)
            return cls(tensors["values"], tensors["stderr"], tensors["counts"], fields["tasks"], meta["method"],
                       meta["model"], meta.get("data_hash", ""), fields["versions"], fields["extra"],
                       tensors.get("example_values"), tensors.get("example_tasks"),
                       fields["positions"] if "positions" in meta else None,
                       *(tensors.get(k) for k in _POSITION_TENSORS), exact=tensors.get("exact"), edge_maps=edge_maps)
        except ValueError as exc:  # what __post_init__ (:meth:`_problem`) or the edge metadata refuses
            raise fail(str(exc)) from None

    def to_rows(self) -> list[dict]:
        """One dict per (task, layer, head): task, layer, head, value, stderr, count, and ``exact`` (a bool)
        when the scores have an exact mask."""
        rows = []
        for t, name in enumerate(self.tasks):
            for layer in range(self.num_layers):
                for head in range(self.num_heads):
                    row = {"task": name, "layer": layer, "head": head, "value": float(self.values[t, layer, head]),
                           "stderr": float(self.stderr[t, layer, head]), "count": int(self.counts[t])}
                    if self.exact is not None:
                        row["exact"] = bool(self.exact[t, layer, head])
                    rows.append(row)
        return rows

    def to_csv(self, path: str | Path) -> Path:
        """Write :meth:`to_rows` as CSV (atomically)."""
        return atomic_write(path, self.export_bytes(".csv"))

    def to_json(self, path: str | Path) -> Path:
        """Write metadata and nested [task][layer][head] values as JSON (atomically); per-position maps too
        ([task][layer][head][position], with the position names and counts) and the ``exact`` mask
        ([task][layer][head] booleans) when present. Every number that is not finite (a head its layer does not
        have, the standard error of a task with one example) is written as null (:func:`json_bytes`)."""
        return atomic_write(path, self.export_bytes(".json"))

    def export_bytes(self, suffix: str) -> bytes:
        """The bytes :meth:`export` writes for a file name ending in ``suffix`` (``.csv`` or ``.json``)."""
        suffix = suffix.lower()
        if suffix == ".csv":
            return _csv_bytes(["task", "layer", "head", "value", "stderr", "count"], self.to_rows(), self.has_exact)
        if suffix == ".json":
            doc = {"method": self.method, "model": self.model, "tasks": self.tasks, "data_hash": self.data_hash,
                   "versions": self.versions, "extra": self.extra, "counts": self.counts.tolist(),
                   "values": self.values.tolist(), "stderr": self.stderr.tolist()}
            if self.positions is not None:
                doc.update(positions=self.positions, position_values=self.position_values.tolist(),
                           position_stderr=self.position_stderr.tolist(),
                           position_counts=self.position_counts.tolist())
            if self.exact is not None:
                doc["exact"] = self.exact.tolist()
            if self.edge_maps is not None:
                doc["edges"] = self.edge_maps.as_json()
            return json_bytes(doc)
        raise HeadscoreError(f"export needs a .csv or .json file name, not {suffix or 'no suffix'}")

    def export(self, path: str | Path) -> Path:
        """Write CSV or JSON by the file's suffix."""
        suffix = Path(path).suffix.lower()
        if suffix not in (".csv", ".json"):
            raise HeadscoreError(f"{path}: export needs a .csv or .json file name")
        return atomic_write(path, self.export_bytes(suffix))

    def edge_export_bytes(self, suffix: str) -> bytes:
        """The edge scores as ``.csv`` (one row per task and existing edge: task, upstream, downstream, value,
        stderr, count, and exact with a mask) or ``.json`` (provenance and [task][upstream][downstream] values,
        null where no edge exists or a number is not finite: :func:`json_bytes`)."""
        maps, suffix = self._edges(), suffix.lower()
        if suffix == ".csv":
            return _csv_bytes(["task", "upstream", "downstream", "value", "stderr", "count"],
                              maps.rows(self.tasks, self.counts), maps.exact is not None)
        if suffix == ".json":
            doc = {"method": self.method, "model": self.model, "tasks": self.tasks, "data_hash": self.data_hash,
                   "versions": self.versions, "counts": self.counts.tolist(), **maps.as_json()}
            return json_bytes(doc)
        raise HeadscoreError(f"edge export needs a .csv or .json file name, not {suffix or 'no suffix'}")

    def export_edges(self, path: str | Path) -> Path:
        """Write the edge scores as CSV or JSON by the file's suffix (see :meth:`edge_export_bytes`)."""
        return atomic_write(path, self.edge_export_bytes(Path(path).suffix))
