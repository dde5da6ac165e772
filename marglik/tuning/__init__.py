"""Marginal-likelihood hyperparameter tuning (Immer et al. 2021, Algorithm 1) with learned
data augmentation; see :mod:`marglik.tuning.loop` for the algorithm and the estimator.

* :class:`Config` -- the run configuration (the typed schema of the Hydra CLI, as dataclasses);
  :class:`ConfigError` -- a bad key, type or value, as one line.
* :class:`MarglikTuner` / :func:`tune` -- train, tune, evaluate, write the outputs; data
  parallel under ``torchrun`` (:mod:`marglik.tuning.distributed`).
* :func:`build_parts` -- a config -> the run's parts (:mod:`marglik.tuning.parts`), taking a
  user's own model, :class:`TensorData` or Laplace factory; :class:`Trainer` -- the driver that
  sequences epochs over them.
* :class:`SelectionSet` -- the fixed data of the selection value (``hyper.selection``,
  :class:`SelectionEstimator`) that picks the best epoch and gives the reported log marglik.
* :class:`CheckpointError` (a :class:`marglik.errors.UserError`): :class:`DamagedCheckpointError` -- a
  file that cannot be read; :class:`UnsafeCheckpointError` -- a well-formed file that holds pickled
  objects beyond tensors and plain data (refused, nothing in it runs).
* :class:`RunDirLockedError` (a :class:`marglik.errors.UserError`): another live process holds the run
  directory (:mod:`marglik.tuning.run_lock`: one process per run directory).
* :func:`explain_run` -- what a finished run learned, in plain words (the CLI's closing lines).
* :class:`PeerLaplace` -- laplace-torch's curvlinops / ASDL / BackPACK backends in the loop
  (``curvature.backend``, :class:`CurvatureBackend`; ``curvature.structure``, :class:`CurvatureStructure`).
"""

from .backends import CurvatureBackend, CurvatureStructure, PeerLaplace
from .build import build_parts
from .checkpoint import CheckpointError, DamagedCheckpointError, UnsafeCheckpointError
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
from .device import resolve_device
from .estimator import SelectionEstimator, SelectionSet
from .explain import explain_run
from .loop import MarglikTuner, NonFiniteError, tune
from .parts import Parts, TensorData
from .run_lock import RunDirLockedError
from .trainer import Trainer

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
    "DamagedCheckpointError",
    "UnsafeCheckpointError",
    "RunDirLockedError",
    "explain_run",
    "SelectionEstimator",
    "SelectionSet",
    "tune",
    "Trainer",
    "Parts",
    "TensorData",
    "build_parts",
    "resolve_device",
    "CurvatureBackend",
    "CurvatureStructure",
    "PeerLaplace",
]
