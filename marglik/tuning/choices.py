"""The choices of the tuning config: :class:`Choice`, the string-valued enum every configuration
option is typed with, and the config's own choices (data sets, K-FAC flavours, schedules, models, ...).

Member names equal their values: Hydra/OmegaConf parse ``curvature.approx=expand`` by member name,
and ``cfg.curvature.approx == "expand"`` keeps working because the members are strings. Choices
owned by another part of the loop live next to it (``SelectionEstimator`` in
:mod:`marglik.tuning.estimator`, ``CurvatureBackend`` / ``CurvatureStructure`` in
:mod:`marglik.tuning.backends`); :mod:`marglik.tuning.config` re-exports them all.
"""

from __future__ import annotations

from typing import List

from ..augment import ALL_GENERATORS
from ..curvature.flavours import FlavourRule
from ..curvature.options import FisherType as EngineFisherType
from ..curvature.options import KFACApprox, StrOption
from ..curvature.prior import PriorStructure as EnginePriorStructure
from ..curvature.row_factor import FactorForm as EngineFactorForm


class Choice(StrOption):
    """A configuration option: a :class:`~marglik.curvature.options.StrOption` whose member names
    equal the values (how OmegaConf parses a string into the enum); it also formats as its value."""

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> List[str]:
        """The allowed strings, in declaration order."""
        return [m.value for m in cls]


class DataName(Choice):
    """``data.name`` (and the ``data`` group): the data set."""

    digits = "digits"
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"
    cifar10 = "cifar10"


#: The engine's options (:mod:`marglik.curvature.options`, :mod:`marglik.curvature.prior`) as config
#: choices: the values come from the engine's enums, the member names equal the values (how
#: OmegaConf parses a string into an enum); ``type-2`` is not an identifier, hence the functional form.
Approx = Choice("Approx", [(m.value, m.value) for m in KFACApprox], module=__name__)
#: ``curvature.approx``: a flavour for every layer, or the rule ``auto`` (:mod:`marglik.curvature.flavours`)
ApproxRule = Choice("ApproxRule", [(m.value, m.value) for m in KFACApprox] + [(r.value, r.value) for r in FlavourRule],
                    module=__name__)


#: ``type-2`` is not an identifier, hence the functional form (member names = values).
FisherType = Choice("FisherType", [(m.value, m.value) for m in EngineFisherType], module=__name__)
FactorForm = Choice("FactorForm", [(m.value, m.value) for m in EngineFactorForm], module=__name__)
AugGenerator = Choice("AugGenerator", [(g, g) for g in ALL_GENERATORS], module=__name__)


#: the tuning loop learns a scalar or a layerwise prior precision (not the engine's diagonal one)
PriorStructure = Choice("PriorStructure", [(m.value, m.value) for m in EnginePriorStructure
                                           if m is not EnginePriorStructure.DIAGONAL], module=__name__)


class Schedule(Choice):
    """``hyper.schedule`` and ``trainer.schedule``: how a learning rate evolves over the epochs."""

    constant = "constant"
    cosine = "cosine"


class OptimizerName(Choice):
    """``trainer.optimizer``: the optimizer of the MAP steps."""

    adam = "adam"
    sgd = "sgd"


class FinalModel(Choice):
    """``trainer.final_model``: the weights a run ends with (best-marglik checkpoint or last epoch)."""

    best = "best"
    last = "last"


class LoggerMode(Choice):
    """``logger.mode``: the Weights & Biases mode."""

    offline = "offline"
    online = "online"
    disabled = "disabled"


class ModelName(Choice):
    """``model.name`` (and the ``model`` group): the architecture."""

    cnn = "cnn"
    mlp = "mlp"
    wrn16_4 = "wrn16_4"
    vit = "vit"
    tv = "tv"


class Activation(Choice):
    """``model.activation`` of ``model=mlp``: the hidden layers' nonlinearity."""

    tanh = "tanh"
    relu = "relu"


class WRNNorm(Choice):
    """``model.norm`` of ``model=wrn16_4``: the normalisation of the residual blocks."""

    fixup = "fixup"
    batchnorm = "batchnorm"
    none = "none"
