"""Curvature: K-FAC factors (:class:`KFAC`) and their containers (:class:`Kron`)."""

from .kfac import KFAC, CoveredModule
from .kron import DiagonalBlock, Kron, KronBlock
from .layers import UnsupportedModuleError
from .options import FisherType, KFACApprox, Likelihood
from .sharing import example_index

__all__ = [
    "KFAC",
    "CoveredModule",
    "Kron",
    "KronBlock",
    "DiagonalBlock",
    "UnsupportedModuleError",
    "FisherType",
    "KFACApprox",
    "Likelihood",
    "example_index",
]
