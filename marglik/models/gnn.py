"""A message-passing graph classifier in pure torch (no torch_geometric).

Graphs of a batch are stacked: node features ``x`` of shape ``(T, F)`` (``T`` nodes of all
graphs), directed edges ``edge_index`` of shape ``(2, E)`` (row 0 source, row 1 target; store
undirected edges in both directions), and ``batch`` of shape ``(T,)`` with the graph id
(``0 .. N-1``) of every node.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature.sharing import example_index


class GNN(nn.Module):
    """GIN-style network: ``h <- relu(Linear(h + AGG_{j -> i} h_j))`` for ``num_layers`` layers,
    a per-graph readout and a linear head.

    Args:
        in_dim: node feature size ``F``.
        hidden_dim: node embedding width.
        num_classes: number of outputs ``K``.
        num_layers: message-passing layers.
        readout: ``"mean"`` or ``"sum"`` of the node embeddings of each graph.
        aggregation: ``"sum"`` (GIN-0; can count neighbours, i.e. see degrees) or ``"mean"``.

    ``forward(x (T, F), edge_index (2, E), batch (T,), num_graphs=None) -> (N, K)``, with
    ``N = num_graphs`` or ``int(batch.max()) + 1``.

    The whole forward runs inside :func:`marglik.curvature.sharing.example_index` ``(batch)``, so
    the per-node ``nn.Linear`` inputs ``(T, .)`` are attributed to their graphs; the head's input
    ``(N, hidden)`` falls under the leading-dimension-``N`` rule. (This assumes ``T != N``, i.e.
    not every graph has exactly one node.) Parameters live only in ``nn.Linear`` modules.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        num_classes: int,
        num_layers: int = 3,
        readout: str = "mean",
        aggregation: str = "sum",
    ) -> None:
        super().__init__()
        if readout not in ("mean", "sum"):
            raise ValueError(f"readout must be 'mean' or 'sum', got {readout!r}")
        if aggregation not in ("mean", "sum"):
            raise ValueError(f"aggregation must be 'mean' or 'sum', got {aggregation!r}")
        self.readout, self.aggregation = readout, aggregation
        dims = [in_dim] + [hidden_dim] * num_layers
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(num_layers))
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor, num_graphs: Optional[int] = None) -> Tensor:
        with example_index(batch):
            n_graphs = int(batch.max()) + 1 if num_graphs is None else int(num_graphs)
            src, dst = edge_index[0], edge_index[1]
            if self.aggregation == "mean":
                deg = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
                deg = deg.index_add(0, dst, torch.ones_like(dst, dtype=x.dtype)).clamp(min=1).unsqueeze(1)
            h = x
            for lin in self.layers:
                agg = torch.zeros_like(h).index_add(0, dst, h[src])  # sum over incoming neighbours
                if self.aggregation == "mean":
                    agg = agg / deg
                h = F.relu(lin(h + agg))
            pooled = h.new_zeros(n_graphs, h.shape[1]).index_add(0, batch, h)
            if self.readout == "mean":
                counts = torch.bincount(batch, minlength=n_graphs).clamp(min=1).to(h.dtype)
                pooled = pooled / counts.unsqueeze(1)
            return self.head(pooled)
