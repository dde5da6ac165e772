"""Blocks of the K-FAC Laplace posterior precision ``P = s K + diag(p)``, one class per case.

``K`` is block-diagonal (:class:`~marglik.curvature.kron.Kron`), and so is ``P``. A curvature
block is decomposed once (:class:`KronBlockEigen`, :class:`ChannelBlocksInfo`); given the prior
``p`` it becomes a :class:`PosteriorBlock`, whose class is the case of the algebra:

================================  =========================================  ==========
class                             when                                       exact
================================  =========================================  ==========
:class:`ConstantPriorKron`        prior constant over a :class:`KronBlock`   yes
:class:`WeightBiasPriorKron`      layerwise prior on a joint weight+bias     yes
                                  :class:`KronBlock`
:class:`DenseKron`                diagonal prior, a factor of size 1         yes
:class:`ProjectedPriorKron`       diagonal prior, otherwise                  no (K-FAC)
:class:`ChannelPosterior`         a :class:`DiagonalBlock` (``k x k`` per    yes
                                  channel), any prior
================================  =========================================  ==========

Every block has the same interface: :meth:`~PosteriorBlock.logdet_ratio` (``log det P_b - log
det diag(p_b)``), :meth:`~PosteriorBlock.solve` and :meth:`~PosteriorBlock.sample`, on vectors
shaped like the block's :attr:`~PosteriorBlock.index` (the positions of its coordinates in
``Kron.to_dense`` order). Notation: a :class:`KronBlock` group has factors ``A`` (``nA x nA``,
input side, bias = last coordinate) and ``B`` (``nB x nB``) with eigenvalues ``lA``, ``lB``,
eigenvectors ``V_A``, ``V_B`` and ``lam_ji = lB_j lA_i`` (:class:`~marglik.curvature.eigen.KronEigen`).

Factors held as rows (few rows against their dimension) are decomposed on their row space only;
each class treats the null-space complement in closed form (:mod:`marglik.curvature.eigen`), with the
same results as the dense decomposition to round-off (``tests/test_row_factors.py``).

Gradients of :meth:`~PosteriorBlock.logdet_ratio`: closed form in the eigendecomposition for the
Kronecker cases (:mod:`marglik.curvature.logdet`), plain autograd through a Cholesky factor
(:class:`DenseKron`) or ``2 x 2`` determinants (:class:`ChannelPosterior`); never through ``eigh``. For a
factor held as rows the gradient is returned w.r.t. the rows (``2 rows V M V^T``), without a ``d x d``
matrix (:meth:`~marglik.curvature.eigen.FactorEigen.grad`).

One module per family, as the layer rules in :mod:`marglik.curvature.layers`: the interface
(:mod:`.base`: :class:`PosteriorBlock`), the Kronecker blocks (:mod:`.kron`: :class:`KronBlockEigen`
and its four cases, :class:`PackedKronBlocks`) and the per-channel blocks (:mod:`.channel`:
:class:`ChannelBlocksInfo`, :class:`ChannelPosterior`). Every name is importable from here.
"""

from .base import PosteriorBlock, Randn
from .channel import ChannelBlocksInfo, ChannelPosterior
from .kron import (
    ConstantPriorKron,
    DenseKron,
    KronBlockEigen,
    PackedKronBlocks,
    ProjectedPriorKron,
    WeightBiasPriorKron,
)

__all__ = [
    "PosteriorBlock",
    "ConstantPriorKron",
    "WeightBiasPriorKron",
    "DenseKron",
    "ProjectedPriorKron",
    "ChannelPosterior",
    "KronBlockEigen",
    "ChannelBlocksInfo",
    "PackedKronBlocks",
    "Randn",
]
