"""The built-in suite: short examples of the eight cognitive functions of the CogQA study."""

from __future__ import annotations

from importlib import resources

from .examples import Example, load_jsonl

BUILTIN_NAME = "builtin"


def builtin_suite() -> list[Example]:
    """Examples written for headscore, 20+ per function, that SmolLM2-135M mostly answers right."""
    with resources.as_file(resources.files("headscore.data") / "builtin_suite.jsonl") as path:
        return load_jsonl(path)
