"""A small convolutional network for low-resolution images (e.g. 8x8 digits)."""

from __future__ import annotations

from torch import Tensor, nn

from ._base import ImageClassifier


class SmallCNN(ImageClassifier):
    """``[Conv3x3 -> ReLU -> MaxPool2] -> [Conv3x3 -> ReLU -> AdaptiveAvgPool(2)] -> MLP head``.

    Args:
        in_channels: input channels ``C``.
        num_classes: number of outputs ``K``.
        width: channels of the first conv; the second has ``2 * width``.
        hidden: width of the hidden fully connected layer (``0``: linear head only).

    Shapes: ``(N, C, H, W)`` with ``H, W >= 2`` -> ``(N, K)``; ``(N, S, C, H, W)`` -> ``(N, K)``
    averaged over the copies. Parameters live only in ``nn.Conv2d`` and ``nn.Linear`` modules.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        feat = 2 * width * 4
        if hidden > 0:
            self.head = nn.Sequential(nn.Linear(feat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        else:
            self.head = nn.Sequential(nn.Linear(feat, num_classes))

    def forward_single(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def as_sequential(self) -> nn.Sequential:
        """``features -> head`` as one ``nn.Sequential`` sharing this model's modules (the
        single-image forward pass; for BackPACK, which needs sequential models)."""
        return nn.Sequential(*self.features, *self.head)
