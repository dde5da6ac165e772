"""Block-diagonal curvature containers returned by :class:`marglik.KFAC`.

A :class:`Kron` holds one block per covered module, in the order of the first appearance of
the module's parameters in ``model.parameters()``. Two block types exist:

* :class:`KronBlock` -- a weight-sharing linear map (``nn.Linear``, ``nn.ConvNd``) with ``G``
  groups (``G = 1`` except for grouped convolutions and ``nn.MultiheadAttention``'s packed
  ``in_proj``, whose groups 0/1/2 are the query/key/value projections). Factors ``A`` of shape ``(G, da, da)`` and
  ``B`` of shape ``(G, db, db)``. For group ``g`` the curvature of the group's joint parameter
  vector ``[W_g.flatten(), b_g]`` is ``B[g] ⊗ A[g]`` *in the ordering of the augmented matrix*
  ``[W_g, b_g]`` of shape ``(db, da)`` flattened row-major (output index outer, input index inner),
  where the bias is the last input coordinate (the "ones" appended to the layer input).
  Each factor is dense or, when built from few rows against its dimension, held as
  those rows (:class:`~marglik.curvature.row_factor.RowFactor`, ``F = rows^T rows``); ``.A`` / ``.B``
  are dense either way. Between groups the block is zero (an extra block-diagonal approximation for grouped convs and
  between the q/k/v projections). A bias-only block with ``A = 1`` is a dense block ``B`` over
  the (flattened) parameter: the exact block of a raw parameter such as a class token.
* :class:`DiagonalBlock` -- per-channel ``k x k`` blocks (``k`` = 1 or 2) for elementwise affine
  parameters (norm layers, scalar scale/bias modules): ``blocks`` of shape ``(C, k, k)`` over
  ``(weight[c], bias[c])``. These are exact blocks of the GGN, not Kronecker approximations.

Parameter ordering used by every ``to_dense``: the block's parameters concatenated in module
order (``weight.flatten()`` then ``bias``), and :meth:`Kron.to_dense` places blocks at the
offsets of their parameters in ``Kron.params`` (the covered trainable parameters in
``model.parameters()`` order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .row_factor import RowFactor


class _WeightBias:
    """The ``weight`` / ``bias`` pair shared by both block types."""

    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]

    @property
    def params(self) -> List[nn.Parameter]:
        """Present trainable parameters, ``[weight, bias]`` order (``to_dense`` order)."""
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def num_params(self) -> int:
        """Number of parameters ``P`` covered."""
        return sum(p.numel() for p in self.params)


#: a Kronecker factor as the engine stores it: dense ``(G, d, d)`` or its rows (:class:`RowFactor`)
Factor = Union[Tensor, RowFactor]


def dense_factor(F: Factor) -> Tensor:
    """A factor as a dense ``(G, d, d)`` tensor (rows multiplied out, with their autograd graph)."""
    return F.dense() if isinstance(F, RowFactor) else F


class KronBlock(_WeightBias):
    """Kronecker-factored curvature of one weight-sharing linear layer.

    Each factor is stored in the form the engine chose (:class:`~marglik.curvature.row_factor.FactorForm`):
    a dense ``(G, d, d)`` tensor, or a :class:`~marglik.curvature.row_factor.RowFactor` whose rows
    ``(G, m, d)`` give the factor as ``rows^T rows`` when ``m`` is well below ``d``. :attr:`A` /
    :attr:`B` are always the dense tensors (multiplied out on first access, then cached, so code that
    reads factors keeps working); :attr:`A_factor` / :attr:`B_factor` are the stored forms, which the
    posterior algebra (:class:`marglik.DecomposedKron`) decomposes without forming ``d x d`` matrices.
    Each argument is kept as the attribute of the same name.

    Args:
        name: qualified module name in the model.
        A: input factor, ``(G, da, da)`` or its rows; ``da = din (+1 if a trainable bias)``, where
            ``din = weight[0].numel()`` per group. If the weight is frozen and only the bias is
            trainable, ``da = 1`` and ``A = 1``.
        B: output-gradient factor, ``(G, db, db)`` or its rows, with ``db = out_features // G``.
        weight: the trainable weight parameter, or ``None`` if frozen.
        bias: the trainable bias parameter, or ``None`` if absent / frozen.
    """

    def __init__(self, name: str, A: Factor, B: Factor, weight: Optional[nn.Parameter],
                 bias: Optional[nn.Parameter]) -> None:
        self.name = name
        self.A_factor, self.B_factor = A, B
        self.weight, self.bias = weight, bias
        self._dense: dict = {}

    def _dense_of(self, key: str, F: Factor) -> Tensor:
        if not isinstance(F, RowFactor):
            return F
        if key not in self._dense:
            self._dense[key] = F.dense()
        return self._dense[key]

    @property
    def A(self) -> Tensor:
        """The dense input factor ``(G, da, da)``."""
        return self._dense_of("A", self.A_factor)

    @property
    def B(self) -> Tensor:
        """The dense output factor ``(G, db, db)``."""
        return self._dense_of("B", self.B_factor)

    def stored(self) -> Tuple[Tensor, Tensor]:
        """The tensors the factors are stored as (dense factors, or rows), through which gradients
        of the posterior reach whatever produced the factors."""
        return tuple(F.rows if isinstance(F, RowFactor) else F for F in (self.A_factor, self.B_factor))

    @property
    def requires_grad(self) -> bool:
        """Whether either stored factor carries an autograd graph."""
        return any(t.requires_grad for t in self.stored())

    @property
    def dims(self) -> Tuple[int, int]:
        """``(da, db)``: the factors' dimensions (without forming them)."""
        return self.A_factor.shape[-1], self.B_factor.shape[-1]

    @property
    def groups(self) -> int:
        """Number of Kronecker groups ``G``."""
        return self.A_factor.shape[0]

    def __repr__(self) -> str:
        forms = ", ".join(f"{k}={'rows' if isinstance(F, RowFactor) else 'dense'}{tuple(F.shape)}"
                          for k, F in (("A", self.A_factor), ("B", self.B_factor)))
        return f"KronBlock({self.name!r}, {forms})"

    def dense_index(self) -> Tensor:
        """Map from the Kronecker ordering to the parameter ordering.

        Returns a ``(G, db * da)`` long tensor whose entry ``[g, o * da + i]`` is the position of
        that coordinate of the augmented group matrix ``[W_g, b_g]`` in ``[weight.flatten(), bias]``.
        """
        G, (da, db) = self.groups, self.dims
        dev = self.A_factor.device
        out = torch.arange(G * db, device=dev).view(G, db, 1)  # global output channel
        cols = []
        n_weight = 0
        if self.weight is not None:
            din = self.weight[0].numel()
            n_weight = self.weight.numel()
            cols.append(out * din + torch.arange(din, device=dev).view(1, 1, din))
        if self.bias is not None:
            cols.append(n_weight + out)
        idx = torch.cat(cols, dim=-1)
        assert idx.shape[-1] == da, "factor size does not match parameter layout"
        return idx.reshape(G, db * da)

    def to_dense(self) -> Tensor:
        """Dense ``(p, p)`` curvature over ``[weight.flatten(), bias]``."""
        p = self.num_params
        dense = self.A.new_zeros(p, p)
        idx = self.dense_index()
        for g in range(self.groups):
            kron = torch.kron(self.B[g], self.A[g])
            dense[idx[g][:, None], idx[g][None, :]] = kron
        return dense


@dataclass
class DiagonalBlock(_WeightBias):
    """Exact per-channel blocks of elementwise affine parameters.

    Attributes:
        name: qualified module name.
        blocks: ``(C, k, k)``; ``k`` is the number of present trainable parameters among
            ``(weight, bias)``, in that order. Channel ``c`` couples ``weight.flatten()[c]`` and
            ``bias.flatten()[c]``.
        weight / bias: the parameters (``None`` when absent or frozen).
    """

    name: str
    blocks: Tensor
    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]

    def to_dense(self) -> Tensor:
        """Dense ``(k C, k C)`` matrix over ``[weight.flatten(), bias.flatten()]``."""
        C, k, _ = self.blocks.shape
        dense = self.blocks.new_zeros(k * C, k * C)
        ch = torch.arange(C, device=self.blocks.device)
        for i in range(k):
            for j in range(k):
                dense[i * C + ch, j * C + ch] = self.blocks[:, i, j]
        return dense


Block = KronBlock | DiagonalBlock


@dataclass
class Kron:
    """Block-diagonal K-FAC curvature of a model.

    Approximates the GGN (``fisher_type="type-2"``) or Fisher (``"mc"``, ``"empirical"``) of the
    **summed** negative log-likelihood over the data set (see :class:`marglik.KFAC`).

    Attributes:
        blocks: one block per covered module.
        params: covered trainable parameters in ``model.parameters()`` order; this is the
            row/column order of :meth:`to_dense`.
        num_data: number of examples the curvature is summed over.
        approx: ``"expand"`` or ``"reduce"`` (the positions inside one example / copy); ``"auto"`` or
            ``"per-layer"`` when the blocks' flavours differ (``meta["flavours"]`` has them).
        meta: ``loss`` (summed NLL), ``fisher_type``, ``likelihood`` and ``copies_approx``
            (``"expand"`` / ``"reduce"``: how augmented copies in the batch entered the factors;
            see :class:`marglik.KFAC` for the formulas and their scaling).
    """

    blocks: List[Block]
    params: List[nn.Parameter]
    num_data: int = 0
    approx: str = "expand"
    meta: dict = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        """Number of parameters ``P`` covered (the side of :meth:`to_dense`)."""
        return sum(p.numel() for p in self.params)

    def param_offsets(self) -> dict:
        """``id(param) -> offset`` in the :meth:`to_dense` ordering."""
        offsets, off = {}, 0
        for p in self.params:
            offsets[id(p)] = off
            off += p.numel()
        return offsets

    def block_indices(self, block: Block) -> Tensor:
        """Global indices (into :meth:`to_dense`) of a block's parameters, concatenated."""
        offsets = self.param_offsets()
        dev = self.params[0].device
        return torch.cat(
            [torch.arange(p.numel(), device=dev) + offsets[id(p)] for p in block.params]
        )

    def to_dense(self) -> Tensor:
        """``(P, P)`` block-diagonal matrix in ``params`` order (parameters flattened)."""
        P = self.num_params
        ref = self.blocks[0]
        t = ref.A_factor if isinstance(ref, KronBlock) else ref.blocks
        dense = torch.zeros(P, P, dtype=t.dtype, device=t.device)
        for block in self.blocks:
            idx = self.block_indices(block)
            dense[idx[:, None], idx[None, :]] = block.to_dense()
        return dense

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def named_blocks(self) -> Sequence[tuple[str, Block]]:
        """``(name, block)`` pairs in :meth:`to_dense` order."""
        return [(b.name, b) for b in self.blocks]

    def split_bias(self) -> "Kron":
        """A copy without the weight-bias cross terms of :class:`KronBlock` s.

        Every block with both a weight and a bias becomes a weight block ``B ⊗ A[:-1, :-1]`` and a
        bias block ``B * A[-1, -1]`` (``A[-1, -1]`` is the fraction of examples that reach the layer,
        1 for ordinary layers). This is the block structure of laplace-torch's ``Kron`` (curvlinops'
        ``separate_weight_and_bias=True``). Other blocks, ``params``, ``num_data``, ``approx`` and
        ``meta`` are kept; factors are sliced, so an autograd graph through them is preserved.
        """
        blocks: List[Block] = []
        for b in self.blocks:
            if isinstance(b, KronBlock) and b.weight is not None and b.bias is not None:
                A = b.A_factor
                if isinstance(A, RowFactor):  # principal submatrices of rows^T rows: column slices
                    A_weight, A_bias = A.columns(slice(None, -1)), A.rows[..., -1:].square().sum(1, keepdim=True)
                else:
                    A_weight, A_bias = A[:, :-1, :-1], A[:, -1:, -1:]
                blocks.append(KronBlock(b.name, A_weight, b.B_factor, b.weight, None))
                blocks.append(KronBlock(b.name, A_bias, b.B_factor, None, b.bias))
            else:
                blocks.append(b)
        return Kron(blocks, list(self.params), self.num_data, self.approx, dict(self.meta))
