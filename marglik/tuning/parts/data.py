"""The data and the random streams of a run: in-memory tensors on the run's device, and the named
generators (plus the global RNGs) whose states a checkpoint restores."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .. import checkpoint as ckpt
from ..seeds import run_generators


class TensorData:
    """Training and test tensors on one device.

    Args:
        X: training inputs ``(N, ...)``: images ``(N, C, H, W)`` for the learned augmentation, or
            any shape the model takes when augmentation is off.
        y: integer training labels ``(N,)``.
        X_test: test inputs ``(n, ...)``.
        y_test: integer test labels ``(n,)``.
        info: ``num_classes``, ``in_channels``, ``image_size`` (default: read from the tensors).
        name: the data set's name for the summary.
    """

    def __init__(self, X: Tensor, y: Tensor, X_test: Tensor, y_test: Tensor,
                 info: Optional[Dict[str, Any]] = None, name: str = "custom") -> None:
        self.X, self.y, self.X_test, self.y_test = X, y, X_test, y_test
        if info is None:
            images = X.dim() == 4
            info = {"num_classes": int(max(y.max().item(), y_test.max().item())) + 1,
                    "in_channels": int(X.shape[1]) if images else None,
                    "image_size": int(X.shape[-1]) if images else None}
        self.info = info
        self.name = name

    @classmethod
    def from_datasets(cls, train: Any, test: Any, info: Dict[str, Any], device: torch.device,
                      name: str = "custom") -> "TensorData":
        """From two ``TensorDataset`` s as :func:`marglik.data.load_dataset` returns them.

        Args:
            train: the training set (``.tensors = (X, y)``).
            test: the test set.
            info: its ``info`` dict.
            device: where the tensors go.
            name: the data set's name.

        Returns:
            The data on ``device``.
        """
        X, y = (t.to(device) for t in train.tensors)
        X_test, y_test = (t.to(device) for t in test.tensors)
        return cls(X, y, X_test, y_test, info, name)

    @property
    def N(self) -> int:
        """Training examples."""
        return len(self.X)


class RandomStreams:
    """The run's named generators (``data``, ``aug``, ``hyper``: :func:`marglik.tuning.seeds.run_generators`)
    and, in its state, the global torch / CUDA / NumPy / Python RNGs.

    Args:
        seed: the run's seed.
    """

    def __init__(self, seed: int) -> None:
        self.generators: Dict[str, torch.Generator] = run_generators(seed)

    def __getitem__(self, name: str) -> torch.Generator:
        return self.generators[name]

    def state_dict(self) -> Dict[str, Any]:
        """Returns: every RNG state (:func:`marglik.tuning.checkpoint.rng_state`)."""
        return ckpt.rng_state(self.generators)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (generators in place).

        Args:
            state: a :meth:`state_dict`.
        """
        ckpt.set_rng_state(state, self.generators)
