"""Model zoo: image classifiers (all accept ``(N, C, H, W)`` and ``(N, S, C, H, W)`` inputs) and a
graph network."""

from __future__ import annotations

from typing import Any

from torch import nn

from .cnn import SmallCNN
from .gnn import GNN
from .mlp import MLP
from .tv import ModelCannotRunError, TorchvisionClassifier, UnknownModelError, torchvision_classifiers
from .tv_vit import TorchvisionViT
from .vit import UNCOVERED_MODULES, ClassToken, PositionalEmbedding, ViT
from .wrn import WideResNet

__all__ = ["MLP", "SmallCNN", "WideResNet", "ViT", "TorchvisionViT", "GNN", "get_model", "MODEL_NAMES",
           "PositionalEmbedding", "ClassToken", "UNCOVERED_MODULES", "TorchvisionClassifier",
           "torchvision_classifiers", "ModelCannotRunError", "UnknownModelError"]

MODEL_NAMES = ("mlp", "cnn", "wrn16_4", "vit", "tv")


def get_model(name: str, in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build an image classifier by name; ``kwargs`` go to the constructor.

    * ``"mlp"``: :class:`MLP` on ``in_channels * image_size ** 2`` features.
    * ``"cnn"``: :class:`SmallCNN`.
    * ``"wrn16_4"``: :class:`WideResNet` with depth 16, widen factor 4 (``norm``, ``dropout``).
    * ``"vit"``: :class:`TorchvisionViT` (torchvision's ``VisionTransformer``) for ``image_size`` inputs.
    * ``"tv"``: :class:`TorchvisionClassifier`, any torchvision classifier by name (``arch=...``).
    """
    if name == "mlp":
        return MLP(in_channels * image_size**2, num_classes, **kwargs)
    if name == "cnn":
        return SmallCNN(in_channels, num_classes, **kwargs)
    if name == "wrn16_4":
        return WideResNet(16, 4, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if name == "vit":
        return TorchvisionViT(image_size=image_size, in_channels=in_channels, num_classes=num_classes, **kwargs)
    if name == "tv":
        return TorchvisionClassifier(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
