"""When the tuning loop updates the hyperparameters, and its learning-rate schedules.

* MAP learning rate (``trainer.schedule``), set before every optimizer step: constant
  ``trainer.lr``, or cosine from ``trainer.lr`` to ``trainer.lr_min`` over all
  ``trainer.epochs * batches_per_epoch`` steps.
* Hyper learning rates (``hyper.schedule``), set before every marglik update: each group's
  ``base_lr`` times 1 (constant) or a cosine factor from 1 to 0 over the epochs after
  ``hyper.burn_in``.
* Marglik updates run after epochs ``e > burn_in`` with ``(e - burn_in) % frequency == 0``
  (:meth:`marglik.tuning.Config.marglik_updates` counts them); the selection value follows every
  ``hyper.selection_every``-th of them and always the last one (:func:`selection_due`).

The rollback scales (``trainer.rollback_lr_factor``) multiply these values; they are applied by
the loop, not here.
"""

from __future__ import annotations

import math
from typing import Any

from .config import Schedule


def _cosine(frac: float) -> float:
    """``0.5 (1 + cos(pi frac))``: 1 at ``frac = 0``, 0 at ``frac = 1``."""
    return 0.5 * (1 + math.cos(math.pi * frac))


def map_lr(trainer: Any, global_step: int, batches_per_epoch: int) -> float:
    """The MAP learning rate of optimizer step ``global_step`` (before rollback scaling).

    Args:
        trainer: the ``trainer`` section of a :class:`marglik.tuning.Config`.
        global_step: optimizer steps taken so far in the run.
        batches_per_epoch: MAP steps per epoch.

    Returns:
        ``trainer.lr`` (constant), or ``lr_min + (lr - lr_min) * 0.5 (1 + cos(pi t))`` with ``t``
        the fraction of all steps taken (capped at 1).
    """
    if trainer.schedule != Schedule.cosine:
        return trainer.lr
    total = max(1, trainer.epochs * batches_per_epoch)
    frac = min(global_step / total, 1.0)
    return trainer.lr_min + (trainer.lr - trainer.lr_min) * _cosine(frac)


def hyper_lr_factor(trainer: Any, hyper: Any, epoch: int) -> float:
    """The factor on the hyper learning rates (``base_lr``) at an update after ``epoch`` epochs.

    Args:
        trainer: the ``trainer`` section of a config (``epochs``).
        hyper: the ``hyper`` section (``schedule``, ``burn_in``).
        epoch: completed epochs before the current one.

    Returns:
        1 (constant), or ``0.5 (1 + cos(pi t))`` with ``t = (epoch - burn_in) / (epochs - burn_in)``
        clipped to ``[0, 1]``.
    """
    if hyper.schedule != Schedule.cosine:
        return 1.0
    span = max(1, trainer.epochs - hyper.burn_in)
    return _cosine(min(max(epoch - hyper.burn_in, 0) / span, 1.0))


def marglik_update_due(hyper: Any, epoch: int) -> bool:
    """Whether a marglik update follows the MAP steps of ``epoch``.

    Args:
        hyper: the ``hyper`` section of a config (``burn_in``, ``frequency``).
        epoch: the epoch, counted from 1.

    Returns:
        ``epoch > burn_in and (epoch - burn_in) % frequency == 0``.
    """
    return epoch > hyper.burn_in and (epoch - hyper.burn_in) % hyper.frequency == 0


def selection_due(trainer: Any, hyper: Any, epoch: int) -> bool:
    """Whether the marglik update after ``epoch`` is followed by a selection value.

    Args:
        trainer: the ``trainer`` section of a config (``epochs``).
        hyper: the ``hyper`` section (``burn_in``, ``frequency``, ``selection_every``).
        epoch: the epoch, counted from 1.

    Returns:
        ``marglik_update_due(hyper, epoch)`` and either the update's index ``i = (epoch - burn_in) /
        frequency`` (from 1) is a multiple of ``selection_every`` or no update follows before
        ``trainer.epochs`` (the last update is always scored, so the last model can be the best).
    """
    if not marglik_update_due(hyper, epoch):
        return False
    index = (epoch - hyper.burn_in) // hyper.frequency
    return index % hyper.selection_every == 0 or epoch + hyper.frequency > trainer.epochs
