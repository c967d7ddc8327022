"""``EdgeMaps``: edge scores of every task, kept in a scores file beside the head maps.

Upstream nodes (rows) write into the residual stream: ``emb``, ``L3.H5`` (a head), ``L3.mlp``; downstream
nodes (columns) read it: ``L4.H2.q``, ``L4.KV1.k``, ``L4.KV1.v``, ``L4.mlp``, ``logits`` (see
:mod:`headscore.edges.graph`). A value is NaN where no edge exists (u writes after v reads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

EDGE_TENSORS = ("edge_values", "edge_stderr")


@dataclass
class EdgeMaps:
    """Edge scores per task.

    Attributes:
        upstream: upstream node names (rows).
        downstream: downstream node names (columns).
        values: float64 [T, U, V], each task's mean over its examples; NaN where no edge exists.
        stderr: float64 [T, U, V], standard errors of ``values``.
        example_values: optional float32 [N, U, V], each kept example's own values (the rows of the
            scores' ``example_tasks``), NaN where no edge exists.
        exact: optional bool [T, U, V]: True where the value was measured by exact edge patching.
    """

    upstream: list[str]
    downstream: list[str]
    values: torch.Tensor
    stderr: torch.Tensor
    example_values: torch.Tensor | None = None
    exact: torch.Tensor | None = None

    @property
    def existing(self) -> torch.Tensor:
        """bool [U, V]: where an edge exists (a value that is not NaN in every task)."""
        if self.values.shape[0] == 0:
            return torch.zeros(self.values.shape[1:], dtype=torch.bool)
        return ~torch.isnan(self.values).all(0)

    @property
    def num_edges(self) -> int:
        """How many edges exist."""
        return int(self.existing.sum())

    def problem(self, tasks: int, examples: int | None) -> str:
        """Why these maps do not fit scores of ``tasks`` tasks and ``examples`` kept examples ('' if they do)."""
        u, v = len(self.upstream), len(self.downstream)
        if len(set(self.upstream)) != u or len(set(self.downstream)) != v or \
                not all(isinstance(n, str) for n in [*self.upstream, *self.downstream]):
            return "edge node names must be distinct strings"
        for name in EDGE_TENSORS:
            t = getattr(self, name.removeprefix("edge_"))
            if tuple(t.shape) != (tasks, u, v) or not t.is_floating_point():
                return f"{name} must be float [{tasks}, {u}, {v}], got {t.dtype} {list(t.shape)}"
        ex = self.example_values
        if ex is not None and (examples is None or tuple(ex.shape) != (examples, u, v) or not ex.is_floating_point()):
            return f"edge_example_values must be float [{examples}, {u}, {v}], got {ex.dtype} {list(ex.shape)}"
        if self.exact is not None and (tuple(self.exact.shape) != (tasks, u, v) or self.exact.dtype != torch.bool):
            return f"edge_exact must be a bool mask [{tasks}, {u}, {v}], got {self.exact.dtype} " \
                   f"{list(self.exact.shape)}"
        return ""

    def select(self, rows: list[int], keep: torch.Tensor | None) -> EdgeMaps:
        """These maps for task rows ``rows`` and the kept examples ``keep`` (a bool mask) only."""
        ex = None if self.example_values is None or keep is None else self.example_values[keep]
        return EdgeMaps(list(self.upstream), list(self.downstream), self.values[rows], self.stderr[rows], ex,
                        None if self.exact is None else self.exact[rows])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a scores file keeps."""
        out = {"edge_values": self.values.contiguous(), "edge_stderr": self.stderr.contiguous()}
        if self.example_values is not None:
            out["edge_example_values"] = self.example_values.contiguous()
        if self.exact is not None:
            out["edge_exact"] = self.exact.contiguous()
        return out

    def metadata(self) -> dict[str, str]:
        """The metadata a scores file keeps."""
        return {"edge_nodes": json.dumps({"upstream": self.upstream, "downstream": self.downstream})}

    @classmethod
    def from_file(cls, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> EdgeMaps | None:
        """The maps a scores file holds (None without any); ValueError naming what is broken."""
        present = [k for k in EDGE_TENSORS if k in tensors]
        if not present and "edge_nodes" not in meta:
            return None
        if len(present) < len(EDGE_TENSORS) or "edge_nodes" not in meta:
            raise ValueError("edge_values, edge_stderr and the edge_nodes metadata come together")
        try:
            nodes = json.loads(meta["edge_nodes"])
            upstream, downstream = list(nodes["upstream"]), list(nodes["downstream"])
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
            raise ValueError("metadata 'edge_nodes' is not JSON of upstream and downstream names") from None
        return cls(upstream, downstream, tensors["edge_values"], tensors["edge_stderr"],
                   tensors.get("edge_example_values"), tensors.get("edge_exact"))

    def rows(self, tasks: list[str], counts: torch.Tensor) -> list[dict]:
        """One dict per (task, existing edge): task, upstream, downstream, value, stderr, count (and exact)."""
        pairs = self.existing.nonzero().tolist()
        out = []
        for t, name in enumerate(tasks):
            for u, v in pairs:
                row = {"task": name, "upstream": self.upstream[u], "downstream": self.downstream[v],
                       "value": float(self.values[t, u, v]), "stderr": float(self.stderr[t, u, v]),
                       "count": int(counts[t])}
                if self.exact is not None:
                    row["exact"] = bool(self.exact[t, u, v])
                out.append(row)
        return out

    def as_json(self) -> dict:
        """Nested lists for a JSON export: node names, values and stderr ([task][upstream][downstream], null
        where no edge exists)."""
        def listed(t: torch.Tensor) -> list:
            return [[[None if x != x else x for x in row] for row in task] for task in t.tolist()]
        doc = {"upstream": self.upstream, "downstream": self.downstream, "values": listed(self.values),
               "stderr": listed(self.stderr)}
        if self.exact is not None:
            doc["exact"] = self.exact.tolist()
        return doc
