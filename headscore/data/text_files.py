"""Reading a user's text file as UTF-8, with one clear error for anything else (Latin-1, UTF-16, binary)."""

from __future__ import annotations

import codecs
from pathlib import Path

from ..errors import HeadscoreError


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


def read_utf8(path: str | Path) -> str:
    """The text of the file at ``path`` (see :func:`decode_utf8`); HeadscoreError if it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise HeadscoreError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    return decode_utf8(data, path)
