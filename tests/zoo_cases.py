"""Tiny instances of torchvision's classification families, built from torchvision's own classes.

Each builder returns a random-init network with 3 classes for ``(N, 3, 16, 16)`` inputs, small
enough for float64 references. Where the family's top-level class takes its widths as
constructor arguments (MobileNetV3, EfficientNet, ConvNeXt, RegNet, DenseNet, ShuffleNetV2,
SqueezeNet, MaxVit, SwinTransformer, VisionTransformer) it is that class; ResNet hard-codes its widths (64 to 512), so the
ResNet families stack torchvision's own ``BasicBlock`` / ``Bottleneck`` (with ``groups`` and
``base_width``: ResNeXt, Wide ResNet) behind a small stem -- the same in-place ReLUs and residual
``out += identity`` as the shipped models.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import convnext, densenet, efficientnet, mobilenetv3, regnet, resnet, shufflenetv2

C = 3  #: classes
SIZE = 16  #: input height and width


def _resnet(block: type, planes: int, **kw) -> nn.Module:
    exp = block.expansion
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    down = nn.Sequential(resnet.conv1x1(8, planes * 2 * exp, stride=2), nn.BatchNorm2d(planes * 2 * exp))
    first = block(8, 8 // exp, **kw) if exp > 1 else block(8, 8)
    return nn.Sequential(
        stem, first, block(8, planes * 2, stride=2, downsample=down, **kw),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(planes * 2 * exp, C),
    )


def _mobilenet_v3() -> nn.Module:
    cfg = partial(mobilenetv3.InvertedResidualConfig, dilation=1, width_mult=1.0)
    setting = [cfg(8, 3, 8, 8, True, "RE", 2), cfg(8, 3, 16, 8, True, "HS", 1)]
    return mobilenetv3.MobileNetV3(setting, last_channel=16, num_classes=C)


def _efficientnet() -> nn.Module:
    setting = [efficientnet.MBConvConfig(1, 3, 1, 8, 8, 1), efficientnet.MBConvConfig(2, 3, 2, 8, 16, 2)]
    return efficientnet.EfficientNet(setting, dropout=0.2, num_classes=C, last_channel=16)


def _convnext() -> nn.Module:
    setting = [convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)]
    return convnext.ConvNeXt(setting, layer_scale=0.5, num_classes=C)


def _regnet(se: bool) -> nn.Module:
    params = regnet.BlockParams([1, 1], [8, 16], [4, 4], [1.0, 1.0], [2, 2], se_ratio=0.25 if se else None)
    return regnet.RegNet(params, num_classes=C, stem_width=8)


def _squeezenet() -> nn.Module:
    model = tvm.SqueezeNet(version="1_1", num_classes=C)
    with torch.no_grad():  # zero biases and ReLU after the classifier: at random init most units are dead
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.uniform_(0.0, 0.2)
    return model


BUILDERS: Dict[str, Callable[[], nn.Module]] = {
    "resnet18": partial(_resnet, resnet.BasicBlock, 8),
    "resnet50": partial(_resnet, resnet.Bottleneck, 4),
    "wide_resnet50_2": partial(_resnet, resnet.Bottleneck, 4, base_width=128),
    "resnext50_32x4d": partial(_resnet, resnet.Bottleneck, 8, groups=4, base_width=32),
    "mobilenet_v3_small": _mobilenet_v3,
    "efficientnet_b0": _efficientnet,
    "convnext_tiny": _convnext,
    "regnet_x_400mf": partial(_regnet, False),
    "regnet_y_400mf": partial(_regnet, True),
    "densenet121": partial(densenet.DenseNet, growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2,
                           num_classes=C),
    "shufflenet_v2_x0_5": partial(shufflenetv2.ShuffleNetV2, [1, 1, 1], [8, 8, 16, 16, 16], num_classes=C),
    "squeezenet1_1": _squeezenet,
    "maxvit_t": partial(tvm.MaxVit, input_size=(SIZE, SIZE), stem_channels=8, partition_size=2, block_channels=[8],
                        block_layers=[1], head_dim=4, stochastic_depth_prob=0.0, num_classes=C),
    "swin_t": partial(tvm.SwinTransformer, patch_size=[4, 4], embed_dim=8, depths=[2, 1], num_heads=[2, 2],
                      window_size=[2, 2], stochastic_depth_prob=0.0, num_classes=C),
    "vit_b_16": partial(tvm.VisionTransformer, image_size=SIZE, patch_size=8, num_layers=1, num_heads=2,
                        hidden_dim=8, mlp_dim=8, num_classes=C),
}


#: input height and width per family (SqueezeNet's three max-pools need more than 16)
SIZES: Dict[str, int] = {"squeezenet1_1": 32}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The tiny ``name`` instance, in eval mode, with norms' affine parameters and statistics moved off
    (1, 0) and zero-initialised weights (ViT's head) drawn at random."""
    torch.manual_seed(seed)
    model = BUILDERS[name]().to(dtype).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():  # ViT's zero head: no gradient
                m.weight.normal_(0.0, 0.3)
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.3 * torch.randn_like(m.bias))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.mul_(1 + 0.2 * torch.rand_like(m.running_var))
    return model


def data(name: str, n: int = 3, seed: int = 1, dtype: torch.dtype = torch.float64):
    """``(X, y)``: ``n`` random images of the family's size and class labels."""
    g = torch.Generator().manual_seed(seed)
    s = SIZES.get(name, SIZE)
    return torch.randn(n, 3, s, s, generator=g, dtype=dtype), torch.randint(0, C, (n,), generator=g)
