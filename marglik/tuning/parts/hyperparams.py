"""The hyperparameters of a run: the prior precision ``delta`` (in log space, with the prior term of
the MAP loss) and the learned augmentation ``eta`` (with how a batch is augmented)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...augment import AffineAugmentation
from ..distributed import DistContext


class PriorPrecision:
    """``log delta``: one scalar, or one per trainable parameter tensor (``layerwise``).

    Args:
        named_params: the trainable ``(name, parameter)`` pairs, in the model's order.
        structure: ``"scalar"`` or ``"layerwise"``.
        init: the initial precision ``delta``.
        device: where ``log delta`` lives.
    """

    def __init__(self, named_params: Sequence[Tuple[str, Tensor]], structure: str, init: float,
                 device: torch.device) -> None:
        self.names: List[str] = [n for n, _ in named_params]
        self.params: List[Tensor] = [p for _, p in named_params]
        self.structure = str(getattr(structure, "value", structure))
        n = 1 if self.structure == "scalar" else len(self.params)
        self.log_prior = nn.Parameter(torch.full((n,), math.log(init), device=device))

    def precision(self) -> Tensor:
        """The prior precision ``exp(log delta)`` (differentiable w.r.t. ``log delta``).

        Returns:
            A 0-d tensor (scalar) or shape ``(L,)`` (layerwise).
        """
        prec = self.log_prior.exp()
        return prec.squeeze(0) if self.structure == "scalar" else prec

    def by_name(self) -> Dict[str, float]:
        """Returns: ``{parameter name: precision}`` (layerwise), or ``{"all": precision}`` (scalar)."""
        prec = self.log_prior.detach().exp().tolist()
        if len(prec) == 1 and self.structure == "scalar":
            return {"all": prec[0]}
        return dict(zip(self.names, prec))

    def term(self, n_data: int) -> Tensor:
        """``delta ||theta||^2 / (2 N)``: the negative log prior / ``N`` (no gradient to ``delta``).

        Args:
            n_data: ``N``.

        Returns:
            A 0-d tensor.
        """
        delta = self.log_prior.detach().exp()
        if delta.numel() == 1:
            reg = delta[0] * sum((p * p).sum() for p in self.params)
        else:
            reg = sum(d * (p * p).sum() for d, p in zip(delta, self.params))
        return 0.5 * reg / n_data

    def state_dict(self) -> Dict[str, Any]:
        """Returns: ``{"log_prior": tensor}``."""
        return {"log_prior": self.log_prior.detach().clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Args: state: a :meth:`state_dict`."""
        with torch.no_grad():
            self.log_prior.copy_(state["log_prior"])


def sharing_eta(aug: AffineAugmentation, n_samples: int) -> AffineAugmentation:
    """An augmentation with ``n_samples`` copies that holds ``aug``'s ``eta`` parameter itself (not a
    copy), so the MAP steps always warp with the ranges the hypersteps learn.

    Args:
        aug: the augmentation whose ``eta`` is shared.
        n_samples: copies per image of the new augmentation.

    Returns:
        The new augmentation (``aug`` itself when ``n_samples`` equals its own).
    """
    if n_samples == aug.n_samples:
        return aug
    out = AffineAugmentation(n_samples, generators=aug.generators).to(aug.eta.device)
    out.eta = aug.eta  # nn.Module registers the same Parameter object
    return out


class Augmenter:
    """The learned augmentation: ``S`` augmented copies of every image with the current ``eta``.

    Args:
        aug: the training / marglik augmentation (holds ``eta``).
        aug_test: the test-time augmentation (``S_test`` copies; takes ``eta`` from ``aug``).
        enabled: learn and apply the augmentation (off: batches pass unchanged).
        generator: the default noise stream (the run's ``aug`` stream).
        dist: the process group (sharded augmentation under ``torchrun``).
        image_size: for the ranges in pixels (``None``: normalised units).
        aug_train: the augmentation of the MAP steps (``S'`` copies, ``hyper.train_samples``); it must
            hold ``aug``'s ``eta`` itself (:func:`sharing_eta`). ``None``: ``aug`` (the fits' ``S``).
    """

    def __init__(self, aug: AffineAugmentation, aug_test: AffineAugmentation, enabled: bool,
                 generator: torch.Generator, dist: DistContext, image_size: Optional[int] = None,
                 aug_train: Optional[AffineAugmentation] = None) -> None:
        self.aug, self.aug_test, self.enabled = aug, aug_test, bool(enabled)
        self.generator, self.dist, self.image_size = generator, dist, image_size
        self.aug_train = aug if aug_train is None else aug_train
        if self.aug_train.eta is not aug.eta:
            raise ValueError("aug_train must share aug's eta (marglik.tuning.parts.hyperparams.sharing_eta)")

    @property
    def eta(self) -> nn.Parameter:
        """The augmentation parameters."""
        return self.aug.eta

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None,
                 aug: Optional[AffineAugmentation] = None, shard: bool = False) -> Tensor:
        """Augmented copies ``(n, S, C, H, W)`` of ``x (n, C, H, W)`` (``x`` itself when off).

        ``shard=True`` (data parallel): ``x`` is a global batch; the noise is drawn for all of it,
        as a single process would, and this rank's shard of the augmented batch is returned.

        Args:
            x: the batch.
            generator: the noise stream (default: the run's ``aug`` stream).
            aug: which augmentation (default: the training one).
            shard: return this rank's shard of the global batch.

        Returns:
            The augmented batch (or this rank's shard of it).
        """
        gen = generator if generator is not None else self.generator
        if shard and self.dist.enabled:
            part = self.dist.shard(len(x))
            if not self.enabled:
                return x[part]
            aug = aug or self.aug
            return aug(x[part], eps=aug.sample_eps(len(x), gen)[part])
        if not self.enabled:
            return x
        aug = aug or self.aug
        return aug(x, generator=gen)

    def ranges(self) -> Dict[str, float]:
        """Returns: ``{generator: range}`` (rotation in degrees, translations in pixels, ...)."""
        return self.aug.ranges(image_size=self.image_size)

    def state_dict(self) -> Dict[str, Any]:
        """Returns: ``{"eta": tensor}``."""
        return {"eta": self.aug.eta.detach().clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Args: state: a :meth:`state_dict`."""
        with torch.no_grad():
            self.aug.eta.copy_(state["eta"])
