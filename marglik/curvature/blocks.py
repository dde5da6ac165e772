"""The curvature blocks the engine covers, and the sums it accumulates for each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

from torch import Tensor, nn

from .layers.base import Rule
from .options import BlockKind

__all__ = ["CoveredModule", "BlockSums"]


@dataclass(frozen=True, eq=False)
class CoveredModule:
    """One curvature block: (some of) a module's trainable parameters and the rule for them.

    Attributes:
        name: the block's name (the module's name, plus a tag for blocks a rule splits off).
        module: the module whose calls the block's statistics come from.
        kind: :attr:`BlockKind.KRON` (Kronecker factors, ``groups`` pairs) or
            :attr:`BlockKind.DIAG` (exact per-channel blocks).
        weight, bias: the block's trainable parameters (either may be ``None``).
        groups: number of Kronecker groups (1 for diagonal blocks).
        rule: the layer rule computing the block's statistics (:mod:`.layers`).
    """

    name: str
    module: nn.Module
    kind: BlockKind
    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]
    groups: int
    rule: Rule

    @property
    def params(self) -> List[nn.Parameter]:
        """The block's parameters: ``[weight, bias]`` without the missing ones."""
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def key(self) -> nn.Parameter:
        """The block's first parameter (``weight``, else ``bias``): a handle for per-block state,
        such as the optimizer state holding a block's factors and inverses."""
        return self.weight if self.weight is not None else self.bias


def _plus(total: Optional[Tensor], new: Optional[Tensor]) -> Optional[Tensor]:
    if new is None:
        return total
    return new if total is None else total + new


@dataclass
class BlockSums:
    """Unnormalised factor sums of one block (see :mod:`marglik.curvature.kfac` for the formulas).

    Attributes:
        A_sum: Kronecker blocks: ``(G, da, da)`` input-side sums.
        A_count: what ``A_sum`` is divided by: positions (expand) or units (reduce); ``(G,)`` when
            some call fed a single group (attention's q / k / v).
        grad_sum: ``(G, db, db)`` output-side sums ``B`` of Kronecker blocks, ``(C, k, k)`` blocks
            ``D`` of diagonal blocks.
    """

    A_sum: Optional[Tensor] = None
    A_count: Union[float, Tensor] = 0.0
    grad_sum: Optional[Tensor] = None

    def add_inputs(self, A: Tensor, count: Union[float, Tensor]) -> None:
        """Add an input-side sum ``A`` over ``count`` positions / units."""
        self.A_sum = _plus(self.A_sum, A)
        self.A_count = count + self.A_count if isinstance(count, Tensor) else self.A_count + count

    def add_grads(self, sums: Tensor) -> None:
        """Add an output-side sum (``B`` or ``D``)."""
        self.grad_sum = _plus(self.grad_sum, sums)

    def __add__(self, other: "BlockSums") -> "BlockSums":
        out = BlockSums(self.A_sum, self.A_count, self.grad_sum)
        if other.A_sum is not None:
            out.add_inputs(other.A_sum, other.A_count)
        out.add_grads(other.grad_sum)
        return out
