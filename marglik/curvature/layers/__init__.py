"""Registry of layer rules: one small rule per module family; adding a family touches one file."""

from __future__ import annotations

from typing import List, Optional

from torch import nn

from .attention import MultiheadAttentionRule
from .base import (
    Binding,
    ElementwiseRule,
    KroneckerRule,
    Rule,
    UnsupportedModuleError,
    copies_per_example,
    example_sum,
)
from .conv import ConvRule
from .elementwise import ChannelFirstLayerNormRule, ChannelFirstNormRule, ScaleBiasRule, TrailingNormRule
from .leaf import LEAF_DENSE_MAX, LeafParameterRule
from .linear import LinearRule
from .relpos import RelativePositionBiasRule

RULES: List[Rule] = [
    LinearRule(),
    MultiheadAttentionRule(),
    ConvRule(),
    ChannelFirstNormRule(),
    ChannelFirstLayerNormRule(),
    TrailingNormRule(),
    ScaleBiasRule(),
    LeafParameterRule(),
    RelativePositionBiasRule(),
]


def find_rule(module: nn.Module) -> Optional[Rule]:
    """The rule covering ``module``'s type, or ``None``."""
    for rule in RULES:
        if rule.matches(module):
            return rule
    return None


__all__ = [
    "RULES",
    "find_rule",
    "Rule",
    "Binding",
    "KroneckerRule",
    "ElementwiseRule",
    "UnsupportedModuleError",
    "example_sum",
    "LEAF_DENSE_MAX",
    "copies_per_example",
]
