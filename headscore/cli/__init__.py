"""The ``headscore`` command. Only this package parses arguments or prints for a user; the library never
imports it.

One module per command group: :mod:`.scoring` (score, ablate), :mod:`.compare`, :mod:`.report`,
:mod:`.bench`, :mod:`.cogqa` (intervene, reproduce-cogqa). Each has ``register(subparsers)``,
which adds its commands and returns ``{command: handler}``. :func:`main` imports them (and so
torch) inside its error handling, so that Ctrl-C at any moment, imports included, ends with
"interrupted" and exit code 130, and bad input with one line on stderr and exit code 2. SIGTERM and SIGHUP
are raised as :class:`Terminated` where the program is, so every cleanup runs (no temporary output is left
behind, no output half replaced) before it ends with "terminated" and 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn

from ..errors import HeadscoreError
from ..text import printable

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that ``finally`` blocks and output cleanup run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _termination_as_exception():
    """While the command runs, SIGTERM and SIGHUP raise :class:`Terminated` (where they are not ignored)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _TERMINATING:
            if signal.getsignal(sig) is signal.SIG_DFL:
                previous[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class UsageError(HeadscoreError):
    """A command-line usage error (argparse's), shown as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``headscore score: error: ...`` and exit code 2, via :func:`main`."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"headscore: warning: {printable(str(message).strip()) or category.__name__}", file=file or sys.stderr)


def build_parser() -> tuple[ArgumentParser, dict[str, Callable]]:
    """The ``headscore`` parser and the handler of each command."""
    from . import bench, circuit, cogqa, compare, report, scoring

    parser = ArgumentParser(prog="headscore", description="Score how much every attention head matters per task.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    handlers: dict[str, Callable] = {}
    for module in (scoring, compare, report, bench, cogqa, circuit):
        handlers.update(module.register(sub))
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for bad input, 130 when interrupted, 128 + N for
    signal N: 143 after SIGTERM)."""
    given: list[str] = []
    try:
        with warnings.catch_warnings(), _termination_as_exception():
            warnings.showwarning = _one_line_warning
            parser, handlers = build_parser()
            given = _checked_argv(argv)
            args = parser.parse_args(given)
            handlers[args.command](args)
    except HeadscoreError as exc:
        print(f"headscore: error: {printable(str(exc).strip()) or type(exc).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        if not _names_a_given_path(exc, given):
            raise
        print(f"headscore: error: {printable(exc.filename)}: {exc.strerror or type(exc).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        interrupt = _interrupt_cause(exc)
        if interrupt is None:
            raise
        return _interrupted(interrupt)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    return 0


def _checked_argv(argv: Sequence[str] | None) -> list[str]:
    """The arguments, refusing one that no file name or text can hold (a NUL, a lone surrogate: possible only
    from Python callers; the system's own arguments always encode)."""
    args = list(sys.argv[1:] if argv is None else argv)
    for arg in args:
        try:
            ok = b"\x00" not in os.fsencode(arg)  # escaped undecodable bytes from the system encode back
        except UnicodeEncodeError:
            ok = False
        if not ok:
            raise UsageError(f"argument '{printable(arg)}' holds a NUL or a lone surrogate, which no file name or "
                             "text can hold")
    return args


def _names_a_given_path(exc: OSError, given: Sequence[str]) -> bool:
    """Whether an OSError is about a path the user typed (a name too long, a loop, no permission: bad input,
    one line), not about a file of headscore's own (a bug: the traceback stays)."""
    name = exc.filename if isinstance(exc.filename, str) else None
    return bool(name) and any(name in arg for arg in given)


def _interrupted(exc: KeyboardInterrupt) -> int:
    if isinstance(exc, Terminated):
        print(f"headscore: terminated ({signal.Signals(exc.signum).name})", file=sys.stderr)
        return 128 + exc.signum
    print("headscore: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _interrupt_cause(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt ``exc`` wraps, if any: Python 3.11 turns one raised inside ``__set_name__``
    (Ctrl-C while a dataclass is being defined, i.e. during an import) into a RuntimeError caused by it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run() -> NoReturn:
    """The ``headscore`` console command: :func:`main`, then exit with its code.

    After Ctrl-C (or SIGTERM, SIGHUP) the process ends at once (``os._exit``), without interpreter
    finalization: an interrupt can land while a model or a tokenizer is half built, and finalizers of
    such objects must not get the last word on the exit status (130, 143, 129). Every ``finally`` block
    has already run by then.
    """
    code = main()
    if code == EXIT_INTERRUPTED or code > 128:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)
