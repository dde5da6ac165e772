"""The random streams of a tuning run, all derived from ``trainer.seed``.

Each stream is a :class:`torch.Generator` seeded ``seed * SEED_STRIDE + stream`` (a prime stride, so
the streams of nearby seeds do not collide). The data order, the augmentation noise and the
marglik subset are independent streams, so that changing how often one is drawn (e.g. more
hypersteps) leaves the others as they were; all three are in the checkpoint (exact resume). The
evaluation and selection streams are re-created from the seed every time they are used (a fixed
draw, hence nothing to checkpoint).
"""

from __future__ import annotations

import enum
import random
from typing import Dict

import numpy as np
import torch

SEED_STRIDE = 7919


class Stream(enum.IntEnum):
    """The run's random streams (the value is the offset added to ``seed * SEED_STRIDE``)."""

    data = 1  #: order of the MAP batches
    aug = 2  #: augmentation noise of the MAP and marglik batches
    hyper = 3  #: which examples a stochastic marglik estimate sees
    eval = 4  #: augmentation noise of an evaluation (fresh generator per evaluation: repeatable)
    selection = 5  #: which examples the fixed selection subset holds (drawn once per run)
    selection_noise = 6  #: augmentation and MC noise of a selection value (fresh per evaluation: fixed)
    reference = 7  #: batch order and noise of the timed standard-training epoch (:mod:`marglik.tuning.cost`)


def stream_generator(seed: int, stream: Stream) -> torch.Generator:
    """A CPU generator for one stream.

    Args:
        seed: the run's seed (``trainer.seed``).
        stream: which stream.

    Returns:
        A new :class:`torch.Generator` seeded ``seed * SEED_STRIDE + stream``.
    """
    return torch.Generator().manual_seed(seed * SEED_STRIDE + int(stream))


def run_generators(seed: int) -> Dict[str, torch.Generator]:
    """The checkpointed streams of a run, by name (``"data"``, ``"aug"``, ``"hyper"``).

    Args:
        seed: the run's seed (``trainer.seed``).

    Returns:
        ``{name: generator}``; the names are the keys of the checkpoint's generator states.
    """
    return {s.name: stream_generator(seed, s) for s in (Stream.data, Stream.aug, Stream.hyper)}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (model initialisation, Monte-Carlo curvature samples).

    Args:
        seed: the run's seed (reduced modulo ``2**32`` for NumPy).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
