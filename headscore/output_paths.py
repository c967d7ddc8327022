"""Output paths, checked before any work starts: never an input, never two outputs in one place, writable.

A run that takes an hour must not find at its end that its output cannot be written, nor
overwrite the file it read its examples from. :func:`check_outputs` is called with every
output and input a command names (``label`` is how the user named it, e.g. ``--out``) and
raises :class:`~headscore.errors.HeadscoreError` with one line when

- an output is also an input (the same file, through any path or hard link), or an input
  lies inside an output directory under a name the command writes there;
- two outputs are the same file (``--checkpoint`` equal to ``--out``);
- the directory an output goes in does not exist (a file's directory, an output directory's parent: the
  output directory itself may be new, but nothing creates a tree from a mistyped name);
- an output file's path is a directory, not a regular file, ends with ``/`` or is a symbolic
  link loop; an output directory's path is a file, a directory holding files the command
  does not write (the output replaces it whole), or the current directory or one above it;
- an existing output cannot be replaced by the rename that ends the write: a mount point (a
  bind-mounted file or directory), or another user's file in a sticky directory such as ``/tmp``;
- the place an output goes cannot be written: probed by creating and removing the same kind of
  temporary the write will use (:mod:`headscore.output_files`), in the directory the write will
  use (symbolic links resolved alike), so read-only mounts, permissions and over-long names are
  caught alike.

It creates nothing that outlives the call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HeadscoreError
from .output_files import check_rename_target, check_replaceable, describe, new_temp_dir, new_temp_file, resolve_output

PathLike = str | os.PathLike


@dataclass(frozen=True)
class OutputDir:
    """An output directory and the file names a command writes into it (to check against the inputs)."""

    label: str
    path: PathLike
    writes: tuple[str, ...] = field(default=())


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _is(path: PathLike, test) -> bool:
    """``test(path)`` (``Path.is_file``, ``Path.is_dir``), False where the path cannot even be looked at."""
    try:
        return test(Path(path).expanduser())
    except OSError:
        return False


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name one file (resolved paths, or one inode where both exist)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        try:
            return os.path.samefile(pa, pb)
        except OSError:
            pass
    return _resolved(pa) == _resolved(pb)


def _probe_writable(directory: Path, label: str, shown: PathLike, *, as_dir: bool = False) -> None:
    """Create and remove the very kind of temporary the write will use (same directory, same name length)."""
    try:
        tmp = new_temp_dir(directory) if as_dir else new_temp_file(directory)
    except OSError as exc:
        raise HeadscoreError(f"{label} {shown}: cannot write in {directory} ({describe(exc)})") from None
    if as_dir:
        tmp.rmdir()
    else:
        tmp.unlink()


def check_output_file(label: str, path: PathLike) -> None:
    """``path`` can be written as a file where the write will put it (links followed): its directory exists
    and takes a temporary file, it is no directory, its name is no longer than the file system allows, and
    a file already there can be replaced by a rename."""
    target = resolve_output(path, label)
    if target.is_dir():
        raise HeadscoreError(f"{label} {path} is a directory; give a file name")
    if target.exists() and not target.is_file():
        raise HeadscoreError(f"{label} {path} exists and is not a regular file")
    if not target.parent.is_dir():
        raise HeadscoreError(f"{label} {path}: directory {target.parent} does not exist")
    check_rename_target(label, path, target)
    _probe_writable(target.parent, label, path)


def check_output_dir(label: str, path: PathLike, owned: Sequence[str] = ()) -> None:
    """``path`` is (or can be created as) a directory that can be replaced whole: it holds nothing but
    ``owned`` files, it is not the current directory nor above it, a rename can replace it, and its parent
    exists and takes a temporary directory. The directory itself may be new; a missing parent is refused, as
    :func:`check_output_file` refuses a file's (a typo in a directory name creates no tree)."""
    target = resolve_output(path, label, directory=True)
    check_replaceable(label, path, target, owned)
    check_rename_target(label, path, target)
    if not target.parent.exists():
        raise HeadscoreError(f"{label} {path}: directory {target.parent} does not exist")
    if not target.parent.is_dir():
        raise HeadscoreError(f"{label} {path}: {target.parent} is not a directory")
    _probe_writable(target.parent, label, path, as_dir=True)


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
    for label, out in files:
        resolve_output(out, label)  # names, links and loops first: every check below may stat the path
    for d in dirs:
        resolve_output(d.path, d.label, directory=True)
    inputs = [(label, p) for label, p in inputs if p is not None and _is(p, Path.is_file)]
    input_dirs = [(label, _resolved(p)) for label, p in input_dirs if p is not None and _is(p, Path.is_dir)]
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
        check_output_dir(d.label, d.path, d.writes)
