"""marglik: fast Bayesian hyperparameter selection with K-FAC-expand/reduce Laplace marginal likelihoods."""

from .curvature import (
    KFAC,
    DecomposedKron,
    DiagonalBlock,
    FisherType,
    KFACApprox,
    Kron,
    KronBlock,
    Likelihood,
    PriorStructure,
    UnsupportedModuleError,
    example_index,
    kron_logdet,
    kron_logdet_projected,
)
from .nn import Bias, Scale

__all__ = [
    "KFAC",
    "Kron",
    "KronBlock",
    "DiagonalBlock",
    "FisherType",
    "KFACApprox",
    "Likelihood",
    "UnsupportedModuleError",
    "example_index",
    "DecomposedKron",
    "PriorStructure",
    "kron_logdet",
    "kron_logdet_projected",
    "Scale",
    "Bias",
]
__version__ = "0.1.0"

from .optim import KFACOptimizer  # noqa: E402  (K-FAC optimizer, issue 5)

__all__.append("KFACOptimizer")

from .laplace import KronLaplace  # noqa: E402  (Laplace posterior / log marglik, issue 3)

__all__ += ["KronLaplace"]

from .tuning import Config, MarglikTuner, tune  # noqa: E402  (marglik tuning loop, issue 4)

__all__ += ["Config", "MarglikTuner", "tune"]
