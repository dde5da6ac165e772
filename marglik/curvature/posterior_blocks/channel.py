"""The per-channel posterior blocks: a :class:`~marglik.curvature.kron.DiagonalBlock` (``C``
blocks of ``k x k``, ``k = 1, 2``: a norm layer's or ``Scale``/``Bias`` module's ``(weight[c],
bias[c])``) with its positions (:class:`ChannelBlocksInfo`), and given the prior its posterior
:class:`ChannelPosterior`, in closed form and exact for every prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import Tensor

from ..kron import DiagonalBlock
from ..prior import PriorStructure
from .base import PosteriorBlock


@dataclass
class ChannelBlocksInfo:
    """A :class:`DiagonalBlock` (per-channel ``k x k`` blocks, ``k = 1, 2``) and where it sits.

    Attributes:
        block: the curvature block.
        index: ``(C, k)`` positions of ``(weight[c], bias[c])`` in ``Kron.to_dense`` order.
        layers: indices in ``Kron.params`` of the block's present parameters.
    """

    block: DiagonalBlock
    index: Tensor
    layers: List[int]

    def posterior(self, prior: Tensor, structure: PriorStructure) -> "ChannelPosterior":
        """The posterior block for the prior precision ``prior`` (of ``structure``)."""
        C, k = self.index.shape
        if structure is PriorStructure.SCALAR:
            p = prior.reshape(1, 1).expand(C, k)
        elif structure is PriorStructure.LAYERWISE:
            p = prior[torch.tensor(self.layers, device=prior.device)].reshape(1, k).expand(C, k)
        else:
            p = prior[self.index]
        return ChannelPosterior(self, p)


class ChannelPosterior(PosteriorBlock):
    """A :class:`DiagonalBlock`'s posterior blocks ``s D_c + diag(p_c)`` (``k x k``, ``k = 1, 2``),
    in closed form -- **exact** for every prior.

    Args:
        info: the curvature block and its positions.
        prior: ``(C, k)`` prior precision per channel and parameter.
    """

    def __init__(self, info: ChannelBlocksInfo, prior: Tensor) -> None:
        self.info = info
        self.index = info.index
        self.prior = prior

    def logdet_ratio(self, s):
        D, p = self.info.block.blocks, self.prior
        if D.shape[-1] == 1:
            return torch.log1p(s * D[:, 0, 0] / p[:, 0]).sum()
        a, b, c, d = D[:, 0, 0], D[:, 0, 1], D[:, 1, 0], D[:, 1, 1]
        pw, pb = p[:, 0], p[:, 1]
        x = s * s * (a * d - b * c) / (pw * pb) + s * (a / pw + d / pb)
        return torch.log1p(x).sum()

    def solve(self, X, s):
        D, p = self.info.block.blocks.detach(), self.prior
        if D.shape[-1] == 1:
            return X / (s * D[:, 0, 0] + p[:, 0]).unsqueeze(-1)
        a = s * D[:, 0, 0] + p[:, 0]
        b = s * D[:, 0, 1]
        c = s * D[:, 1, 0]
        d = s * D[:, 1, 1] + p[:, 1]
        det = a * d - b * c
        x0, x1 = X[..., 0], X[..., 1]
        return torch.stack([(d * x0 - b * x1) / det, (a * x1 - c * x0) / det], dim=-1)

    def sample(self, n, s, randn):
        L = torch.linalg.cholesky(s * self.info.block.blocks.detach() + torch.diag_embed(self.prior))  # (C, k, k)
        C, k = self.index.shape
        x = torch.linalg.solve_triangular(L.transpose(-1, -2), randn(C, k, n), upper=True)  # (C, k, n)
        return x.permute(2, 0, 1)
