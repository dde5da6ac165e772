"""Curvature: K-FAC factors (:class:`KFAC`), their containers (:class:`Kron`) and the posterior
algebra on them (:class:`DecomposedKron`, :func:`kron_logdet`, :func:`eigh_psd`); gradients through a
differentiable fit one batch at a time (:func:`batchwise_gradients`)."""

from .batchwise import batchwise_gradients
from .blocks import CoveredModule
from .eigen import KronEigen, eigh_psd
from .flavours import FlavourRule, assign_flavours
from .kfac import KFAC
from .kron import DiagonalBlock, Kron, KronBlock
from .layers import UnsupportedModuleError
from .logdet import kron_logdet, kron_logdet_projected
from .options import FisherType, KFACApprox, Likelihood
from .posterior import DecomposedKron
from .prior import PriorStructure
from .row_factor import FactorForm, RowFactor
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
    "FlavourRule",
    "assign_flavours",
    "Likelihood",
    "example_index",
    "DecomposedKron",
    "PriorStructure",
    "KronEigen",
    "eigh_psd",
    "kron_logdet",
    "kron_logdet_projected",
    "RowFactor",
    "FactorForm",
    "batchwise_gradients",
]
