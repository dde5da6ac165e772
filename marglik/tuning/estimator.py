"""The data a marginal-likelihood estimate sees: the whole training set, or a random subset.

With ``hyper.marglik_batches = M`` one Laplace fit sees ``min(N, M * b)`` examples drawn without
replacement (``b = hyper.marglik_batch_size``, default ``trainer.batch_size``), in batches of
``b``; the fit is told the full ``num_data = N``, so the summed log-likelihood and the GGN factor
``B`` are rescaled by ``N / (M b)``. That is an unbiased estimate of the data term and of the GGN,
hence a stochastic (through the log-determinant slightly biased) estimate of the log marginal
likelihood and of its gradient. ``M = None`` uses all ``N`` examples in order (deterministic up
to the augmentation noise) and draws nothing from the generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class MarglikSubset:
    """Which examples one Laplace fit of the tuning loop sees, and how they are rescaled to ``N``.

    Attributes:
        n_data: ``N``, the training-set size.
        n_batches: ``M``, batches per fit (``None``: the whole training set).
        batch_size: ``b``, examples per batch.
    """

    n_data: int
    n_batches: Optional[int]
    batch_size: int

    @classmethod
    def from_config(cls, cfg: Any, n_data: int) -> "MarglikSubset":
        """The subset a :class:`marglik.tuning.Config` asks for.

        Args:
            cfg: the run configuration (``hyper.marglik_batches``, ``hyper.marglik_batch_size``,
                ``trainer.batch_size``).
            n_data: the training-set size ``N``.

        Returns:
            The subset specification.
        """
        h = cfg.hyper
        return cls(n_data, h.marglik_batches, h.marglik_batch_size or cfg.trainer.batch_size)

    @property
    def size(self) -> int:
        """Examples per fit: ``N``, or ``min(N, M b)``."""
        return self.n_data if self.n_batches is None else min(self.n_data, self.n_batches * self.batch_size)

    def index_batches(self, generator: torch.Generator, device: torch.device) -> List[Tensor]:
        """Draw the examples of one fit.

        Args:
            generator: the run's marglik-subset stream (advanced only when ``M`` is set).
            device: where the indices go.

        Returns:
            Index tensors of at most ``b`` examples each, ``size`` examples in all.
        """
        if self.n_batches is None:
            idx = torch.arange(self.n_data)
        else:
            idx = torch.randperm(self.n_data, generator=generator)[: self.size]
        return list(idx.to(device).split(self.batch_size))

    def num_data(self, seen: int, sharded: bool) -> Optional[int]:
        """The ``num_data`` to pass to the Laplace fit.

        Args:
            seen: examples this process's batches hold.
            sharded: whether the batches are one rank's shard (the fit all-reduces the counts).

        Returns:
            ``N`` when the fit sees a subset or a shard (so it rescales to ``N``), else ``None``
            (the fit counts its own data).
        """
        return self.n_data if seen != self.n_data or sharded else None

    def describe(self) -> str:
        """Say which estimate this is.

        Returns:
            The line of ``summary.json['marglik_estimator']``.
        """
        if self.n_batches is None:
            return "whole training set"
        return (f"stochastic: {self.n_batches} random batches of {self.batch_size} per fit, "
                f"rescaled to N={self.n_data}")
