"""A small Vision Transformer (Dosovitskiy et al. 2021) built from ``nn.Linear`` projections.

``model=vit`` in the CLI is torchvision's ``VisionTransformer`` (:mod:`.tv_vit`), which the engine
now covers completely. This hand-written ViT stays for what torchvision's lacks: mean pooling
(no class token), a linear patch embedding, and attention as plain ``nn.Linear`` layers -- the
form of the existing optimizer benchmark (``scripts/bench_optimizer.py --tasks vit``, whose
results in ``results/optimizer_steps_to_target.*`` were produced with it).

Attention uses separate ``nn.Linear`` query/key/value/output projections applied to token
tensors ``(B, T, D)`` (not ``nn.MultiheadAttention``), so every projection is a weight-sharing
linear layer (shared over the ``T`` tokens) the curvature engine covers.

Where the trainable parameters live: ``nn.Linear`` (or the ``nn.Conv2d`` patch embedding),
``nn.LayerNorm``, and two raw parameters that no torch layer can hold, each isolated in a tiny
module with attribute ``weight``:

* :class:`PositionalEmbedding` (learned, added to the tokens), and
* :class:`ClassToken` (only with ``pool="cls"``).

The curvature engine does not model these; tell it to ignore them (e.g. skip modules of the
types in :data:`UNCOVERED_MODULES`), in which case they get no Laplace posterior. Both carry the
marker ``marglik_first_order = True`` (:func:`marglik.curvature.module_selection.is_first_order`),
so :class:`marglik.optim.KFACOptimizer` updates them first-order without being told.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import ImageClassifier


class PositionalEmbedding(nn.Module):
    """Learned additive embedding: ``(B, T, D) -> (B, T, D)``, ``weight`` of shape ``(T, D)``.

    Not covered by the curvature engine (a raw parameter); see the module docstring.
    """

    marglik_first_order = True  #: a raw parameter the engine does not cover (see the module docstring)

    def __init__(self, num_tokens: int, dim: int, std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_tokens, dim) * std)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight


class ClassToken(nn.Module):
    """Prepends a learned token: ``(B, T, D) -> (B, T + 1, D)``, ``weight`` of shape ``(D,)``.

    Not covered by the curvature engine (a raw parameter); see the module docstring.
    """

    marglik_first_order = True  #: a raw parameter the engine does not cover (see the module docstring)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.weight.expand(x.shape[0], 1, -1), x], dim=1)


#: Parameter-holding module types of this file that the curvature engine must skip.
UNCOVERED_MODULES = (PositionalEmbedding, ClassToken)


class Attention(nn.Module):
    """Multi-head self-attention, ``(B, T, D) -> (B, T, D)``, with ``nn.Linear`` q/k/v/out."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, D/H)
            return y.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(y)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``; ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(ImageClassifier):
    """Vision Transformer for small images.

    Args:
        image_size: input height = width ``H``; must be divisible by ``patch_size``.
        patch_size: side ``p`` of the square patches; ``T = (H / p) ** 2`` tokens.
        in_channels: input channels ``C``.
        num_classes: number of outputs ``K``.
        dim: token width ``D``.
        depth: number of transformer blocks.
        heads: attention heads (``D`` divisible by ``heads``).
        mlp_dim: hidden width of the blocks' MLPs.
        pool: ``"mean"`` (average the tokens) or ``"cls"`` (a learned class token).
        patch_embed: ``"conv"`` (``nn.Conv2d`` with kernel = stride = ``p``) or ``"linear"``
            (``F.unfold`` into ``(B, T, C p^2)`` patch vectors, then ``nn.Linear``).

    Shapes: ``(N, C, H, W) -> (N, K)``; ``(N, S, C, H, W) -> (N, K)`` averaged over the copies.
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
        pool: str = "mean",
        patch_embed: str = "conv",
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        if patch_embed not in ("conv", "linear"):
            raise ValueError(f"patch_embed must be 'conv' or 'linear', got {patch_embed!r}")
        self.patch_size, self.pool, self.patch_embed = patch_size, pool, patch_embed
        num_patches = (image_size // patch_size) ** 2
        if patch_embed == "conv":
            self.embed: nn.Module = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        else:
            self.embed = nn.Linear(in_channels * patch_size**2, dim)
        self.cls = ClassToken(dim) if pool == "cls" else None
        self.pos = PositionalEmbedding(num_patches + (pool == "cls"), dim)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, x: Tensor) -> Tensor:
        """Patch tokens ``(B, T, D)`` of images ``(B, C, H, W)``."""
        if self.patch_embed == "conv":
            return self.embed(x).flatten(2).transpose(1, 2)
        patches = F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)
        return self.embed(patches)

    def forward_single(self, x: Tensor) -> Tensor:
        z = self.tokens(x)
        if self.cls is not None:
            z = self.cls(z)
        z = self.norm(self.blocks(self.pos(z)))
        z = z[:, 0] if self.pool == "cls" else z.mean(dim=1)
        return self.head(z)
