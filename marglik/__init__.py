"""marglik: fast Bayesian hyperparameter selection with K-FAC-expand/reduce Laplace marginal likelihoods."""

from .curvature import (
    KFAC,
    DiagonalBlock,
    FisherType,
    KFACApprox,
    Kron,
    KronBlock,
    Likelihood,
    UnsupportedModuleError,
    example_index,
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
    "Scale",
    "Bias",
]
__version__ = "0.1.0"

from .optim import KFACOptimizer  # noqa: E402  (K-FAC optimizer, issue 5)

__all__.append("KFACOptimizer")
