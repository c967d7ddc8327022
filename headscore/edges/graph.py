"""The nodes of the residual-stream graph and which edges exist between them.

Upstream nodes write into the residual stream: ``emb`` (everything the first layer receives: token and
position embeddings), every head's output after its slice of the output projection (``L3.H5``) and every
MLP's output (``L3.mlp``). Downstream nodes read it: every head's query input (``L4.H2.q``), every key and
value head's input (``L4.KV1.k``, ``L4.KV1.v``: per KV head, as a grouped-query model has them), every
MLP's input (``L4.mlp``) and the final norm before the unembedding (``logits``).

An edge u -> v exists when u writes before v reads: a layer's attention reads what every earlier layer
wrote; its MLP also reads its own attention's heads in a sequential block, not in a parallel-residual one
(GPT-NeoX, Phi), where attention and MLP read the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class EdgeGraph:
    """Node names and the edges between them for a model of ``num_layers`` x ``num_heads`` heads.

    Upstream order: ``emb``, then per layer its heads and its MLP. Downstream order: per layer its
    query heads, key heads, value heads and MLP, then ``logits``.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    parallel: bool = False

    @cached_property
    def upstream(self) -> list[str]:
        """Upstream node names, in score-tensor order."""
        names = ["emb"]
        for layer in range(self.num_layers):
            names += [f"L{layer}.H{h}" for h in range(self.num_heads)] + [f"L{layer}.mlp"]
        return names

    @cached_property
    def downstream(self) -> list[str]:
        """Downstream node names, in score-tensor order."""
        names = []
        for layer in range(self.num_layers):
            names += [f"L{layer}.H{h}.q" for h in range(self.num_heads)]
            names += [f"L{layer}.KV{j}.k" for j in range(self.num_kv_heads)]
            names += [f"L{layer}.KV{j}.v" for j in range(self.num_kv_heads)]
            names.append(f"L{layer}.mlp")
        return [*names, "logits"]

    @property
    def readers_per_layer(self) -> int:
        """Downstream nodes of one layer: query heads, key heads, value heads, the MLP."""
        return self.num_heads + 2 * self.num_kv_heads + 1

    @property
    def writers_per_layer(self) -> int:
        """Upstream nodes of one layer: its heads and its MLP."""
        return self.num_heads + 1

    def head_index(self, layer: int, head: int) -> int:
        """Upstream index of head ``head`` of layer ``layer``."""
        return 1 + layer * self.writers_per_layer + head

    def mlp_index(self, layer: int) -> int:
        """Upstream index of layer ``layer``'s MLP."""
        return 1 + layer * self.writers_per_layer + self.num_heads

    def reader_start(self, layer: int) -> int:
        """Downstream index of layer ``layer``'s first reader (its query head 0)."""
        return layer * self.readers_per_layer

    def _stages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """When each node writes and reads: layer l's attention is stage 2l, its MLP 2l + 1."""
        write = [-1]
        for layer in range(self.num_layers):
            write += [2 * layer] * self.num_heads + [2 * layer + 1]
        read = []
        for layer in range(self.num_layers):
            read += [2 * layer] * (self.num_heads + 2 * self.num_kv_heads)
            read.append(2 * layer if self.parallel else 2 * layer + 1)
        read.append(2 * self.num_layers)
        return torch.tensor(write), torch.tensor(read)

    @cached_property
    def allowed(self) -> torch.Tensor:
        """bool [upstream, downstream]: True where the edge exists (u writes before v reads)."""
        write, read = self._stages()
        # an MLP in a parallel block reads at its attention's stage: heads of its own layer come too late
        return write[:, None] < read[None, :]

    @property
    def num_edges(self) -> int:
        """How many edges exist."""
        return int(self.allowed.sum())

    @classmethod
    def from_nodes(cls, upstream: list[str], downstream: list[str], existing: torch.Tensor, *,
                   some: bool = False) -> EdgeGraph:
        """The graph whose node names are ``upstream`` and ``downstream`` and whose edges are ``existing``
        (bool [U, V], e.g. a scores file's non-NaN edges), or, with ``some``, include them (exact patching
        measures chosen edges only); ValueError when no graph has them."""
        heads = {n for n in upstream if ".H" in n}
        layers = sum(1 for n in upstream if n.endswith(".mlp"))
        per_layer = len(heads) // max(layers, 1)
        kv = sum(1 for n in downstream if n.startswith("L0.KV") and n.endswith(".k"))
        for parallel in (False, True):
            graph = cls(layers, per_layer, kv, parallel)
            existing = existing.to(torch.bool)
            if graph.upstream == list(upstream) and graph.downstream == list(downstream) and (
                    torch.equal(graph.allowed, existing) if not some else not bool((existing & ~graph.allowed).any())):
                return graph
        raise ValueError("these edge nodes and edges are no graph of a sequential or parallel model")

    def index(self, name: str, *, upstream: bool) -> int:
        """Index of a node by name (ValueError for an unknown name)."""
        names = self.upstream if upstream else self.downstream
        try:
            return names.index(name)
        except ValueError:
            kind = "upstream" if upstream else "downstream"
            raise ValueError(f"no {kind} node {name!r} in a model of {self.num_layers} layers x "
                             f"{self.num_heads} heads ({self.num_kv_heads} KV heads)") from None
