"""The data a marginal-likelihood estimate sees: the whole training set, or a random subset.

Two estimates, two jobs: :class:`MarglikSubset` feeds the *hyperstep* (a fresh random subset per
step is fine for stochastic gradient ascent), :class:`SelectionSet` the *selection value* (which
epoch is best, the reported log marglik), which must not change unless the model or the
hyperparameters do: the whole training set, or one subset drawn once per run from the seed.

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

from .choices import Choice
from .seeds import Stream, stream_generator


class SelectionEstimator(Choice):
    """``hyper.selection``: the data of the selection value."""

    full = "full"  #: the whole training set
    subset = "subset"  #: ``hyper.selection_size`` examples drawn once per run (seeded)


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


@dataclass(frozen=True)
class SelectionSet:
    """The fixed data of the selection value (best epoch, reported log marglik).

    ``full``: all ``N`` training examples in order. ``subset``: ``size`` examples drawn without
    replacement by the :attr:`Stream.selection` stream of ``seed`` -- the same indices every epoch,
    after a resume and on every ``torchrun`` rank (derived from the seed, not stored) -- and
    rescaled to ``N`` like :class:`MarglikSubset` (an unbiased estimate of the data term, fixed for
    the run). The augmentation noise of every evaluation comes from a fresh
    :attr:`Stream.selection_noise` generator, so it is the same draw every time too.

    Attributes:
        n_data: ``N``, the training-set size.
        kind: ``full`` or ``subset``.
        size: examples evaluated (``N`` for ``full``; ``min(N, hyper.selection_size)``).
        batch_size: examples per batch of the fit (memory only; the value does not depend on it).
        seed: ``trainer.seed``.
    """

    n_data: int
    kind: SelectionEstimator
    size: int
    batch_size: int
    seed: int

    @classmethod
    def from_config(cls, cfg: Any, n_data: int) -> "SelectionSet":
        """The selection data a :class:`marglik.tuning.Config` asks for.

        Args:
            cfg: the run configuration (``hyper.selection``, ``hyper.selection_size``,
                ``hyper.marglik_batch_size``, ``trainer.batch_size``, ``trainer.seed``).
            n_data: the training-set size ``N``.

        Returns:
            The selection set.
        """
        h = cfg.hyper
        kind = SelectionEstimator(h.selection)
        size = n_data if kind is SelectionEstimator.full else min(n_data, int(h.selection_size))
        return cls(n_data, kind, size, h.marglik_batch_size or cfg.trainer.batch_size, cfg.trainer.seed)

    def indices(self) -> Tensor:
        """The examples evaluated, sorted (the same on every call).

        Returns:
            A CPU index tensor of ``size`` entries.
        """
        if self.size >= self.n_data:
            return torch.arange(self.n_data)
        perm = torch.randperm(self.n_data, generator=stream_generator(self.seed, Stream.selection))
        return perm[: self.size].sort().values

    def index_batches(self, device: torch.device) -> List[Tensor]:
        """:meth:`indices` in batches of at most ``batch_size``.

        Args:
            device: where the indices go.

        Returns:
            Index tensors, ``size`` examples in all.
        """
        return list(self.indices().to(device).split(self.batch_size))

    def noise_generator(self) -> torch.Generator:
        """A fresh generator for the augmentation noise of one evaluation (the same draw each time).

        Returns:
            A CPU generator seeded from ``seed`` and :attr:`Stream.selection_noise`.
        """
        return stream_generator(self.seed, Stream.selection_noise)

    def num_data(self, seen: int, sharded: bool) -> Optional[int]:
        """The ``num_data`` to pass to the Laplace fit (as :meth:`MarglikSubset.num_data`).

        Args:
            seen: examples this process's batches hold.
            sharded: whether the batches are one rank's shard.

        Returns:
            ``N`` when the fit sees a subset or a shard, else ``None``.
        """
        return self.n_data if seen != self.n_data or sharded else None

    def describe(self) -> str:
        """Say which estimate the selection value is.

        Returns:
            The line of ``summary.json['selection_estimator']``.
        """
        if self.size >= self.n_data:
            return (f"full: whole training set (N={self.n_data}), fixed augmentation noise, after each "
                    "marglik update at the current hyperparameters")
        return (f"subset: fixed {self.size} of N={self.n_data} examples (drawn once from seed {self.seed}), "
                f"rescaled to N, fixed augmentation noise, after each marglik update at the current hyperparameters")
