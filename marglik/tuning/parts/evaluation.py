"""Test accuracy and NLL of the MAP invariant model: ``S_test`` augmented copies with the current
``eta`` and a fixed noise seed, so repeated evaluations agree."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import DistContext
from ..seeds import Stream, stream_generator
from .data import TensorData
from .hyperparams import Augmenter


class Evaluation:
    """Evaluate the model on the test set (or any labelled tensors). Stateless.

    Args:
        model: the network.
        augmenter: ``eta`` and the test-time augmentation.
        data: the test data (default of :meth:`__call__`).
        seed: the run's seed (the evaluation noise stream).
        batch_size: examples per forward pass.
        dist: the process group (each rank evaluates its shard of every batch).
    """

    def __init__(self, model: nn.Module, augmenter: Augmenter, data: TensorData, seed: int, batch_size: int,
                 dist: Optional[DistContext] = None) -> None:
        self.model, self.augmenter, self.data = model, augmenter, data
        self.seed, self.batch_size = seed, int(batch_size)
        self.dist = dist if dist is not None else DistContext()

    @torch.no_grad()
    def __call__(self, X: Optional[Tensor] = None, y: Optional[Tensor] = None) -> Dict[str, float]:
        """Accuracy and mean NLL.

        Args:
            X: inputs ``(n, ...)`` (default: the test set).
            y: integer labels ``(n,)`` (default: the test labels).

        Returns:
            ``{"test_acc": accuracy, "test_nll": mean NLL}`` over all ``n`` examples (all ranks).
        """
        X = self.data.X_test if X is None else X
        y = self.data.y_test if y is None else y
        aug = self.augmenter
        was_training = self.model.training
        self.model.eval()
        aug.aug_test.eta.copy_(aug.eta)
        gen = stream_generator(self.seed, Stream.eval)
        nll = correct = 0.0
        bs = self.batch_size
        for i in range(0, len(X), bs):
            yb = y[i : i + bs]
            if self.dist.enabled:  # each rank evaluates its shard of every batch
                xb, yb = aug(X[i : i + bs], gen, aug.aug_test, shard=True), yb[self.dist.shard(len(yb))]
                if len(yb) == 0:
                    continue
            else:
                xb = aug(X[i : i + bs], gen, aug.aug_test)
            out = self.model(xb)
            nll += F.cross_entropy(out, yb, reduction="sum").item()
            correct += (out.argmax(-1) == yb).sum().item()
        if self.dist.enabled:
            totals = torch.tensor([nll, correct], dtype=torch.float64, device=X.device)
            nll, correct = self.dist.sum_(totals).tolist()
        self.model.train(was_training)
        return {"test_acc": correct / len(X), "test_nll": nll / len(X)}

    def state_dict(self) -> Dict[str, object]:
        """Returns: ``{}`` (nothing to keep)."""
        return {}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Args: state: ignored."""
