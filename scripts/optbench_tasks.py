"""The tasks of ``bench_optimizer.py`` (a library module: no entry point): the torchvision ViT on
warped digits, marglik's ViT on 8x8 digits and the GNN on the generated hub-edge graphs, each a
model factory, a batch sampler and a validation set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from marglik.augment import AffineAugmentation
from marglik.data import collate_graphs, load_dataset, make_graph_dataset
from marglik.models import GNN, TorchvisionViT, ViT


@dataclass
class Task:
    """A training task: model factory, batch sampler and validation set."""

    name: str
    make_model: Callable[[], nn.Module]
    train_size: int
    get_batch: Callable[[Tensor, torch.Generator], Tuple[Any, Tensor]]  # (indices, generator) -> (input, y)
    val: Tuple[Any, Tensor]
    description: str


def call_model(model: nn.Module, X: Any) -> Tensor:
    return model(*X) if isinstance(X, tuple) else model(X)


TVVIT_MODEL = dict(image_size=16, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128)
TVVIT_WARP = dict(rotation_deg=20.0, shift=0.15, log_scale=0.1, val_copies=4)


def digit_warps(rotation_deg: float, shift: float, log_scale: float) -> AffineAugmentation:
    """Random affine warps of fixed ranges: rotation (degrees), shifts (fraction of the image side)
    and an isotropic log-scale (``scale_x = scale_y``, one shared draw)."""
    aug = AffineAugmentation(1, ("rotation", "translation_x", "translation_y", "scale_x", "scale_y"))
    with torch.no_grad():  # translations in normalised units: the side spans 2
        aug.eta.copy_(torch.tensor([math.radians(rotation_deg), 2 * shift, 2 * shift, log_scale, log_scale]))
    aug.requires_grad_(False)
    return aug


def _warp(aug: AffineAugmentation, x: Tensor, gen: torch.Generator) -> Tensor:
    eps = aug.sample_eps(len(x), gen)
    eps[..., 4] = eps[..., 3]  # isotropic scale
    return aug(x, eps=eps)[:, 0]


def make_tvvit_task(model_kwargs: Optional[Dict[str, Any]] = None) -> Task:
    """torchvision ViT on upsampled digits under fresh random affine warps every step."""
    mk = dict(TVVIT_MODEL, **(model_kwargs or {}))
    train, val, _ = load_dataset("digits", upsample=mk["image_size"])
    X, y = train.tensors
    aug = digit_warps(TVVIT_WARP["rotation_deg"], TVVIT_WARP["shift"], TVVIT_WARP["log_scale"])
    Xv, yv = val.tensors
    gv = torch.Generator().manual_seed(12345)
    copies = TVVIT_WARP["val_copies"]
    with torch.no_grad():
        val_x = torch.cat([_warp(aug, Xv, gv) for _ in range(copies)])

    def make_model() -> nn.Module:
        return TorchvisionViT(in_channels=1, num_classes=10, **mk)

    def get_batch(idx: Tensor, gen: torch.Generator):
        with torch.no_grad():
            return _warp(aug, X[idx], gen), y[idx]

    return Task(
        "tvvit", make_model, len(X), get_batch, (val_x, yv.repeat(copies)),
        f"torchvision VisionTransformer ({mk['image_size']}x{mk['image_size']} inputs, {mk['patch_size']}x"
        f"{mk['patch_size']} patches, width {mk['hidden_dim']}, {mk['num_layers']} layers, {mk['num_heads']} heads, "
        f"MLP {mk['mlp_dim']}) on digits upsampled to {mk['image_size']}x{mk['image_size']} under fresh random "
        f"affine warps every step (rotation +-{TVVIT_WARP['rotation_deg']:g} deg, shifts +-"
        f"{100 * TVVIT_WARP['shift']:g}%, log-scale +-{TVVIT_WARP['log_scale']:g}); validation: 360 held-out "
        f"digits x {copies} fixed warps ({360 * copies} images)",
    )


def make_vit_task() -> Task:
    """marglik's ViT on 8x8 digits (no augmentation)."""
    train, val, _ = load_dataset("digits")
    X, y = train.tensors

    def make_model() -> nn.Module:
        return ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128)

    return Task(
        "vit", make_model, len(X), lambda idx, gen: (X[idx], y[idx]), tuple(val.tensors),
        "ViT (2x2 patches, 16 tokens, width 64, depth 2, 4 heads) on digits 8x8 (1437 train / 360 val)",
    )


def make_gnn_task(num_train: int = 2000, num_val: int = 500) -> Task:
    """GIN-style GNN on the generated hub-edge graph task."""
    train = make_graph_dataset(num_train, seed=0)
    val = make_graph_dataset(num_val, seed=1)
    vb, vy = collate_graphs(val)

    def make_model() -> nn.Module:
        return GNN(in_dim=1, hidden_dim=64, num_classes=2, num_layers=3, readout="mean", aggregation="sum")

    def get_batch(idx: Tensor, gen: torch.Generator):
        b, yb = collate_graphs([train[i] for i in idx.tolist()])
        return tuple(b), yb

    return Task(
        "gnn", make_model, len(train), get_batch, (tuple(vb), vy),
        f"GIN-style GNN (3 layers, width 64, sum aggregation, mean readout) on the generated hub-edge task "
        f"({num_train} train / {num_val} val graphs, 6-14 nodes)",
    )


MAKERS = {"tvvit": make_tvvit_task, "gnn": make_gnn_task, "vit": make_vit_task}
