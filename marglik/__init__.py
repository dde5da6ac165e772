"""marglik: fast Bayesian hyperparameter selection with K-FAC-expand/reduce Laplace marginal likelihoods.

Public API: the K-FAC engine (:class:`KFAC`, :class:`Kron` and its blocks, :func:`example_index`),
the Laplace posterior (:class:`KronLaplace`, laplace-torch backends :class:`MarglikGGN` /
:class:`MarglikEF` and their reduce defaults, :class:`DecomposedKron`, the log-determinant
functions, :func:`batchwise_gradients`: a differentiable fit's gradient one batch at a time), the K-FAC optimizer (:class:`KFACOptimizer`), learnable augmentation
(:class:`AffineAugmentation`), the Fixup scalars (:class:`Scale`, :class:`Bias`) and the tuning loop
(:class:`Config`, :class:`MarglikTuner`, :func:`tune`); :class:`UserError`, the base of every error a
user can fix (:mod:`marglik.errors`).
"""

from typing import Any

from .augment import AffineAugmentation
from .curvature import (
    KFAC,
    DecomposedKron,
    DiagonalBlock,
    FactorForm,
    FisherType,
    FlavourRule,
    KFACApprox,
    Kron,
    KronBlock,
    Likelihood,
    PriorStructure,
    RowFactor,
    UnsupportedModuleError,
    assign_flavours,
    batchwise_gradients,
    example_index,
    kron_logdet,
    kron_logdet_projected,
)
from .errors import UserError
from .laplace import KronLaplace
from .nn import Bias, Scale
from .optim import KFACOptimizer
from .tuning import Config, MarglikTuner, tune

__version__ = "0.1.0"

#: Re-exported from :mod:`marglik.laplace_torch` on first use: importing laplace-torch costs seconds.
_LAPLACE_TORCH = ("MarglikGGN", "MarglikEF", "MarglikGGNReduce", "MarglikEFReduce")


def __getattr__(name: str) -> Any:
    """Lazy re-export of the laplace-torch backends (PEP 562)."""
    if name in _LAPLACE_TORCH:
        from . import laplace_torch

        return getattr(laplace_torch, name)
    raise AttributeError(f"module 'marglik' has no attribute {name!r}")

__all__ = [
    "KFAC",
    "Kron",
    "KronBlock",
    "DiagonalBlock",
    "RowFactor",
    "FactorForm",
    "FisherType",
    "KFACApprox",
    "FlavourRule",
    "assign_flavours",
    "Likelihood",
    "UnsupportedModuleError",
    "example_index",
    "DecomposedKron",
    "PriorStructure",
    "kron_logdet",
    "kron_logdet_projected",
    "batchwise_gradients",
    "KronLaplace",
    "MarglikGGN",
    "MarglikEF",
    "MarglikGGNReduce",
    "MarglikEFReduce",
    "KFACOptimizer",
    "AffineAugmentation",
    "Scale",
    "Bias",
    "Config",
    "MarglikTuner",
    "tune",
    "UserError",
]
