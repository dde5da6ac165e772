"""The curvature blocks the engine covers, and the sums it accumulates for each."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch
from torch import Tensor, nn

from .kron import Factor
from .layers.base import Rule
from .options import BlockKind
from .row_factor import FactorForm, RowFactor, concat_rows, keep_rows

__all__ = ["CoveredModule", "BlockSums", "FactorSum"]


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


class FactorSum:
    """A running sum of outer products ``sum_i r_i r_i^T`` over ``(G, d)`` rows, dense or as the rows.

    Rows are kept while :func:`~marglik.curvature.row_factor.keep_rows` allows (few rows against
    ``d``, ``form`` auto); once they would pass that bound, or a dense sum is added, the sum is
    multiplied out to the dense ``(G, d, d)`` and continues dense. Exactly one of :attr:`dense` and
    :attr:`rows` is set once anything was added.

    Attributes:
        dense: ``(G, d, d)`` or ``None``.
        rows: ``(G, m, d)`` or ``None``.
    """

    def __init__(self, dense: Optional[Tensor] = None, rows: Optional[Tensor] = None) -> None:
        self.dense, self.rows = dense, rows

    @property
    def empty(self) -> bool:
        """Whether nothing was added."""
        return self.dense is None and self.rows is None

    def _densify(self) -> None:
        if self.rows is not None:
            R, self.rows = self.rows, None
            self.dense = R.transpose(-1, -2) @ R

    def add_dense(self, S: Tensor) -> None:
        """Add a dense sum ``(G, d, d)``."""
        self._densify()
        self.dense = S if self.dense is None else self.dense + S

    def add_rows(self, R: Tensor, form: FactorForm) -> None:
        """Add the outer products of the rows ``R`` ``(G, m, d)``."""
        if self.dense is not None:
            self.dense = self.dense + R.transpose(-1, -2) @ R
            return
        self.rows = concat_rows(self.rows, R)
        if not keep_rows(self.rows.shape[1], self.rows.shape[-1], form):
            self._densify()

    def add(self, other: "FactorSum", form: FactorForm) -> None:
        """Add another :class:`FactorSum` (in its form)."""
        if other.dense is not None:
            self.add_dense(other.dense)
        elif other.rows is not None:
            self.add_rows(other.rows, form)

    def factor(self, scale: Union[float, Tensor]) -> Factor:
        """``scale`` times the sum, as a dense tensor or a :class:`RowFactor` (rows times
        ``sqrt(scale)``); ``scale``: a number or a ``(G,)`` tensor (one per group)."""
        if torch.is_tensor(scale):
            scale = scale.to(self.rows.dtype if self.rows is not None else self.dense.dtype).view(-1, 1, 1)
        if self.rows is not None:
            return RowFactor(self.rows * (scale.sqrt() if torch.is_tensor(scale) else math.sqrt(scale)))
        return self.dense * scale


@dataclass
class BlockSums:
    """Unnormalised factor sums of one block (see :mod:`marglik.curvature.kfac` for the formulas).

    Attributes:
        A: Kronecker blocks: the input-side sum (:class:`FactorSum` over ``(G, da)`` rows).
        A_count: what ``A`` is divided by: positions (expand) or units (reduce); ``(G,)`` when
            some call fed a single group (attention's q / k / v).
        grad: Kronecker blocks: the output-side sum ``B`` (:class:`FactorSum` over ``(G, db)``
            rows); diagonal blocks: the ``(C, k, k)`` blocks ``D`` (dense).
        form: the engine's :class:`~marglik.curvature.row_factor.FactorForm`.
    """

    A: FactorSum = field(default_factory=FactorSum)
    A_count: Union[float, Tensor] = 0.0
    grad: FactorSum = field(default_factory=FactorSum)
    form: FactorForm = FactorForm.AUTO

    def add_count(self, count: Union[float, Tensor]) -> None:
        """Add positions / units to :attr:`A_count`."""
        self.A_count = count + self.A_count if isinstance(count, Tensor) else self.A_count + count

    def add_input_sum(self, A: Tensor, count: Union[float, Tensor]) -> None:
        """Add a dense input-side sum ``A`` ``(G, da, da)`` over ``count`` positions / units."""
        self.A.add_dense(A)
        self.add_count(count)

    def add_input_rows(self, rows: Tensor, count: Union[float, Tensor]) -> None:
        """Add input-side rows ``(G, m, da)`` (their outer products) over ``count`` positions / units."""
        self.A.add_rows(rows, self.form)
        self.add_count(count)

    def add_grad_sum(self, sums: Tensor) -> None:
        """Add a dense output-side sum (``B`` or ``D``)."""
        self.grad.add_dense(sums)

    def add_grad_rows(self, rows: Tensor) -> None:
        """Add output-side rows ``(G, m, db)``."""
        self.grad.add_rows(rows, self.form)

    def __add__(self, other: "BlockSums") -> "BlockSums":
        out = BlockSums(FactorSum(self.A.dense, self.A.rows), self.A_count,
                        FactorSum(self.grad.dense, self.grad.rows), self.form)
        out.A.add(other.A, self.form)
        if not other.A.empty:
            out.add_count(other.A_count)
        out.grad.add(other.grad, self.form)
        return out
