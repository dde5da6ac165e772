"""Optimizers built on the curvature engine: :class:`KFACOptimizer` (K-FAC-expand / -reduce)."""

from .kfac_optimizer import DAMPING_RULES, FALLBACKS, FIRST_ORDER_TYPES, DampingRule, Fallback, KFACOptimizer

__all__ = ["KFACOptimizer", "DampingRule", "Fallback", "DAMPING_RULES", "FALLBACKS", "FIRST_ORDER_TYPES"]
