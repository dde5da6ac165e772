"""Marginal-likelihood hyperparameter tuning (Immer et al. 2021, Algorithm 1) with learned
data augmentation; see :mod:`marglik.tuning.loop` for the algorithm and the estimator.

* :class:`Config` -- the run configuration (the typed schema of the Hydra CLI, as dataclasses);
  :class:`ConfigError` -- a bad key, type or value, as one line.
* :class:`MarglikTuner` / :func:`tune` -- train, tune, evaluate, write the outputs; data
  parallel under ``torchrun`` (:mod:`marglik.tuning.distributed`).
* :class:`SelectionSet` -- the fixed data of the selection value (``hyper.selection``,
  :class:`SelectionEstimator`) that picks the best epoch and gives the reported log marglik.
* :class:`CheckpointError` / :class:`UnsafeCheckpointError` -- an unreadable checkpoint / one that
  holds pickled objects beyond tensors and plain data (refused, nothing in it runs).
* :class:`PeerLaplace` -- laplace-torch's curvlinops / ASDL / BackPACK backends in the loop
  (``curvature.backend``, :class:`CurvatureBackend`; ``curvature.structure``, :class:`CurvatureStructure`).
"""

from .backends import CurvatureBackend, CurvatureStructure, PeerLaplace
from .checkpoint import CheckpointError, UnsafeCheckpointError
from .config import (
    Config,
    ConfigError,
    CurvatureConfig,
    DataConfig,
    HyperConfig,
    LoggerConfig,
    ModelConfig,
    TrainerConfig,
)
from .estimator import SelectionEstimator, SelectionSet
from .loop import MarglikTuner, NonFiniteError, resolve_device, tune

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "CurvatureConfig",
    "HyperConfig",
    "TrainerConfig",
    "LoggerConfig",
    "MarglikTuner",
    "NonFiniteError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "SelectionEstimator",
    "SelectionSet",
    "tune",
    "resolve_device",
    "CurvatureBackend",
    "CurvatureStructure",
    "PeerLaplace",
]
