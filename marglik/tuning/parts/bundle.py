"""The bundle of parts a :class:`~marglik.tuning.trainer.Trainer` drives, its settings and labels.

:class:`Parts` holds the built parts; :class:`TrainerSettings` the few numbers the driver itself
needs (how many epochs, when to evaluate, when a marglik update is due, the rollback policy);
:class:`RunLabels` the descriptive fields of ``summary.json`` (what data, model and curvature the
run used), so that the driver never reads a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..distributed import DistContext
from .data import RandomStreams, TensorData
from .evaluation import Evaluation
from .hyper_step import HyperStep
from .hyperparams import Augmenter, PriorPrecision
from .laplace_fit import LaplaceMarglik
from .map_step import MapStep
from .selection import Selection


def _every_epoch(epoch: int) -> bool:
    return True


@dataclass
class TrainerSettings:
    """What the driver needs to sequence a run (all else lives in the parts).

    Attributes:
        epochs: epochs in all (a resumed run continues to this number).
        update_due: ``update_due(e)``: whether epoch ``e`` (1-based) ends with a marglik update.
        selection_due: ``selection_due(e)``: whether that update is followed by a selection value.
        eval_every: test metrics every this many epochs (0: only at the end).
        final_model: ``"best"`` (the best selection value) or ``"last"``: the model the summary reports.
        max_rollbacks: rollbacks after non-finite values before giving up.
        rollback_lr_factor: the factor on the offending learning rate at a rollback.
        progress: show a progress bar.
        cost_reference: time one standard-training epoch at the start (:mod:`marglik.tuning.cost`).
    """

    epochs: int
    update_due: Callable[[int], bool] = _every_epoch
    selection_due: Callable[[int], bool] = _every_epoch
    eval_every: int = 1
    final_model: str = "best"
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    progress: bool = True
    cost_reference: bool = False


@dataclass
class RunLabels:
    """Descriptive fields of the summary, the progress bar and the plot title (no behaviour).

    Attributes:
        data, rotation, translation: the data set's name and the rotation / translation it was given.
        model: the model's name.
        approx, copies_approx, backend, structure, fisher_type, separate_bias: the curvature.
        prior_structure: ``scalar`` or ``layerwise``.
        seed: the run's seed.
        burn_in: epochs before the first marglik update (marked on the plot).
        warnings: configuration warnings, said before training and listed in the summary.
    """

    data: str = "custom"
    rotation: float = 0.0
    translation: float = 0.0
    model: str = "custom"
    approx: str = "reduce"
    copies_approx: Optional[str] = None
    backend: str = "marglik"
    structure: str = "kron"
    fisher_type: str = "type-2"
    separate_bias: bool = False
    prior_structure: str = "layerwise"
    seed: int = 0
    burn_in: int = 0
    warnings: List[str] = field(default_factory=list)


@dataclass
class Parts:
    """Everything a run is made of; :meth:`stateful` names what a checkpoint holds.

    Attributes:
        data, model, prior, augmenter, streams, laplace, map_step, hyper_step, selection,
        evaluation: the parts (see :mod:`marglik.tuning.parts`).
        settings: :class:`TrainerSettings`.
        labels: :class:`RunLabels`.
        dist: the process group (one process: a no-op context).
        device: where the model and data live.
        config: the run's configuration as plain data (stored in checkpoints, ``config.json`` and W&B).
    """

    data: TensorData
    model: nn.Module
    prior: PriorPrecision
    augmenter: Augmenter
    streams: RandomStreams
    laplace: LaplaceMarglik
    map_step: MapStep
    hyper_step: HyperStep
    selection: Selection
    evaluation: Evaluation
    settings: TrainerSettings
    labels: RunLabels
    dist: DistContext
    device: torch.device
    config: Dict[str, Any] = field(default_factory=dict)

    def stateful(self) -> Dict[str, Any]:
        """The parts whose ``state_dict`` a checkpoint holds, by checkpoint key.

        Returns:
            ``{name: part}`` (each with ``state_dict`` / ``load_state_dict``).
        """
        return {"model": self.model, "prior": self.prior, "augmentation": self.augmenter,
                "map_step": self.map_step, "hyper_step": self.hyper_step, "selection": self.selection,
                "streams": self.streams}
