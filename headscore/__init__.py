"""headscore: how much every attention head matters for a task, from one forward and one backward pass.

Quick start::

    import headscore
    scores = headscore.score("smollm2-135m", method="taylor")     # built-in suite
    truth = headscore.ablate("smollm2-135m")                      # real zero ablation
    print(headscore.compare(scores, truth))

The public names load on first use (``import headscore`` itself imports neither torch nor
transformers), so the command line starts, answers ``--help`` and handles Ctrl-C at once.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "api": ("BASELINES", "METHODS", "SetEffect", "ablate", "ablate_edges", "ablate_heads", "circuit", "mean_baseline",
            "score"),
    "prepared": ("prepare",),
    "compare": ("Agreement", "compare", "compare_edges"),
    "data.builtin": ("builtin_suite",),
    "data.cogqa": ("load_cogqa", "split_by_question"),
    "data.examples": ("Example", "load_jsonl"),
    "data.tables": ("examples_from_table",),
    "errors": ("HeadscoreError", "UnsupportedModelError"),
    "loss": ("METRICS", "Metric"),
    "model_check": ("check_model",),
    "models": ("DEFAULT_MODEL", "LoadedModel", "load_model"),
    "patch": ("HeadGates", "patch"),
    "results": ("HeadScores",),
    "track": ("HeadscoreCallback", "Tracker", "track"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "Agreement", "BASELINES", "DEFAULT_MODEL", "Example", "HeadGates", "HeadScores", "HeadscoreCallback",
    "HeadscoreError", "LoadedModel", "METHODS", "METRICS", "Metric", "SetEffect", "Tracker",
    "UnsupportedModelError", "ablate", "ablate_edges", "ablate_heads", "builtin_suite", "check_model", "circuit",
    "compare", "compare_edges", "examples_from_table", "load_cogqa", "load_jsonl",
    "load_model", "mean_baseline", "patch", "prepare", "score", "split_by_question", "track",
]
assert sorted(__all__) == sorted(_WHERE), "every export is listed once"
__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .api import (
        BASELINES,
        METHODS,
        SetEffect,
        ablate,
        ablate_edges,
        ablate_heads,
        circuit,
        mean_baseline,
        score,
    )
    from .compare import Agreement, compare, compare_edges
    from .data.builtin import builtin_suite
    from .data.cogqa import load_cogqa, split_by_question
    from .data.examples import Example, load_jsonl
    from .data.tables import examples_from_table
    from .errors import HeadscoreError, UnsupportedModelError
    from .loss import METRICS, Metric
    from .model_check import check_model
    from .models import DEFAULT_MODEL, LoadedModel, load_model
    from .patch import HeadGates, patch
    from .prepared import prepare
    from .results import HeadScores
    from .track import HeadscoreCallback, Tracker, track


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'headscore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``headscore.patch``, ``.compare`` and ``.track`` the functions: importing the submodules
    of those names would otherwise bind the modules over them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
