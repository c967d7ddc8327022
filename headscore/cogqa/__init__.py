"""The CogQA "Cognitive Mirrors" study (arXiv 2512.10978), built on the headscore engine.

* :mod:`headscore.cogqa.reproduce`: :func:`reproduce_cogqa`, the whole reproduction, and its
  :class:`Reproduction` report;
* :mod:`headscore.cogqa.interventions`: :func:`intervene`, each function's top-k heads ablated and
  amplified against random heads;
* :mod:`headscore.cogqa.findings`: sparsity, layer profiles, Jaccard overlap, split-half stability,
  specificity;
* :mod:`headscore.cogqa.uncertainty`: bootstrap intervals of the map-level figures;
* :mod:`headscore.cogqa.probe`: the study's probe scorer (``headscore score --method probe``).

Loading the CogQA file stays in :mod:`headscore.data.cogqa` (``--tasks cogqa:PATH`` is one of the task specs).
"""

from __future__ import annotations

from .interventions import InterventionResult, intervene
from .reproduce import (
    REPRODUCTION_FILES,
    Reproduction,
    ci_cell,
    interval_cell,
    per_example_taylor,
    reproduce_cogqa,
    scores_from_values,
    shortest_per_function,
)

__all__ = ["REPRODUCTION_FILES", "InterventionResult", "Reproduction", "ci_cell", "intervene", "interval_cell",
           "per_example_taylor", "reproduce_cogqa", "scores_from_values", "shortest_per_function"]
