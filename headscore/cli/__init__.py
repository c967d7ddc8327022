"""The ``headscore`` command. Only this package parses arguments or prints for a user; the library never
imports it.

One module per command group: :mod:`.scoring` (score, ablate), :mod:`.compare`, :mod:`.report`,
:mod:`.bench`, :mod:`.cogqa` (intervene, reproduce-cogqa). Each has ``register(subparsers)``,
which adds its commands and returns ``{command: handler}``. :func:`main` imports them (and so
torch) inside its error handling, so that Ctrl-C at any moment, imports included, ends with
"interrupted" and exit code 130, and bad input with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn

from ..errors import HeadscoreError
from ..text import printable

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


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
    from . import bench, cogqa, compare, report, scoring

    parser = ArgumentParser(prog="headscore", description="Score how much every attention head matters per task.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    handlers: dict[str, Callable] = {}
    for module in (scoring, compare, report, bench, cogqa):
        handlers.update(module.register(sub))
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for bad input, 130 when interrupted)."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            parser, handlers = build_parser()
            args = parser.parse_args(argv)
            handlers[args.command](args)
    except HeadscoreError as exc:
        print(f"headscore: error: {printable(str(exc).strip()) or type(exc).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("headscore: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not _caused_by_interrupt(exc):
            raise
        print("headscore: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` wraps a KeyboardInterrupt: Python 3.11 turns one raised inside ``__set_name__``
    (Ctrl-C while a dataclass is being defined, i.e. during an import) into a RuntimeError caused by it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def run() -> NoReturn:
    """The ``headscore`` console command: :func:`main`, then exit with its code.

    After Ctrl-C the process ends at once (``os._exit``), without interpreter finalization: an interrupt
    can land while a model or a tokenizer is half built, and finalizers of such objects must not get
    the last word on the exit status (130). Every ``finally`` block has already run by then.
    """
    code = main()
    if code == EXIT_INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)
