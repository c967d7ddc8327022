"""Writing outputs all or nothing: atomic files, a command's outputs committed together, directories
replaced whole.

Every output is first written to a temporary beside its destination (the same directory, so the final
rename never crosses a file system) under a short name, ``.hs-XXXXXXXX.tmp``, that fits wherever the
destination's own name fits. :class:`OutputSet` gathers a command's outputs and renames them into place
together at the end, with SIGINT, SIGTERM and SIGHUP held back during the renames; if anything fails
first, it removes every temporary (and every directory it created) and leaves the destinations as they
were. If a rename fails after others succeeded, those are undone: each earlier destination was kept aside
(swapped with its temporary by Linux's ``renameat2``, else hard-linked or renamed aside) and is put back,
and an output that was new is removed. A directory output (a report) is built as a temporary directory and
swapped in whole (atomically with ``renameat2``), so a reader never sees a mix of two runs.

A destination the final rename could not replace is refused before any work (:func:`check_rename_target`):
a mount point (a bind-mounted file or directory), another user's file in a sticky directory such as
``/tmp``, and (:func:`check_replaceable`) a directory output that is the current working directory or holds
it.

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
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
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
    """An output could not be written; nothing was put in its place (earlier files are as they were), unless
    ``stuck`` names outputs that were written all the same and could not be undone."""

    def __init__(self, path: PathLike, reason: str, stuck: Sequence[str] = ()) -> None:
        self.path, self.reason, self.stuck = Path(path), reason, tuple(stuck)
        outcome = (f"these outputs were written all the same and could not be undone: {', '.join(stuck)}" if stuck
                   else "nothing was written (files already there are unchanged)")
        super().__init__(f"cannot write {path}: {reason}; {outcome}")


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


STALE_TEMP_S = 86400.0
"""A temporary of a write that never finished (a process killed by SIGKILL or a power cut), older than this, is
removed when a later write stages in its directory."""

_TEMPORARY = re.compile(rf"{re.escape(TEMP_PREFIX)}[A-Za-z0-9_]{{8}}\.(tmp|old)")


def remove_stale_temporaries(directory: PathLike) -> list[Path]:
    """Remove this user's temporaries (``.hs-XXXXXXXX.tmp`` files or directories, ``.hs-XXXXXXXX.old``) in
    ``directory`` last changed over :data:`STALE_TEMP_S` ago: what a killed write left (a write in progress
    touches its temporary, and one day is far longer than any write). Returns them; errors are ignored."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not _TEMPORARY.fullmatch(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if info.st_uid != os.geteuid() or now - info.st_mtime <= STALE_TEMP_S:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


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
    """Entries of an existing ``directory`` that the command does not write (what replacing it whole would
    delete): names not among ``owned``, and owned names that are no regular file (a directory is shown with a
    trailing ``/``)."""
    if not directory.is_dir():
        return []
    keep = set(owned)
    with os.scandir(directory) as entries:
        return sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in entries
                      if e.name not in keep or not e.is_file(follow_symlinks=False))


def _current_directory() -> Path | None:
    try:
        return Path(os.getcwd())
    except OSError:  # deleted under us: nothing can be inside it
        return None


def check_replaceable(label: str, path: PathLike, final: Path, owned: Iterable[str]) -> None:
    """Refuse a directory output that holds files the command does not write (replacing it would lose them), or
    that is the current working directory or one above it (replacing it would leave the shell in a deleted one)."""
    here = _current_directory()
    if here is not None and (final == here or final in here.parents):
        raise HeadscoreError(f"{label} {path} is the current directory or holds it; the output replaces its directory "
                             "whole, which would leave the shell in a deleted directory: run from elsewhere or give "
                             "another directory")
    if final.exists() and not final.is_dir():
        raise HeadscoreError(f"{label} {path} exists and is not a directory")
    foreign = foreign_entries(final, owned)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise HeadscoreError(f"{label} {path} holds other files ({shown}); the output replaces its directory as a "
                             "whole: give a new or empty directory")


def _mount_points() -> set[bytes]:
    """Every mount point of this process (Linux ``/proc/self/mountinfo``, bind mounts of single files included;
    empty where there is no such file)."""
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            fields = [line.split() for line in fh]
    except OSError:
        return set()
    octal = re.compile(rb"\\([0-7]{3})")  # the kernel writes space, tab, newline and backslash as \ooo
    return {octal.sub(lambda m: bytes([int(m.group(1), 8)]), f[4]) for f in fields if len(f) > 4}


def is_mount_point(path: Path) -> bool:
    """True when the resolved ``path`` is a mount point: a file system's root or a bind-mounted directory or file,
    from the same file system too (where ``os.path.ismount`` and device numbers cannot tell)."""
    try:
        if os.stat(path).st_dev != os.stat(path.parent).st_dev:
            return True
    except OSError:
        return False
    return os.path.ismount(path) or os.fsencode(path) in _mount_points()


def _has_fowner() -> bool:
    """Whether this process holds CAP_FOWNER (Linux's effective capabilities; elsewhere: being root)."""
    try:
        with open("/proc/self/status") as fh:
            caps = next(line.split()[1] for line in fh if line.startswith("CapEff:"))
    except (OSError, StopIteration, IndexError):
        return os.geteuid() == 0
    cap_fowner = 3
    return bool(int(caps, 16) >> cap_fowner & 1)


def _mapped(ident: int, table: str) -> bool:
    """Whether a user or group id is mapped in this process's user namespace (``/proc/self/uid_map``)."""
    try:
        with open(table) as fh:
            rows = [tuple(map(int, line.split())) for line in fh]
    except (OSError, ValueError):
        return True
    return any(inside <= ident < inside + count for inside, _, count in rows)


def sticky_refuses(final: Path) -> bool:
    """True when the existing ``final`` lies in a sticky directory (like ``/tmp``) that would refuse to let this
    process rename over it: the kernel allows only the owner of the file or of the directory, or a process with
    CAP_FOWNER for ids its user namespace maps (root with its capabilities dropped may not)."""
    try:
        st, parent = os.lstat(final), os.stat(final.parent)
    except OSError:
        return False
    if not parent.st_mode & stat.S_ISVTX or os.geteuid() in (st.st_uid, parent.st_uid):
        return False
    return not (_has_fowner() and _mapped(st.st_uid, "/proc/self/uid_map")
                and _mapped(st.st_gid, "/proc/self/gid_map"))


def check_rename_target(label: str, path: PathLike, final: Path) -> None:
    """Refuse, before any work, an existing ``final`` that the last step of the write, renaming the new file or
    directory into place, could not replace: a mount point, or another user's file in a sticky directory."""
    if not os.path.lexists(final):
        return
    if is_mount_point(final):
        kind = "directory" if final.is_dir() else "file"
        raise HeadscoreError(f"{label} {path} is a mount point, and the write renames a new {kind} into its place, "
                             "which a mount point refuses: write to another path and copy it there")
    if sticky_refuses(final):
        raise HeadscoreError(f"{label} {path} belongs to another user in the sticky directory {final.parent}, where "
                             "only its owner may replace it: choose another name (or have its owner remove it)")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk (OSError on failure)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _link(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` as ``dst``; False where the system refuses (no hard links there, not one's own file)."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        return False
    return True


@dataclass
class _Staged:
    tmp: Path
    final: Path
    shown: str
    is_dir: bool
    old: Path | None = None  # after install: where the destination's earlier version waits (None: there was none)

    def install(self, keep_old: bool) -> None:
        """Rename the temporary into place. With ``keep_old`` (an output that a later one may still fail after),
        the earlier destination stays in ``old`` until :meth:`finish`, for :meth:`undo` to put back."""
        if not self.is_dir and not keep_old:
            os.replace(self.tmp, self.final)
            return
        if self.is_dir:
            old_mode = os.stat(self.final).st_mode & 0o7777 if self.final.is_dir() else None
            os.chmod(self.tmp, default_mode(directory=True) if old_mode is None else old_mode)
        if not os.path.lexists(self.final):
            os.rename(self.tmp, self.final)
        elif _exchange(self.tmp, self.final):
            self.old = self.tmp  # the temporary's name now holds the earlier version
        else:
            aside = self.final.with_name(self.tmp.name[: -len(TEMP_SUFFIX)] + ".old")
            linked = not self.is_dir and _link(self.final, aside)  # a link keeps the file in place meanwhile
            if not linked:
                os.rename(self.final, aside)
            try:
                os.rename(self.tmp, self.final)
            except BaseException:
                if linked:
                    aside.unlink()
                else:
                    os.rename(aside, self.final)  # put the earlier version back
                raise
            self.old = aside

    def undo(self) -> None:
        """Put back what :meth:`install` replaced (the new output goes back to the temporary's name)."""
        if self.old == self.tmp:
            if not _exchange(self.tmp, self.final):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(self.final))
        else:
            if self.old is None or self.is_dir:
                os.rename(self.final, self.tmp)
            if self.old is not None:
                try:
                    os.replace(self.old, self.final)
                except OSError:
                    if self.is_dir:
                        os.rename(self.tmp, self.final)  # the new directory stays, as the error will say
                    raise
        self.old = None

    def finish(self) -> None:
        """Remove the earlier version kept by :meth:`install`."""
        if self.old is not None:
            _remove(self.old, self.is_dir)
            self.old = None

    def remove(self) -> None:
        _remove(self.tmp, self.is_dir)

    def holds(self, path: Path | None) -> bool:
        return path is not None and (path == self.tmp or self.tmp in path.parents)


def _remove(path: Path, is_dir: bool) -> None:
    if is_dir:
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


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
        self._made: list[Path] = []  # directories created for the outputs, removed again if nothing is written
        self._swept: set[Path] = set()  # directories whose stale temporaries are removed (once a set)

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
        check_rename_target(label, path, final)
        try:
            self._make_parents(final.parent)
            if final.parent not in self._swept:
                remove_stale_temporaries(final.parent)
                self._swept.add(final.parent)
            tmp = new_temp_dir(final.parent) if is_dir else new_temp_file(final.parent)
        except OSError as exc:
            raise OutputWriteError(path, describe(exc)) from None
        self._staged.append(_Staged(tmp, final, os.fspath(path), is_dir))
        return tmp

    def _make_parents(self, directory: Path) -> None:
        missing = []
        while not directory.exists() and directory != directory.parent:
            missing.append(directory)
            directory = directory.parent
        for made in reversed(missing):
            try:
                made.mkdir()
            except FileExistsError:
                continue
            self._made.append(made)

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
        """Rename every staged output into place (signals held back meanwhile), all or nothing: where a rename
        fails, the ones before it are undone. The set is empty after."""
        try:
            for staged in self._staged:  # a replaced file keeps its mode, as open(path, "w") keeps it
                if not staged.is_dir:
                    old_mode = os.stat(staged.final).st_mode & 0o7777 if staged.final.is_file() else None
                    os.chmod(staged.tmp, default_mode() if old_mode is None else old_mode)
        except OSError as exc:
            raise self._named(Path(exc.filename) if isinstance(exc.filename, str) else None,
                              describe(exc)) from None
        with signals_held():
            done: list[_Staged] = []
            try:
                for staged in self._staged:
                    staged.install(keep_old=staged is not self._staged[-1])
                    done.append(staged)
            except BaseException as exc:
                failed = self._staged[len(done)]
                reason = describe(exc) if isinstance(exc, OSError) else type(exc).__name__
                stuck = self._undo(done)
                if stuck:
                    raise OutputWriteError(failed.shown, reason, stuck) from None
                if isinstance(exc, OSError):
                    raise OutputWriteError(failed.shown, reason) from None
                raise
            for staged in self._staged:
                staged.finish()
        for parent in {s.final.parent for s in self._staged}:
            _sync_directory(parent)
        self._staged.clear()
        self._made.clear()

    def _undo(self, done: list[_Staged]) -> list[str]:
        """Undo the installs of ``done``, last first; returns what could not be undone, which stays as it is."""
        stuck = []
        for staged in reversed(done):
            try:
                staged.undo()
            except OSError:
                kept = f"its earlier version is {staged.old}" if staged.old is not None else "new"
                stuck.append(f"{staged.shown} ({kept})")
                self._staged.remove(staged)  # neither its temporary nor its earlier version is removed
        return stuck

    def discard(self) -> None:
        """Remove every staged temporary and every directory made for them; the destinations keep what they had."""
        for staged in reversed(self._staged):
            staged.remove()
        self._staged.clear()
        for made in reversed(self._made):
            with contextlib.suppress(OSError):
                made.rmdir()
        self._made.clear()


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

    The file gets the mode a plain ``open(path, "w")`` would give it (a new one the umask's, a replaced one its
    own: a private 0600 file stays private); a symbolic
    link at ``path`` is followed. Returns ``Path(path)``. Raises :class:`OutputWriteError` when the system
    refuses the write (the old file, if any, is left as it was).
    """
    with OutputSet() as out:
        out.write(path, data)
    return Path(path)
