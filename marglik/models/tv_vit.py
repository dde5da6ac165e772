"""torchvision's ``VisionTransformer`` as a model-zoo image classifier (``model=vit`` in the CLI).

The network is ``torchvision.models.VisionTransformer`` itself -- ``nn.MultiheadAttention``
attention, a class token and a learned positional embedding -- so everything the curvature engine
does on it is what it does on the transformers PyTorch users have: the packed q/k/v projections
are a 3-group Kronecker block (:mod:`marglik.curvature.layers.attention`), ``class_token`` and
``encoder.pos_embedding`` get exact blocks (:mod:`marglik.curvature.layers.leaf`). Two changes
to fit small images: the patch embedding ``conv_proj`` takes ``in_channels`` channels (torchvision
hard-codes 3; re-initialised with torchvision's own rule), and the defaults are a small model for
8x8 digits (2x2 patches -> 16 tokens + class token, width 32, 2 layers, 4 heads).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..compat import check_torchvision
from ._base import ImageClassifier


class TorchvisionViT(ImageClassifier):
    """``torchvision.models.VisionTransformer`` on ``(N, C, H, W)`` / ``(N, S, C, H, W)`` images.

    Args:
        image_size: input height = width (divisible by ``patch_size``).
        in_channels: image channels.
        num_classes: outputs.
        patch_size, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout:
            torchvision's arguments.
    """

    def __init__(
        self,
        image_size: int = 8,
        in_channels: int = 1,
        num_classes: int = 10,
        patch_size: int = 2,
        num_layers: int = 2,
        num_heads: int = 4,
        hidden_dim: int = 32,
        mlp_dim: int = 64,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_torchvision()  # a torchvision built for another torch: say so, once, instead of its import error
        from torchvision.models import VisionTransformer  # imported on use: `import marglik` stays light

        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        self.vit = VisionTransformer(
            image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
            hidden_dim=hidden_dim, mlp_dim=mlp_dim, dropout=dropout, attention_dropout=attention_dropout,
            num_classes=num_classes,
        )
        if in_channels != 3:
            conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
            fan_in = in_channels * patch_size * patch_size  # torchvision's initialisation of conv_proj
            nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(conv.bias)
            self.vit.conv_proj = conv

    def forward_single(self, x: Tensor) -> Tensor:
        return self.vit(x)
