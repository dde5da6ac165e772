"""Optimizers built on the curvature engine: :class:`KFACOptimizer` (K-FAC-expand / -reduce).

Modules: ``kfac_optimizer`` (the optimizer), ``preconditioner`` (block inverses, preconditioned
gradients), ``updates`` (momentum and first-order fallback updates).
"""

from .kfac_optimizer import DAMPING_RULES, FALLBACKS, FIRST_ORDER_TYPES, DampingRule, Fallback, KFACOptimizer

__all__ = ["KFACOptimizer", "DampingRule", "Fallback", "DAMPING_RULES", "FALLBACKS", "FIRST_ORDER_TYPES"]
