"""Writing outputs all or nothing: atomic files, a command's outputs committed together, directories
replaced whole.

Every output is first written to a temporary beside its destination (the same directory, so the final
rename never crosses a file system) under a short name, ``.hs-XXXXXXXX.tmp``, that fits wherever the
destination's own name fits. :class:`OutputSet` gathers a command's outputs and renames them into place
together at the end, with SIGINT, SIGTERM and SIGHUP held back during the renames; if anything fails
first, it removes every temporary and leaves the destinations as they were. A directory output (a report)
is built as a temporary directory and swapped in whole (atomically with Linux's ``renameat2``), so a
reader never sees a mix of two runs.

A write the system refuses (disk full, read-only file system, name too long, a symlink loop, no
permission) raises :class:`OutputWriteError`, a one-line :class:`~headscore.errors.HeadscoreError`.

:func:`resolve_output` is the one place that turns a user's path into the file that will be written
(symbolic links followed, as ``open`` follows them); :mod:`headscore.output_paths` checks the same
resolved path, by creating the same kind of temporary, before any work.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import HeadscoreError

PathLike = str | os.PathLike

TEMP_PREFIX = ".hs-"
TEMP_SUFFIX = ".tmp"
_HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# errors of the disk itself, whatever file they name (a full disk reports no file name on write)
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


class OutputWriteError(HeadscoreError):
    """An output could not be written; nothing was put in its place (earlier files are as they were)."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot write {path}: {reason}; nothing was written (files already there are unchanged)")


def describe(exc: OSError) -> str:
    """A short reason for an OSError: its message, and what the usual ones mean here."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ELOOP:
        return f"{reason} (a symbolic link loop)"
    return reason


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's file-creation mask (read without changing it for longer than two system calls)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file (0o666) or directory (0o777) under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def new_temp_file(directory: PathLike) -> Path:
    """An empty temporary file ``.hs-XXXXXXXX.tmp`` in ``directory`` (OSError if it cannot be made)."""
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=directory)
    os.close(fd)
    return Path(name)


def new_temp_dir(directory: PathLike) -> Path:
    """An empty temporary directory ``.hs-XXXXXXXX.tmp`` in ``directory`` (OSError if it cannot be made)."""
    return Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=directory))


def resolve_output(path: PathLike, label: str = "output", *, directory: bool = False) -> Path:
    """The absolute path an output named ``path`` is written to: symbolic links followed, as ``open`` does.

    Raises HeadscoreError (one line) for an empty name, a file name that ends with ``/`` (unless ``directory``),
    a symbolic link loop, a name longer than the file system allows, or a path through something that is no
    directory.
    """
    text = os.fspath(path)
    if not text:
        raise HeadscoreError(f"{label} is empty; give a {'directory' if directory else 'file'} name")
    if not directory and text.endswith(("/", os.sep)):
        raise HeadscoreError(f"{label} {text} ends with '/', which names a directory; give a file name")
    p = Path(text).expanduser()
    try:
        os.stat(p)
    except FileNotFoundError:
        pass  # a new file, or a link to one: written where the link points
    except OSError as exc:
        raise HeadscoreError(f"{label} {text}: {describe(exc)}") from None
    return Path(os.path.realpath(p))


def foreign_entries(directory: Path, owned: Iterable[str]) -> list[str]:
    """Names in an existing ``directory`` that are not among ``owned`` (what replacing it whole would delete)."""
    if not directory.is_dir():
        return []
    keep = set(owned)
    return sorted(name for name in os.listdir(directory) if name not in keep)


def check_replaceable(label: str, path: PathLike, final: Path, owned: Iterable[str]) -> None:
    """Refuse a directory output that holds files the command does not write (replacing it would lose them)."""
    if final.exists() and not final.is_dir():
        raise HeadscoreError(f"{label} {path} exists and is not a directory")
    foreign = foreign_entries(final, owned)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise HeadscoreError(f"{label} {path} holds other files ({shown}); the output replaces its directory as a "
                             "whole: give a new or empty directory")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk (OSError on failure)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class _Staged:
    tmp: Path
    final: Path
    shown: str
    is_dir: bool

    def install(self) -> None:
        if not self.is_dir:
            os.replace(self.tmp, self.final)
            return
        old = self.final if self.final.is_dir() else None
        os.chmod(self.tmp, (os.stat(old).st_mode & 0o7777) if old else default_mode(directory=True))
        if old is None:
            os.rename(self.tmp, self.final)
        elif _exchange(self.tmp, self.final):
            shutil.rmtree(self.tmp, ignore_errors=True)  # the tmp name now holds the old directory
        else:
            aside = self.final.with_name(self.tmp.name[: -len(TEMP_SUFFIX)] + ".old")
            os.rename(self.final, aside)
            try:
                os.rename(self.tmp, self.final)
            except BaseException:
                os.rename(aside, self.final)  # put the earlier directory back
                raise
            shutil.rmtree(aside, ignore_errors=True)

    def remove(self) -> None:
        if self.is_dir:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self.tmp.unlink()

    def holds(self, path: Path | None) -> bool:
        return path is not None and (path == self.tmp or self.tmp in path.parents)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a file system without exchange: two renames instead
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block ends, then reach their own handlers.

    Only on the main thread (the only one where Python runs signal handlers); elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in _HELD_SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in pending:
            signal.raise_signal(sig)


class OutputSet:
    """The outputs of one command, written all or nothing.

    Use it as a context manager: stage each output with :meth:`write`, :meth:`file` or :meth:`directory`
    (each returns at once; the work happens in a temporary), and leave the block. Without an error the
    outputs are renamed into place together; with one, every temporary is removed and the destinations
    keep what they had. OSErrors of the writes come out as :class:`OutputWriteError` naming the
    destination, not the temporary.
    """

    def __init__(self) -> None:
        self._staged: list[_Staged] = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
            return
        self.discard()
        if isinstance(exc, OutputWriteError):
            raise self._named(exc.path, exc.reason) from None
        if isinstance(exc, OSError):
            where = Path(exc.filename) if isinstance(exc.filename, str) else None
            if exc.errno in _DISK_ERRNOS or any(s.holds(where) for s in self._staged):
                raise self._named(where, describe(exc)) from None

    def _named(self, where: Path | None, reason: str) -> OutputWriteError:
        for staged in self._staged:
            if staged.holds(where):
                return OutputWriteError(staged.shown, reason)
        shown = ", ".join(s.shown for s in self._staged) if self._staged else (where or "the output")
        return OutputWriteError(shown, reason)

    def _stage(self, path: PathLike, label: str, owned: Iterable[str] | None) -> Path:
        is_dir = owned is not None
        final = resolve_output(path, label, directory=is_dir)
        if is_dir:
            check_replaceable(label, path, final, owned)
        elif final.is_dir():
            raise HeadscoreError(f"{label} {path} is a directory; give a file name")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = new_temp_dir(final.parent) if is_dir else new_temp_file(final.parent)
        except OSError as exc:
            raise OutputWriteError(path, describe(exc)) from None
        self._staged.append(_Staged(tmp, final, os.fspath(path), is_dir))
        return tmp

    def file(self, path: PathLike, label: str = "output") -> Path:
        """Stage the file ``path``: returns the temporary to write instead (it exists, empty)."""
        return self._stage(path, label, None)

    def write(self, path: PathLike, data: bytes, label: str = "output") -> Path:
        """Stage the file ``path`` with ``data`` as its content; returns ``path``."""
        tmp = self.file(path, label)
        try:
            write_bytes(tmp, data)
        except OSError as exc:
            raise OutputWriteError(path, describe(exc)) from None
        return Path(path)

    def directory(self, path: PathLike, owned: Iterable[str], label: str = "output") -> Path:
        """Stage the directory ``path``, replaced whole at commit: returns the empty temporary to fill.

        ``owned`` are the names the command writes there; an existing directory holding anything else is
        refused (HeadscoreError), since replacing it would delete those files.
        """
        return self._stage(path, label, tuple(owned))

    def commit(self) -> None:
        """Rename every staged output into place (signals held back meanwhile); the set is empty after."""
        try:
            for staged in self._staged:
                if not staged.is_dir:
                    os.chmod(staged.tmp, default_mode())
            with signals_held():
                for staged in self._staged:
                    staged.install()
        except OSError as exc:
            raise self._named(Path(exc.filename) if isinstance(exc.filename, str) else None,
                              describe(exc)) from None
        for parent in {s.final.parent for s in self._staged}:
            _sync_directory(parent)
        self._staged.clear()

    def discard(self) -> None:
        """Remove every staged temporary; the destinations keep what they had."""
        for staged in reversed(self._staged):
            staged.remove()
        self._staged.clear()


def _sync_directory(directory: Path) -> None:
    """Flush a directory's entries (the renames) to the disk, where the system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a half-written file.

    The file gets the mode a plain ``open(path, "w")`` would give it (the umask is respected); a symbolic
    link at ``path`` is followed. Returns ``Path(path)``. Raises :class:`OutputWriteError` when the system
    refuses the write (the old file, if any, is left as it was).
    """
    with OutputSet() as out:
        out.write(path, data)
    return Path(path)
