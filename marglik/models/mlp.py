"""Fully connected classifier on flattened inputs."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ._base import ImageClassifier

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class MLP(ImageClassifier):
    """``Linear -> act -> ... -> Linear`` on the flattened input.

    Args:
        in_features: number of input features per example (``C * H * W`` for images).
        num_classes: number of outputs ``K``.
        hidden: widths of the hidden layers (default two layers of 128).
        activation: ``"tanh"`` or ``"relu"``.

    Shapes: ``(N, in_features)`` or ``(N, C, H, W)`` -> ``(N, K)``; ``(N, S, C, H, W)`` ->
    ``(N, K)`` averaged over the ``S`` copies (see :class:`ImageClassifier`).

    Parameters live only in ``nn.Linear`` modules (``self.net``).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128, 128),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.in_features, self.num_classes = in_features, num_classes
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward_single(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))

    def as_sequential(self) -> nn.Sequential:
        """``Flatten -> self.net`` as one ``nn.Sequential`` sharing this model's modules (the
        single-image forward pass; for BackPACK, which needs sequential models)."""
        return nn.Sequential(nn.Flatten(), *self.net)
