"""Elementwise affine parameters: ``y = x_hat * weight + bias`` broadcast over shared axes.

Covers ``BatchNorm1d/2d/3d``, ``GroupNorm``, ``LayerNorm`` (and ``RMSNorm`` where torch has
it), torchvision ConvNeXt's ``LayerNorm2d`` (a layer norm over the channel axis 1 of ``(N, C, H, W)``)
and :class:`marglik.nn.Scale` / :class:`marglik.nn.Bias`. A ``LayerNorm`` / ``RMSNorm`` subclass that
overrides ``forward`` (other than ``LayerNorm2d``) normalises axes this module cannot know: it has
no rule, and the engine's error names it. For channel ``c`` and curvature
column ``k`` the Jacobian-vector products of example ``n`` are
``v_w = sum_r g[k, n, r, c] * x_hat[n, r, c]`` and ``v_b = sum_r g[k, n, r, c]``; the block is
``sum_{n,k} v v^T`` -- the *exact* per-channel 2x2 block of the GGN/Fisher (no Kronecker
approximation, so ``approx`` does not apply). ``x_hat`` is recomputed from the layer input with
the statistics the layer itself uses in its current mode; in BatchNorm's training mode the
dependence of the batch statistics on other examples is not differentiated (the usual convention:
the exact GGN of a train-mode BatchNorm network is not a sum over examples).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ...nn import Bias, Scale
from .base import ElementwiseRule

_NORMS_CHANNEL_FIRST = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)
_NORMS_TRAILING = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class ChannelFirstNormRule(ElementwiseRule):
    """BatchNorm / GroupNorm: channel axis 1 of ``(T, C, *)``."""

    module_types = _NORMS_CHANNEL_FIRST

    def num_channels(self, module: nn.Module) -> int:
        return module.num_features if hasattr(module, "num_features") else module.num_channels

    def normalized(self, module: nn.Module, x: Tensor) -> Optional[Tensor]:
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, None, None, module.eps)
        use_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
        if use_batch_stats:
            return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)

    def channel_sums(self, module: nn.Module, t: Tensor) -> Tensor:
        K, T, C = t.shape[:3]
        return t.reshape(K, T, C, -1).sum(-1)


def _is_layer_norm_2d(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__, cls.__name__) == ("torchvision.models.convnext", "LayerNorm2d")


class ChannelFirstLayerNormRule(ElementwiseRule):
    """torchvision's ``LayerNorm2d``: ``layer_norm`` over the channel axis 1 of ``(T, C, *)``."""

    def matches(self, module: nn.Module) -> bool:
        return _is_layer_norm_2d(module)

    def num_channels(self, module: nn.Module) -> int:
        return module.normalized_shape[0]

    def normalized(self, module: nn.Module, x: Tensor) -> Optional[Tensor]:
        xt = x.movedim(1, -1)
        return F.layer_norm(xt, module.normalized_shape, None, None, module.eps).movedim(-1, 1)

    def channel_sums(self, module: nn.Module, t: Tensor) -> Tensor:
        K, T, C = t.shape[:3]
        return t.reshape(K, T, C, -1).sum(-1)


class TrailingNormRule(ElementwiseRule):
    """LayerNorm / RMSNorm: the channels are the flattened ``normalized_shape`` (trailing axes).

    Only modules running the base class's ``forward``: a subclass with its own ``forward`` may
    normalise other axes (``LayerNorm2d`` has :class:`ChannelFirstLayerNormRule`).
    """

    module_types = _NORMS_TRAILING

    def matches(self, module: nn.Module) -> bool:
        if not isinstance(module, self.module_types):
            return False
        base = next(c for c in self.module_types if isinstance(module, c))
        return type(module).forward is base.forward

    def num_channels(self, module: nn.Module) -> int:
        n = 1
        for s in module.normalized_shape:
            n *= s
        return n

    def normalized(self, module: nn.Module, x: Tensor) -> Optional[Tensor]:
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return F.rms_norm(x, module.normalized_shape, None, module.eps)

    def channel_sums(self, module: nn.Module, t: Tensor) -> Tensor:
        K, T = t.shape[:2]
        return t.reshape(K, T, -1, self.num_channels(module)).sum(2)


class ScaleBiasRule(ElementwiseRule):
    """:class:`marglik.nn.Scale` (weight only) and :class:`marglik.nn.Bias` (bias only)."""

    module_types = (Scale, Bias)

    def num_channels(self, module: nn.Module) -> int:
        return module.num_channels

    def normalized(self, module: nn.Module, x: Tensor) -> Optional[Tensor]:
        return x if isinstance(module, Scale) else None

    def channel_sums(self, module: nn.Module, t: Tensor) -> Tensor:
        K, T = t.shape[:2]
        if module.num_channels == 1:
            return t.reshape(K, T, -1).sum(-1, keepdim=True)
        dim = module.dim if module.dim < 0 else module.dim + 1  # t carries the extra K axis
        t = t.movedim(dim, -1)
        return t.reshape(K, T, -1, module.num_channels).sum(2)
