"""The shell every interactive page shares: one self-contained HTML document with BokehJS inlined (plots only:
no widgets, tables, WebGL or MathJax; no request leaves the page; titles of user text drawn as written,
:func:`plain_title`), a script that records any script error into ``<pre id="js-errors">`` for a headless
browser to read, and a ``<pre id="render-check">`` its check script fills."""

from __future__ import annotations

import html

from bokeh.models import PlainText, Title
from bokeh.resources import Resources

__all__ = ["BOKEH_JS", "page", "plain_title"]

BOKEH_JS = Resources(mode="inline", components=["bokeh"])

ERRORS_JS = """
<script>
(function () {
  var pending = [];
  function record(msg) {
    var el = document.getElementById("js-errors");
    if (el) { el.textContent += msg + "\\n"; el.hidden = false; } else { pending.push(msg); }
  }
  window.addEventListener("error", function (e) { record("error: " + e.message); });
  window.addEventListener("unhandledrejection", function (e) { record("unhandled rejection: " + e.reason); });
  var original = console.error;
  console.error = function () {
    record("console.error: " + Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
  document.addEventListener("DOMContentLoaded", function () { pending.forEach(record); pending = []; });
})();
</script>
"""


def plain_title(text: str) -> Title:
    """A plot title that shows ``text`` (a task name, user text) as written: BokehJS typesets a title's string
    between ``$$``, ``\\(`` ``\\)`` or ``\\[`` ``\\]`` as TeX, which with no MathJax in the page comes out garbled
    (``x^2\\te...``); a ``PlainText`` it draws as it is."""
    return Title(text=PlainText(text))


def page(title: str, *, style: str, scripts: str, body: str) -> str:
    """The document: ``title``, the page's own CSS rules ``style``, its Bokeh ``scripts`` (the embed script and
    its check script) and ``body`` (everything under the heading)."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
{ERRORS_JS}
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
pre#js-errors {{ color: #b00; }}
{style}
</style>
{BOKEH_JS.render_js()}
{scripts}
</head>
<body>
<pre id="js-errors" hidden></pre>
<h1>{html.escape(title)}</h1>
{body}
<pre id="render-check" hidden></pre>
</body>
</html>
"""
