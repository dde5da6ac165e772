"""Marginal-likelihood hyperparameter tuning (Immer et al. 2021, Algorithm 1) with learned
data augmentation; see :mod:`marglik.tuning.loop` for the algorithm and the estimator.

* :class:`Config` -- the run configuration (the Hydra CLI's config groups, as dataclasses).
* :class:`MarglikTuner` / :func:`tune` -- train, tune, evaluate, write the outputs; data
  parallel under ``torchrun`` (:mod:`marglik.tuning.distributed`).
"""

from .config import (
    Config,
    CurvatureConfig,
    DataConfig,
    HyperConfig,
    LoggerConfig,
    ModelConfig,
    TrainerConfig,
)
from .checkpoint import CheckpointError
from .loop import MarglikTuner, NonFiniteError, resolve_device, tune

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "CurvatureConfig",
    "HyperConfig",
    "TrainerConfig",
    "LoggerConfig",
    "MarglikTuner",
    "NonFiniteError",
    "CheckpointError",
    "tune",
    "resolve_device",
]
