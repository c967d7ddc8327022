"""User-supplied text (task names, model names) made safe to show: on a terminal and in Markdown."""

from __future__ import annotations

import re
import unicodedata

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#!|~&])")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> str | None:
    """Where ``text`` holds a lone surrogate (``"geo\\ud800"`` is valid JSON, but no text: it cannot be
    written as UTF-8), as ``'\\ud800 at character 4'``; None when it holds none."""
    m = _SURROGATE.search(text)
    return None if m is None else f"{m.group().encode('unicode_escape').decode('ascii')} at character {m.start() + 1}"


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
