"""One epoch of MAP steps on the weights: augmented batches, the negative log joint / N, the
optimizer step and the learning-rate schedule (``eta`` and ``delta`` are never updated here)."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import DistContext
from .data import TensorData
from .hyperparams import Augmenter, PriorPrecision
from .nonfinite import NonFiniteValue


def map_optimizer(params: Any, trainer: Any) -> torch.optim.Optimizer:
    """The optimizer of the MAP steps from the ``trainer`` section: Adam (``lr``) or SGD (``lr``,
    ``momentum``). A tuning run's and a fixed-hyperparameter training's (:mod:`..grid_search`) alike."""
    if trainer.optimizer == "adam":
        return torch.optim.Adam(params, lr=trainer.lr)
    return torch.optim.SGD(params, lr=trainer.lr, momentum=trainer.momentum)


class MapStep:
    """The MAP steps of one epoch (Algorithm 1's inner loop).

    Args:
        net: what the steps call: the model, or its ``DistributedDataParallel`` wrapper.
        optimizer: the optimizer of the trainable weights.
        prior: the prior precision (the prior term of the loss, no gradient to ``delta``).
        augmenter: augments each batch under ``no_grad`` with the current ``eta``.
        data: the training data.
        generator: the data-order stream (a fresh permutation per epoch).
        batch_size: examples per (global) batch.
        lr_at: ``lr_at(global_step)``: the scheduled learning rate (``None``: the optimizer's own,
            constant).
        dist: the process group.

    State: the optimizer, ``global_step`` and ``lr_scale`` (the rollbacks' factor on the lr).
    """

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, prior: PriorPrecision,
                 augmenter: Augmenter, data: TensorData, generator: torch.Generator, batch_size: int,
                 lr_at: Optional[Callable[[int], float]] = None, dist: Optional[DistContext] = None) -> None:
        self.net, self.optimizer, self.prior, self.augmenter, self.data = net, optimizer, prior, augmenter, data
        self.generator, self.batch_size = generator, int(batch_size)
        base = optimizer.param_groups[0]["lr"]
        self.lr_at = lr_at if lr_at is not None else (lambda step: base)
        self.dist = dist if dist is not None else DistContext()
        self.global_step = 0
        self.lr_scale = 1.0

    @property
    def batches_per_epoch(self) -> int:
        """Batches of one epoch."""
        return math.ceil(self.data.N / self.batch_size)

    def set_lr(self) -> float:
        """Set the scheduled learning rate times ``lr_scale``; returns it."""
        lr = self.lr_at(self.global_step) * self.lr_scale
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def loss(self, x: Tensor, y: Tensor, n_global: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Negative log joint / N on one batch (cross-entropy plus the prior term).

        Data parallel: ``x``, ``y`` are this rank's shard of a global batch of ``n_global``
        examples; ``nll`` is then the shard's share of the global mean (its summed NLL /
        ``n_global``) and ``loss`` is ``world_size * nll`` plus the prior term, whose average
        over ranks (DDP's gradient reduction) is the global batch's loss.

        Args:
            x: inputs ``(n, ...)``, or augmented copies ``(n, S, C, H, W)``.
            y: integer labels ``(n,)``.
            n_global: the global batch size when ``x`` is one rank's shard; ``None`` otherwise.

        Returns:
            ``(loss, nll, logits)``: the 0-d loss to back-propagate, the mean NLL (0-d) and the
            logits ``(n, num_classes)``.
        """
        out = self.net(x)
        if n_global is None:
            nll = F.cross_entropy(out, y)
            return nll + self.prior.term(self.data.N), nll, out
        nll = F.cross_entropy(out, y, reduction="sum") / n_global
        return nll * self.dist.world_size + self.prior.term(self.data.N), nll, out

    def run_epoch(self) -> Dict[str, float]:
        """One epoch of MAP steps.

        Returns:
            ``lr`` (of the last step), ``train_loss``, ``train_nll``, ``train_acc``.

        Raises:
            NonFiniteValue: a non-finite loss (kind ``"loss"``); the epoch must be rolled back.
        """
        self.net.train()
        X, y, N = self.data.X, self.data.y, self.data.N
        sharded = self.dist.enabled
        perm = torch.randperm(N, generator=self.generator).to(X.device)
        tot_loss = tot_nll = correct = 0.0
        lr = float("nan")
        for b, idx in enumerate(perm.split(self.batch_size)):
            n = len(idx)
            xb, yb = X[idx], (y[idx][self.dist.shard(n)] if sharded else y[idx])
            with torch.no_grad():
                xb = self.augmenter(xb, aug=self.augmenter.aug_train, shard=sharded)
            lr = self.set_lr()
            loss, nll, out = self.loss(xb, yb, n_global=n) if sharded else self.loss(xb, yb)
            hits = (out.argmax(-1) == yb).sum()
            if sharded:  # global batch NLL and hits, so every rank takes the same decision
                bad = (~torch.isfinite(loss.detach())).double()
                stats = self.dist.sum_(torch.stack([nll.detach().double(), hits.double(), bad]))
                nll_value, hits_value = stats[0].item(), stats[1].item()
                loss_value = (stats[0] + self.prior.term(N).detach().double()).item() if stats[2] == 0 else math.nan
            else:
                loss_value, nll_value, hits_value = loss.item(), nll.item(), hits.item()
            if not math.isfinite(loss_value):
                if sharded:  # DDP needs the backward of every forward; the grads are discarded
                    loss.backward()
                raise NonFiniteValue("loss", loss_value, f"MAP step, batch {b + 1}/{self.batches_per_epoch}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.global_step += 1
            tot_loss += loss_value * n
            tot_nll += nll_value * n
            correct += hits_value
        return {"lr": lr, "train_loss": tot_loss / N, "train_nll": tot_nll / N, "train_acc": correct / N}

    def state_dict(self) -> Dict[str, Any]:
        """Returns: ``optimizer``, ``global_step``, ``lr_scale``."""
        return {"optimizer": self.optimizer.state_dict(), "global_step": self.global_step, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Args: state: a :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = state["global_step"]
        self.lr_scale = state["lr_scale"]
