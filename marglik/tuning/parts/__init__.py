"""The parts of a tuning run, each with one job and its own ``state_dict`` / ``load_state_dict``.

:class:`~marglik.tuning.trainer.Trainer` sequences epochs over these parts and never reads a
config; :func:`marglik.tuning.build.build_parts` makes them from a :class:`~marglik.tuning.Config`
(and takes a user's own model, data or Laplace factory instead of the configured ones).

* :class:`TensorData` -- the training and test tensors on the run's device (:mod:`.data`).
* :class:`RandomStreams` -- the run's named random generators and the global RNGs (:mod:`.data`).
* :class:`PriorPrecision` -- ``log delta`` and the prior term of the MAP loss (:mod:`.hyperparams`).
* :class:`Augmenter` -- the learned augmentation ``eta`` and how a batch is augmented (:mod:`.hyperparams`).
* :class:`LaplaceMarglik` -- fit a Laplace approximation, its log marginal likelihood (:mod:`.laplace_fit`).
* :class:`MapStep` -- one epoch of MAP steps on the weights (:mod:`.map_step`).
* :class:`HyperStep` -- the ``K`` hypersteps of one marglik update (:mod:`.hyper_step`).
* :class:`Selection` -- the selection value and the best state (:mod:`.selection`).
* :class:`Evaluation` -- test accuracy and NLL (:mod:`.evaluation`).
* :class:`Parts` -- the bundle the trainer receives, with :class:`TrainerSettings` and
  :class:`RunLabels` (:mod:`.bundle`).
"""

from .bundle import Parts, RunLabels, TrainerSettings
from .data import RandomStreams, TensorData
from .evaluation import Evaluation
from .hyper_step import HyperStep
from .hyperparams import Augmenter, PriorPrecision
from .laplace_fit import LaplaceFactory, LaplaceMarglik
from .map_step import MapStep, map_optimizer
from .nonfinite import NonFiniteValue
from .selection import Selection

__all__ = [
    "Augmenter",
    "Evaluation",
    "HyperStep",
    "LaplaceFactory",
    "LaplaceMarglik",
    "MapStep",
    "map_optimizer",
    "NonFiniteValue",
    "Parts",
    "PriorPrecision",
    "RandomStreams",
    "RunLabels",
    "Selection",
    "TensorData",
    "TrainerSettings",
]
