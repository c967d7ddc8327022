"""headscore: how much every attention head matters for a task, from one forward and one backward pass.

Quick start::

    import headscore
    scores = headscore.score("smollm2-135m", method="taylor")     # built-in suite
    truth = headscore.ablate("smollm2-135m")                      # real zero ablation
    print(headscore.compare(scores, truth))
"""

from .api import BASELINES, METHODS, SetEffect, ablate, ablate_heads, mean_baseline, prepare, score
from .compare import Agreement, compare
from .data.builtin import builtin_suite
from .data.cogqa import load_cogqa, split_by_question
from .data.examples import Example, load_jsonl
from .errors import HeadscoreError, UnsupportedModelError
from .models import DEFAULT_MODEL, LoadedModel, load_model
from .patch import HeadGates, patch
from .results import HeadScores
from .track import HeadscoreCallback, Tracker, track

__all__ = [
    "Agreement", "BASELINES", "DEFAULT_MODEL", "Example", "HeadGates", "HeadScores", "HeadscoreCallback",
    "HeadscoreError", "LoadedModel", "METHODS", "SetEffect", "Tracker", "UnsupportedModelError", "ablate",
    "ablate_heads", "builtin_suite", "compare", "load_cogqa", "load_jsonl", "load_model", "mean_baseline", "patch",
    "prepare", "score", "split_by_question", "track",
]
__version__ = "0.1.0"
