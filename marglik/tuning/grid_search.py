"""The practitioner's baseline: a validation-set grid search over weight decay and a rotation range.

What a user does instead of marginal-likelihood tuning, built from the same parts as a tuning run so
that only the protocol differs (:mod:`marglik.tuning.parts`: the same MAP step, optimizer, cosine
learning rate, epochs and batch size, the project's affine warp):

1. :func:`stratified_split` the training set into ``1 - val_fraction`` training and ``val_fraction``
   validation examples, per class, with a fixed generator (the same split for every cell and seed).
2. Train one network per cell (:func:`train_fixed`) with fixed hyperparameters: a scalar prior
   precision ``delta`` from the weight decay (:func:`delta_from_weight_decay`) and a fixed rotation
   range, one fresh random rotation per example per step (one augmented copy, ``S = 1``; the angle
   of each example is drawn on its own, never one angle per batch).
3. Pick the cell with the lowest validation NLL (:func:`pick`), retrain it on all training data and
   score it on the test set, plainly and averaged over ``S`` rotations (:func:`score`).

Weight decay and the prior precision. The MAP loss of a run is ``mean NLL + delta ||theta||^2 /
(2 N)`` (:class:`~marglik.tuning.parts.PriorPrecision`), and the usual weight-decay loss is ``mean
NLL + wd ||theta||^2 / 2``; they are the same objective when ``delta = wd * N`` (``N``: the
examples the network trains on).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..augment import AffineAugmentation
from ..models import get_model
from .distributed import DistContext
from .parts import Augmenter, Evaluation, MapStep, PriorPrecision, TensorData, map_optimizer
from .schedules import map_lr
from .seeds import seed_everything


def delta_from_weight_decay(weight_decay: float, n_data: int) -> float:
    """The prior precision that makes a run's MAP loss the weight-decay loss (module docstring).

    Args:
        weight_decay: ``wd`` of ``mean NLL + wd ||theta||^2 / 2``.
        n_data: the examples the network trains on.

    Returns:
        ``delta = wd * N``.

    Raises:
        ValueError: a weight decay <= 0 or ``N < 1``.
    """
    if not weight_decay > 0 or n_data < 1:
        raise ValueError(f"weight_decay must be > 0 and n_data >= 1, got {weight_decay}, {n_data}")
    return float(weight_decay) * int(n_data)


def stratified_split(y: Tensor, val_fraction: float, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """A fixed stratified split: ``round(val_fraction * n_c)`` validation examples of every class ``c``.

    Args:
        y: integer labels ``(N,)``.
        val_fraction: the validation share, in ``(0, 1)``.
        seed: seeds the split (independent of the training seeds).

    Returns:
        ``(train_idx, val_idx)``, sorted index tensors that partition ``range(N)``.

    Raises:
        ValueError: a fraction outside ``(0, 1)``.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    val = []
    for c in torch.unique(y.cpu()):
        idx = torch.nonzero(y.cpu() == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        val.append(idx[: int(round(val_fraction * len(idx)))])
    val_idx = torch.cat(val).sort().values
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[val_idx] = False
    return torch.nonzero(mask).flatten(), val_idx


def rotation_augmentation(degrees: float, n_samples: int = 1) -> AffineAugmentation:
    """The project's affine warp with only the rotation generator, its range fixed at ``degrees``.

    Args:
        degrees: the half-width of the rotation range.
        n_samples: copies per image.

    Returns:
        An :class:`~marglik.augment.AffineAugmentation` whose ``eta`` does not require a gradient.
    """
    aug = AffineAugmentation(n_samples, generators=("rotation",))
    with torch.no_grad():
        aug.eta.fill_(math.radians(degrees))
    aug.eta.requires_grad_(False)
    return aug


def train_fixed(data: TensorData, model_name: str, model_kwargs: Dict[str, Any], delta: float, degrees: float,
                trainer: Any, seed: int, device: Optional[torch.device] = None) -> nn.Module:
    """Train one network with fixed hyperparameters, as a tuning run's MAP steps do (its standard training).

    Args:
        data: training tensors (``X (N, C, H, W)``, ``y``) and the tensors :func:`score` uses later.
        model_name: for :func:`marglik.models.get_model`.
        model_kwargs: its options.
        delta: the scalar prior precision (:func:`delta_from_weight_decay`).
        degrees: the fixed rotation range (0: no augmentation).
        trainer: the ``trainer`` section of a :class:`~marglik.tuning.Config` (``epochs``, ``batch_size``,
            ``lr``, ``lr_min``, ``schedule``, ``optimizer``, ``momentum``).
        seed: seeds the weights, the batch order and the rotations.
        device: where to train (default: the data's).

    Returns:
        The trained network (eval mode).
    """
    device = device or data.X.device
    seed_everything(seed)
    info = data.info
    model = get_model(model_name, info["in_channels"], info["num_classes"], info["image_size"], **model_kwargs).to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    prior = PriorPrecision(named, "scalar", delta, device)
    params = [p for _, p in named]
    opt = map_optimizer(params, trainer)
    gen = torch.Generator().manual_seed(int(seed))
    aug = rotation_augmentation(degrees).to(device)
    augmenter = Augmenter(aug, aug, degrees > 0, gen, DistContext())
    per_epoch = math.ceil(data.N / trainer.batch_size)
    step = MapStep(model, opt, prior, augmenter, data, gen, trainer.batch_size,
                   lr_at=lambda s: map_lr(trainer, s, per_epoch))
    for _ in range(trainer.epochs):
        step.run_epoch()
    return model.eval()


def score(model: nn.Module, X: Tensor, y: Tensor, degrees: float = 0.0, n_samples: int = 1,
          seed: int = 0) -> Dict[str, float]:
    """Accuracy and mean NLL of a network, plainly (``n_samples = 1``, ``degrees`` ignored) or with its
    logits averaged over ``n_samples`` random rotations in ``[-degrees, degrees]`` (as a tuning run's
    model predicts).

    Args:
        model: the network.
        X: inputs ``(n, C, H, W)``.
        y: labels ``(n,)``.
        degrees: the rotation range of the test-time copies.
        n_samples: copies averaged (1: the plain model).
        seed: seeds the test-time rotations.

    Returns:
        ``{"acc", "nll"}``.
    """
    averaged = n_samples > 1 and degrees > 0
    aug = rotation_augmentation(degrees if averaged else 0.0, n_samples).to(X.device)
    augmenter = Augmenter(aug, aug, averaged, torch.Generator().manual_seed(int(seed)), DistContext())
    data = TensorData(X[:1], y[:1], X, y, info={"num_classes": None, "in_channels": None, "image_size": None})
    out = Evaluation(model, augmenter, data, seed, 512)()
    return {"acc": out["test_acc"], "nll": out["test_nll"]}


def pick(cells: Sequence[Dict[str, Any]], key: str = "val_nll") -> Dict[str, Any]:
    """The cell with the lowest ``key`` (``val_nll``), or the highest when ``key`` ends in ``acc``.

    Args:
        cells: one dict per trained cell.
        key: the validation metric.

    Returns:
        The chosen cell (the first of ties).
    """
    if key.endswith("acc"):
        return max(cells, key=lambda c: c[key])
    return min(cells, key=lambda c: c[key])
