"""Small parameterised modules the curvature engine understands besides torch's own layers.

``Scale`` and ``Bias`` are the scalar (or per-channel) multiplier / offset used by Fixup
residual networks (Zhang et al. 2019), which the marginal-likelihood literature trains without
BatchNorm. The K-FAC engine gives them exact GGN blocks (see
:mod:`marglik.curvature.layers.elementwise`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Scale(nn.Module):
    """``y = x * weight`` with ``weight`` of shape ``(num_channels,)`` broadcast over ``dim``.

    ``num_channels = 1`` (default) gives Fixup's scalar multiplier. ``dim`` is the channel axis
    of the input (1 for images ``(N, C, H, W)``, -1 for features ``(N, ..., D)``).
    """

    def __init__(self, num_channels: int = 1, dim: int = 1, init: float = 1.0) -> None:
        super().__init__()
        self.num_channels, self.dim = num_channels, dim
        self.weight = nn.Parameter(torch.full((num_channels,), float(init)))

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        if self.num_channels == 1:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.dim] = self.num_channels
        return t.view(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x * self._view(self.weight, x)


class Bias(nn.Module):
    """``y = x + bias`` with ``bias`` of shape ``(num_channels,)`` broadcast over ``dim``."""

    def __init__(self, num_channels: int = 1, dim: int = 1, init: float = 0.0) -> None:
        super().__init__()
        self.num_channels, self.dim = num_channels, dim
        self.bias = nn.Parameter(torch.full((num_channels,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        if self.num_channels == 1:
            return x + self.bias.reshape(())
        shape = [1] * x.dim()
        shape[self.dim] = self.num_channels
        return x + self.bias.view(shape)
