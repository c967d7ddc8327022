"""Reading a user's text file as UTF-8, with one clear error for anything else (Latin-1, UTF-16, binary, a
line too long, JSON nested too deeply or a number too long to read)."""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import HeadscoreError

MAX_LINE_BYTES = 1 << 20
"""The longest line of a JSON Lines file (1 MiB, far beyond any model's context). A longer line is refused
while it is read: no more than this is ever held of it, so a runaway line costs neither time nor memory."""

MAX_JSON_DEPTH_SHOWN = 500
"""JSON nested deeper than Python's parser can follow is refused; the error names the line where the
nesting passes this many levels."""


def decode_utf8(data: bytes, name: str | Path) -> str:
    """``data`` decoded as UTF-8 (a leading byte-order mark dropped); HeadscoreError naming ``name``,
    the line and the encoding problem otherwise."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise HeadscoreError(f"{name}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                             "save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise HeadscoreError(f"{name}:{line}: NUL byte: a binary file, or UTF-16 without a byte-order mark; "
                             "the file must be UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise HeadscoreError(f"{name}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
                             "save the file as UTF-8 (it may be Latin-1 or Windows-1252)") from None


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of the UTF-8 file at ``path``, without its newline, reading the file
    once from start to end (so a pipe, ``<(cmd)``, works). The checks of :func:`decode_utf8` apply line by
    line; a line longer than :data:`MAX_LINE_BYTES` is refused as soon as that much of it is read."""
    try:
        fh = Path(path).open("rb")
    except OSError as exc:
        raise HeadscoreError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    with fh:
        lineno = 0
        while True:
            try:
                data = fh.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise HeadscoreError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
            if not data:
                return
            lineno += 1
            if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
                utf16 = lineno == 1 and data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
                if b"\x00" not in data and not utf16:  # a binary or UTF-16 file is named as such below
                    raise HeadscoreError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB, the "
                                         "limit for one example; is this a JSON Lines file (one example per line)?")
            text = decode_utf8(data, path) if lineno == 1 else _decode_line(data, path, lineno)
            yield lineno, text.rstrip("\n")


def _decode_line(data: bytes, name: str | Path, lineno: int) -> str:
    """One line (after the first) of a UTF-8 file: NUL bytes and bad UTF-8 named by ``lineno``."""
    if b"\x00" in data:
        raise HeadscoreError(f"{name}:{lineno}: NUL byte: a binary file, or UTF-16 without a byte-order mark; "
                             "the file must be UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeadscoreError(f"{name}:{lineno}: not UTF-8 (byte 0x{data[exc.start]:02x} at column "
                             f"{exc.start + 1}); save the file as UTF-8 (it may be Latin-1 or Windows-1252)") from None


_JSON_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')
_JSON_STRING_OR_NUMBER = re.compile(r'"(?:[^"\\]++|\\.)*+"|-?\d+')


def parse_json(text: str, name: str | Path, *, line: int | None = None, floats_as_text: bool = False) -> object:
    """``json.loads(text)`` with one-line errors naming ``name`` and the line: malformed JSON, nesting deeper
    than the parser follows (RecursionError), a number with more digits than Python reads (ValueError).

    ``line``: the line ``text`` is (one line of a JSON Lines file); None: ``text`` is a whole file and errors
    name the line inside it. ``floats_as_text``: a number with a fraction or exponent stays the text written
    (``12.50`` stays ``"12.50"``, where a float would print as ``12.5``).
    """
    def where(offset: int | None) -> str:
        if line is not None:
            return f"{name}:{line}"
        return str(name) if offset is None else f"{name}:{text.count(chr(10), 0, offset) + 1}"

    try:
        return json.loads(text, parse_float=str if floats_as_text else None)
    except json.JSONDecodeError as exc:
        raise HeadscoreError(f"{where(exc.pos)}: malformed JSON ({exc.msg})") from None
    except RecursionError:
        raise HeadscoreError(f"{where(_deep_offset(text))}: JSON nested too deeply (more than "
                             f"{MAX_JSON_DEPTH_SHOWN} levels of lists and objects)") from None
    except ValueError:  # an integer longer than sys.get_int_max_str_digits()
        limit = sys.get_int_max_str_digits()
        raise HeadscoreError(f"{where(_long_number_offset(text, limit))}: a number of more than {limit} digits, "
                             "more than Python reads") from None


def _deep_offset(text: str) -> int | None:
    """Where the nesting of lists and objects in ``text`` first passes :data:`MAX_JSON_DEPTH_SHOWN`."""
    depth = 0
    for m in _JSON_TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH_SHOWN:
                return m.start()
        elif c in "]}":
            depth -= 1
    return None


def _long_number_offset(text: str, limit: int) -> int | None:
    """Where ``text`` has a number (outside strings) of more than ``limit`` digits."""
    for m in _JSON_STRING_OR_NUMBER.finditer(text):
        if not m.group().startswith('"') and len(m.group().lstrip("-")) > limit:
            return m.start()
    return None


def read_utf8(path: str | Path) -> str:
    """The text of the file at ``path`` (see :func:`decode_utf8`); HeadscoreError if it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise HeadscoreError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    return decode_utf8(data, path)
