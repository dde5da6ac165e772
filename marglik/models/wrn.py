"""Wide residual networks (Zagoruyko & Komodakis 2016) with Fixup, BatchNorm or no normalisation.

``WideResNet(depth, widen_factor)`` is WRN-d-k: a 3x3 stem conv with 16 channels, three stages of
``n = (depth - 4) / 6`` pre-activation basic blocks with ``16k, 32k, 64k`` channels and strides
``1, 2, 2`` (a 1x1 conv shortcut wherever the shape changes), global average pooling and a linear
head. Adaptive average pooling makes it work for any input size (32x32 gives 8x8 final maps).

Where the trainable parameters live (everything the curvature engine must cover):

* ``norm="fixup"`` (Zhang et al. 2019): ``nn.Conv2d`` (no bias), the final ``nn.Linear`` and the
  scalar :class:`marglik.nn.Bias` / :class:`marglik.nn.Scale` modules. No normalisation layers.
* ``norm="batchnorm"``: ``nn.Conv2d`` (no bias), ``nn.BatchNorm2d`` and the ``nn.Linear`` head.
* ``norm="none"``: only ``nn.Conv2d`` (with bias) and ``nn.Linear``; Fixup-style initialisation
  keeps it trainable without normalisation.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Bias, Scale
from ._base import ImageClassifier

NORMS = ("fixup", "batchnorm", "none")


def _conv3x3(cin: int, cout: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class FixupBlock(nn.Module):
    """Fixup pre-activation basic block: ``x -> relu(x + a1) -> conv1 -> +b1 -> relu -> drop ->
    +a2 -> conv2 -> *s -> +b2``, added to the (1x1-conv) shortcut. ``(N, Cin, H, W) -> (N, Cout,
    H/stride, W/stride)``. Scalars are :class:`~marglik.nn.Bias` / :class:`~marglik.nn.Scale`."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bias1a, self.bias1b = Bias(1), Bias(1)
        self.bias2a, self.bias2b = Bias(1), Bias(1)
        self.scale = Scale(1)
        self.conv1 = _conv3x3(cin, cout, stride, bias=False)
        self.conv2 = _conv3x3(cout, cout, 1, bias=False)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: Optional[nn.Conv2d] = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bias1a(x))
        out = F.relu(self.bias1b(self.conv1(a)))
        out = self.conv2(self.bias2a(self.drop(out)))
        out = self.bias2b(self.scale(out))
        return out + (x if self.shortcut is None else self.shortcut(a))


class PlainBlock(nn.Module):
    """Pre-activation basic block without normalisation (convs with bias):
    ``relu -> conv1 -> relu -> drop -> conv2`` plus (1x1-conv) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride, bias=True)
        self.conv2 = _conv3x3(cout, cout, 1, bias=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: Optional[nn.Conv2d] = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(x)
        out = self.conv2(self.drop(F.relu(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class BNBlock(nn.Module):
    """Standard WRN pre-activation block: ``bn -> relu -> conv1 -> bn -> relu -> drop -> conv2``
    plus shortcut (the 1x1 shortcut conv sees the pre-activated input, as in the reference)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = _conv3x3(cin, cout, stride, bias=False)
        self.conv2 = _conv3x3(cout, cout, 1, bias=False)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: Optional[nn.Conv2d] = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(self.drop(F.relu(self.bn2(self.conv1(a)))))
        return out + (x if self.shortcut is None else self.shortcut(a))


_BLOCKS = {"fixup": FixupBlock, "batchnorm": BNBlock, "none": PlainBlock}


class WideResNet(ImageClassifier):
    """WRN-``depth``-``widen_factor`` (see module docstring).

    Args:
        depth: total depth, ``6n + 4`` (16, 22, 28, ...).
        widen_factor: ``k``; stage widths ``16k, 32k, 64k``.
        num_classes: number of outputs ``K``.
        in_channels: input channels ``C``.
        norm: ``"fixup"``, ``"batchnorm"`` or ``"none"``.
        dropout: dropout rate between the two convs of each block.

    Shapes: ``(N, C, H, W) -> (N, K)``; ``(N, S, C, H, W) -> (N, K)`` averaged over the copies.
    """

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "fixup",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        block = _BLOCKS[norm]
        self.conv1 = _conv3x3(in_channels, widths[0], 1, bias=norm == "none")
        self.bias1: Optional[Bias] = Bias(1) if norm == "fixup" else None
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [block(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1, dropout)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn: Optional[nn.BatchNorm2d] = nn.BatchNorm2d(widths[3]) if norm == "batchnorm" else None
        self.bias2: Optional[Bias] = Bias(1) if norm == "fixup" else None
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        self._init(num_blocks=3 * n)

    def _init(self, num_blocks: int) -> None:
        # He initialisation that keeps the *forward* signal's scale (fan_in) without normalisation:
        # Fixup prescribes a standard initialisation for the non-zero layers, and fan_out (torchvision's
        # choice for BatchNorm networks, where BN restores the scale) shrinks the signal by
        # sqrt(c_in / c_out) at every widening convolution; on 1-channel digits the pooled features of
        # WRN-16-4 came out at ~1e-2, the classifier's gradient with them, and SGD or Adam sat at
        # chance (results/wrn_marglik.md, runs before this fix). BatchNorm keeps fan_out.
        mode = "fan_out" if self.norm == "batchnorm" else "fan_in"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)
        if self.norm == "batchnorm":
            return
        # Fixup (m = 2 layers per branch): scale the branch's first conv by L^(-1/(2m-2)) = L^(-1/2),
        # zero-initialise its last conv and the classifier.
        for m in self.modules():
            if isinstance(m, (FixupBlock, PlainBlock)):
                m.conv1.weight.data.mul_(num_blocks ** -0.5)
                nn.init.zeros_(m.conv2.weight)
        nn.init.zeros_(self.fc.weight)

    def features(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, 64k)`` of images ``(B, C, H, W)``."""
        out = self.conv1(x)
        if self.bias1 is not None:
            out = self.bias1(out)
        out = self.block3(self.block2(self.block1(out)))
        if self.bn is not None:
            out = self.bn(out)
        if self.bias2 is not None:
            out = self.bias2(out)
        out = F.relu(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward_single(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
