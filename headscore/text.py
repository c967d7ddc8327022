"""User-supplied text (task names, model names) made safe to show: on a terminal and in Markdown."""

from __future__ import annotations

import re
import unicodedata

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#!|~])")


def printable(text: object) -> str:
    """``text`` with every control or format character (newlines, terminal escapes, bidi marks) and every lone
    surrogate (which no UTF-8 stream can write) escaped.

    ``"a\\nb"`` becomes ``a\\\\nb`` (a backslash and an n): one line, and nothing a terminal
    interprets. Ordinary characters, accented letters included, are kept.
    """
    out = []
    for ch in str(text):
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):  # Cs: a lone surrogate cannot be encoded
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def markdown_text(text: object) -> str:
    """``text`` as literal Markdown text: control characters escaped, Markdown syntax backslash-escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", printable(text))
