"""Output paths, checked before any work starts: never an input, never two outputs in one place, writable.

A run that takes an hour must not find at its end that its output cannot be written, nor
overwrite the file it read its examples from. :func:`check_outputs` is called with every
output and input a command names (``label`` is how the user named it, e.g. ``--out``) and
raises :class:`~headscore.errors.HeadscoreError` with one line when

- an output is also an input (the same file, through any path or hard link), or an input
  lies inside an output directory under a name the command writes there;
- two outputs are the same file (``--checkpoint`` equal to ``--out``);
- an output file's path is a directory or not a regular file, an output directory's
  path is a file;
- the place an output goes cannot be written (probed by creating and removing an empty
  temporary file, so read-only mounts and permissions are caught alike).

It creates nothing that outlives the call.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HeadscoreError

PathLike = str | os.PathLike


@dataclass(frozen=True)
class OutputDir:
    """An output directory and the file names a command writes into it (to check against the inputs)."""

    label: str
    path: PathLike
    writes: tuple[str, ...] = field(default=())


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name one file (resolved paths, or one inode where both exist)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        try:
            return os.path.samefile(pa, pb)
        except OSError:
            pass
    return _resolved(pa) == _resolved(pb)


def _probe_writable(directory: Path, label: str, shown: PathLike) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".headscore-write-check-", dir=directory)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise HeadscoreError(f"{label} {shown}: cannot write in {directory} ({reason})") from None
    os.close(fd)
    os.unlink(tmp)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(label: str, path: PathLike) -> None:
    """``path`` can be written as a file: its directory exists and is writable, it is no directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise HeadscoreError(f"{label} {path} is a directory; give a file name")
    if p.exists() and not p.is_file():
        raise HeadscoreError(f"{label} {path} exists and is not a regular file")
    parent = _resolved(p).parent
    if not parent.is_dir():
        raise HeadscoreError(f"{label} {path}: directory {parent} does not exist")
    _probe_writable(parent, label, path)


def check_output_dir(label: str, path: PathLike) -> None:
    """``path`` is (or can be created as) a writable directory."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise HeadscoreError(f"{label} {path} exists and is not a directory")
    base = _nearest_existing(_resolved(p))
    if not base.is_dir():
        raise HeadscoreError(f"{label} {path}: {base} is not a directory")
    _probe_writable(base, label, path)


def check_outputs(files: Iterable[tuple[str, PathLike | None]] = (), dirs: Sequence[OutputDir] = (),
                  inputs: Iterable[tuple[str, PathLike | None]] = (),
                  input_dirs: Iterable[tuple[str, PathLike | None]] = ()) -> None:
    """Refuse, before any work, outputs that would overwrite an input, collide, or cannot be written.

    Args:
        files: (label, path) of each output file; ``None`` paths are skipped.
        dirs: output directories with the file names written into them.
        inputs: (label, path) of each input file (a path that does not exist is no input).
        input_dirs: (label, directory) of inputs that are directories (a model): no output
            may be an existing file inside them.
    """
    files = [(label, p) for label, p in files if p is not None]
    inputs = [(label, p) for label, p in inputs if p is not None and Path(p).expanduser().is_file()]
    input_dirs = [(label, _resolved(p)) for label, p in input_dirs if p is not None and Path(p).expanduser().is_dir()]
    for i, (label, out) in enumerate(files):
        for in_label, src in inputs:
            if same_file(out, src):
                raise HeadscoreError(f"{label} {out} is the input file of {in_label}; choose another output name")
        for in_label, src_dir in input_dirs:
            target = _resolved(out)
            if target.is_file() and src_dir in target.parents:
                raise HeadscoreError(f"{label} {out} is a file of the {in_label} directory {src_dir}; "
                                     "choose another output name")
        for other_label, other in files[:i]:
            if same_file(out, other):
                raise HeadscoreError(f"{label} and {other_label} are the same file ({out}); give each its own")
    for d in dirs:
        for name in d.writes:
            target = Path(d.path) / name
            for in_label, src in inputs:
                if same_file(target, src):
                    raise HeadscoreError(f"{d.label} {d.path} would overwrite {target}, the input of {in_label}; "
                                         "choose another output directory")
        for label, out in files:
            if any(same_file(out, Path(d.path) / name) for name in d.writes):
                raise HeadscoreError(f"{label} {out} is also written by {d.label} {d.path}; give each its own")
    for label, out in files:
        check_output_file(label, out)
    for d in dirs:
        check_output_dir(d.label, d.path)
