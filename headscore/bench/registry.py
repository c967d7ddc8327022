"""Which bench methods there are: their names, table labels, and :func:`resolve` (name -> method or the
reason it cannot run here)."""

from __future__ import annotations

from ..errors import HeadscoreError
from .methods import BUILTIN, Method
from .peers import PEERS, unavailable

DEFAULT_METHODS = ("floor", "taylor", "ablate-prefix", "ablate-batched", "ablate-sequential", "hooks-attribution",
                   "nnsight-attribution", "tl-attribution", "tl-ablation")
HEAVY = frozenset({"ablate-prefix", "ablate-batched"})  # timed once (no warm-up, no repeats): minutes on a CPU

LABELS = {
    "floor": "forward+backward, input grads only (floor)",
    "taylor": "headscore taylor, all heads (one pass)",
    "ablate-prefix": "headscore ablation, prefix reuse (default)",
    "ablate-batched": "headscore ablation, batched",
    "ablate-sequential": "headscore ablation, sequential (naive)",
    "hooks-attribution": "grad x act via torch hooks on o_proj",
    "nnsight-attribution": "nnsight grad x act (o_proj input .grad)",
    "tl-attribution": "TransformerLens grad x act (hook_z)",
    "tl-ablation": "TransformerLens per-head ablation (hook_z)",
}


def resolve(name: str) -> Method | str:
    """The method called ``name``, or the reason it is unavailable (a peer whose library is missing)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name not in PEERS:
        raise HeadscoreError(f"unknown bench method {name!r}; choose from {', '.join(DEFAULT_METHODS)}")
    reason = unavailable(name)
    return reason if reason else PEERS[name]
