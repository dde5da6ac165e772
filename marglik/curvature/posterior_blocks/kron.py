"""The Kronecker posterior blocks: a :class:`~marglik.curvature.kron.KronBlock` decomposed once
(:class:`KronBlockEigen`), and given the prior one of its four cases -- :class:`ConstantPriorKron`,
:class:`WeightBiasPriorKron`, :class:`DenseKron`, :class:`ProjectedPriorKron` (when each applies
and whether it is exact: :mod:`marglik.curvature.posterior_blocks`) -- plus
:class:`PackedKronBlocks`, the log det ratios of many blocks of a packable case in one call.

Shapes: a block has ``G`` groups with factors ``A (nA, nA)`` (input side, bias = last coordinate)
and ``B (nB, nB)``; vectors on it are ``(n, G, nB, nA)``.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Type

import torch
from torch import Tensor

from ..eigen import KronEigen
from ..kron import KronBlock
from ..logdet import KronLogdetProjected, KronLogdetRatio, KronSpectrum, PrefixSums
from ..prior import PriorStructure
from .base import PosteriorBlock, Randn


@dataclass
class KronBlockEigen:
    """A :class:`KronBlock` with its factors eigendecomposed.

    Attributes:
        block: the curvature block (its factors may carry an autograd graph).
        index: ``(G, nB, nA)`` positions of the block's coordinates in ``Kron.to_dense`` order.
        eig: :class:`KronEigen` of the detached factors.
        weight_layer: index of the weight in ``Kron.params`` (``None`` if frozen).
        bias_layer: index of the bias in ``Kron.params`` (``None`` if absent or frozen).
    """

    block: KronBlock
    index: Tensor
    eig: KronEigen
    weight_layer: Optional[int]
    bias_layer: Optional[int]

    @property
    def lam(self) -> Tensor:
        """``(G, nB, nA)`` eigenvalues ``lB_j lA_i`` of ``B ⊗ A``."""
        return self.eig.lam

    @property
    def iw(self) -> Optional[int]:
        """Short name of :attr:`weight_layer` (read by ``scripts/bench_marglik.py``)."""
        return self.weight_layer

    @property
    def ib(self) -> Optional[int]:
        """Short name of :attr:`bias_layer` (read by ``scripts/bench_marglik.py``)."""
        return self.bias_layer

    @property
    def weight_and_bias(self) -> bool:
        """Whether the block holds both a weight and its bias."""
        return self.weight_layer is not None and self.bias_layer is not None

    @property
    def has_unit_factor(self) -> bool:
        """Whether ``nA == 1`` or ``nB == 1`` (bias-only blocks, single-output layers)."""
        return 1 in self.eig.shape[1:]

    def posterior_type(self, structure: PriorStructure) -> Type["_KronPosterior"]:
        """The :class:`PosteriorBlock` class of this block under a prior of ``structure``."""
        if structure is PriorStructure.SCALAR:
            return ConstantPriorKron
        if structure is PriorStructure.LAYERWISE:
            return WeightBiasPriorKron if self.weight_and_bias else ConstantPriorKron
        return DenseKron if self.has_unit_factor else ProjectedPriorKron

    def posterior(self, prior: Tensor, structure: PriorStructure) -> "_KronPosterior":
        """The posterior block for the prior precision ``prior`` (of ``structure``)."""
        return self.posterior_type(structure).from_prior(self, prior, structure)


class _KronPosterior(PosteriorBlock):
    """A posterior block over a :class:`KronBlockEigen`; subclasses fix the prior's form.

    A class with ``packable = True`` has a prior that is constant per parameter tensor (a single
    value, or ``with_bias``: one for the weight and one for the bias), so that the log det ratios of
    all its blocks can be evaluated together (:class:`PackedKronBlocks`).
    """

    packable: ClassVar[bool] = False
    with_bias: ClassVar[bool] = False

    def __init__(self, e: KronBlockEigen) -> None:
        self.e = e
        self.index = e.index

    @classmethod
    @abstractmethod
    def from_prior(cls, e: KronBlockEigen, prior: Tensor, structure: PriorStructure) -> "_KronPosterior":
        """This block's part of the prior precision ``prior`` (of ``structure``)."""

    def sample(self, n: int, s: Tensor, randn: Randn) -> Tensor:
        return self._transform_normals(randn(n, *self.index.shape), s, randn)

    @abstractmethod
    def _transform_normals(self, Z: Tensor, s: Tensor, randn: Randn) -> Tensor:
        """Map standard normals ``Z (n, G, nB, nA)`` to draws from ``N(0, P_b^{-1})``."""


class _EigenbasisDiagonal(_KronPosterior):
    """A posterior block that is diagonal in the Kronecker eigenbasis ``V_B ⊗ V_A``: ``P_b^p`` is
    that basis with the eigenvalues raised to ``p`` (:meth:`_power`)."""

    @abstractmethod
    def eigenvalues(self, s: Tensor) -> Tensor:
        """Eigenvalues of ``P_b`` (or of its approximation) on the eigenvector pairs held (a
        truncated decomposition's complements: see the subclass)."""

    @abstractmethod
    def _power(self, X: Tensor, s: Tensor, p: float) -> Tensor:
        """``P_b^p X`` for ``X`` of shape ``(n, G, nB, nA)``."""

    def solve(self, X, s):
        return self._power(X, s, -1.0)

    def _transform_normals(self, Z: Tensor, s: Tensor, randn: Randn) -> Tensor:
        if not self.e.eig.truncated:  # Z as eigen-coordinates: one rotation instead of two
            return self.e.eig.from_eigenbasis(Z * self.eigenvalues(s).rsqrt())
        return self._power(Z, s, -0.5)


class ConstantPriorKron(_EigenbasisDiagonal):
    """Prior ``delta`` constant over the block (scalar prior; layerwise prior on a weight-only or
    bias-only block): ``s B ⊗ A + delta I`` has the eigenvalues ``s lam + delta`` -- **exact**.

    Args:
        e: the decomposed block.
        delta: 0-d prior precision.
    """

    packable: ClassVar[bool] = True
    with_bias: ClassVar[bool] = False

    def __init__(self, e: KronBlockEigen, delta: Tensor) -> None:
        super().__init__(e)
        self.delta = delta

    @classmethod
    def from_prior(cls, e, prior, structure):
        if structure is PriorStructure.SCALAR:
            return cls(e, prior.reshape(()))
        return cls(e, prior[e.weight_layer if e.weight_layer is not None else e.bias_layer])

    def eigenvalues(self, s):
        return s * self.e.lam + self.delta  # on every other eigenvector (complements): delta

    def _power(self, X, s, p):
        return self.e.eig.apply_spectral(X, self.eigenvalues(s).pow(p), self.delta.pow(p))

    def logdet_ratio(self, s):
        spectrum = KronSpectrum.of(self.e.eig, weight_and_bias=False, prefix_sums=False)
        return KronLogdetRatio.apply(*self.e.block.stored(), s, self.delta.expand(self.e.eig.shape[0]), None, spectrum)


class _DiagonalPriorKron(_KronPosterior):
    """A diagonal prior ``Delta`` of shape ``(G, nB, nA)`` (augmented layout) over the block."""

    def __init__(self, e: KronBlockEigen, Delta: Tensor) -> None:
        super().__init__(e)
        self.Delta = Delta

    @classmethod
    def from_prior(cls, e, prior, structure):
        return cls(e, prior[e.index])


class ProjectedPriorKron(_EigenbasisDiagonal, _DiagonalPriorKron):
    """Diagonal prior ``Delta`` on a block with ``nA, nB > 1``: the K-FAC approximation.

    As in EK-FAC (George et al. 2018), the prior is replaced by its diagonal in the Kronecker
    eigenbasis, ``d~_ji = sum_{o,k} V_B[o, j]^2 V_A[k, i]^2 Delta[o, k]``, averaged over clusters of
    equal eigenvalues of ``A`` and of ``B`` so that it does not depend on the basis LAPACK picks
    inside a degenerate eigenspace (e.g. the null space of a rank-deficient factor)
    (:meth:`KronEigen.project_diagonal`); ``P_b ~= (V_B ⊗ V_A) diag(s lam + d~) (V_B ⊗ V_A)^T``.
    Exact when ``Delta`` is constant over the block and, by Hadamard's inequality (and concavity of
    ``log`` for the cluster averages), the log determinant is never below the exact one (the log
    marginal likelihood is a lower bound of the K-FAC one). Continuous in the prior but not in the
    factors where eigenvalues cross; the gradient w.r.t. the factors holds the eigenbasis fixed.

    Args:
        e: the decomposed block.
        Delta: ``(G, nB, nA)`` prior diagonal in the augmented layout.
    """

    exact: ClassVar[bool] = False

    def eigenvalues(self, s):
        """``(G, kB', kA')``: on the held pairs and, for a truncated decomposition, one entry per
        complement (first row / column; :meth:`KronEigen.project_diagonal`)."""
        return s * self.e.eig.extended_lam() + self.e.eig.project_diagonal(self.Delta)

    def _power(self, X, s, p):
        return self.e.eig.apply_extended(X, self.eigenvalues(s).pow(p))

    def logdet_ratio(self, s):
        return KronLogdetProjected.apply(*self.e.block.stored(), s, self.Delta, self.e.eig) - self.Delta.log().sum()


class WeightBiasPriorKron(_KronPosterior):
    """Layerwise prior on a joint weight+bias block: ``delta_w`` on the weight, ``delta_b`` on the bias.

    The prior is ``I ⊗ (delta_w I + c e e^T)``, ``c = delta_b - delta_w``, ``e`` the bias coordinate.
    In ``B``'s eigenbasis the posterior splits into ``nB`` blocks ``N_j = s lB_j A + delta_w I + c e e^T``
    and the matrix determinant lemma gives, with ``u = V_A^T e`` and
    ``r_ji = 1 / (s lam_ji + delta_w)``, ``log det N_j = sum_i log(s lam_ji + delta_w) + log t_j``,
    ``t_j = sum_i u_i^2 (s lam_ji + delta_b) r_ji`` (``= 1 + c u^T diag(r_j) u`` without cancellation)
    -- **exact** (:class:`KronLogdetRatio`). Solves use Sherman-Morrison in the same basis.

    Args:
        e: the decomposed block (with a weight and a bias).
        delta_w: 0-d prior precision of the weight.
        delta_b: 0-d prior precision of the bias.
    """

    packable: ClassVar[bool] = True
    with_bias: ClassVar[bool] = True

    def __init__(self, e: KronBlockEigen, delta_w: Tensor, delta_b: Tensor) -> None:
        super().__init__(e)
        self.delta_w, self.delta_b = delta_w, delta_b

    @classmethod
    def from_prior(cls, e, prior, structure):
        return cls(e, prior[e.weight_layer], prior[e.bias_layer])

    def logdet_ratio(self, s):
        G = self.e.eig.shape[0]
        spectrum = KronSpectrum.of(self.e.eig, weight_and_bias=True, prefix_sums=False)
        return KronLogdetRatio.apply(*self.e.block.stored(), s, self.delta_w.expand(G), self.delta_b.expand(G), spectrum)

    def _prior_diag(self, nA: int) -> Tensor:
        """``(nA,)``: ``delta_w`` on the weight coordinates, ``delta_b`` on the bias (the last)."""
        d = self.delta_w.expand(nA).clone()
        d[-1] = self.delta_b
        return d

    def solve(self, X, s):
        eig = self.e.eig
        lA, VA, _, _ = eig.bias_spectrum()  # V' = [q0, V_A] for a truncated A: e in its span
        lam = eig.lB.unsqueeze(-1) * lA.unsqueeze(-2)  # (G, kB, k')
        R = (s * lam + self.delta_w).reciprocal()
        u = VA[:, -1, :].unsqueeze(-2)  # (G, 1, k')
        t = (u * u * (s * lam + self.delta_b) * R).sum(-1)  # (G, kB)
        Ru = R * u
        c = self.delta_b - self.delta_w
        Y = eig.VB.transpose(-1, -2) @ X  # (n, G, kB, nA)
        Yh = Y @ VA  # (n, G, kB, k')
        Zh = R * Yh - (c / t).unsqueeze(-1) * Ru * (Ru * Yh).sum(-1, keepdim=True)  # N_j^{-1} y_j on span(V')
        if not eig.truncated:
            return eig.VB @ Zh @ VA.transpose(-1, -2)
        # P^{-1} X = X D^{-1} + V_B [N_j^{-1} y_j - D^{-1} y_j]_j: B's complement sees the prior D
        # alone; on span(V')'s complement N_j^{-1} = D^{-1} = 1 / delta_w (e lies in span(V'))
        corr = (Zh - Yh / self.delta_w) @ VA.transpose(-1, -2)
        corr[..., -1] = corr[..., -1] + c / (self.delta_w * self.delta_b) * Y[..., -1]
        return X / self._prior_diag(X.shape[-1]) + eig.VB @ corr

    def _transform_normals(self, Z, s, randn):
        # y ~ N(0, P_b) from the factor square roots and the prior; then P_b^{-1} y ~ N(0, P_b^{-1})
        eig = self.e.eig
        root = (eig.lam * s).sqrt()
        if eig.truncated:
            y = eig.from_eigenbasis(root * eig.to_eigenbasis(Z))
        else:  # Z as eigen-coordinates
            y = eig.from_eigenbasis(root * Z)
        y = y + self._prior_diag(Z.shape[-1]).sqrt() * randn(*Z.shape)
        return self.solve(y, s)


class DenseKron(_DiagonalPriorKron):
    """Diagonal prior on a block with ``nA == 1`` or ``nB == 1``: dense Cholesky of the
    ``max(nA, nB)``-sized group blocks -- **exact**.

    Args:
        e: the decomposed block.
        Delta: ``(G, nB, nA)`` prior diagonal in the augmented layout.
    """

    def _dense(self, s: Tensor, Delta: Tensor, detach: bool) -> Tensor:
        """``s B_g ⊗ A_g + diag(Delta_g)`` as ``(G, nB nA, nB nA)``."""
        A, B = self.e.block.A, self.e.block.B
        if detach:
            A, B = A.detach(), B.detach()
        G, nB, nA = Delta.shape
        K = (B.unsqueeze(-1).unsqueeze(-3) * A.unsqueeze(-3).unsqueeze(-2)).reshape(G, nB * nA, nB * nA)
        return s * K + torch.diag_embed(Delta.reshape(G, nB * nA))

    def logdet_ratio(self, s):
        inv_sqrt = self.Delta.rsqrt().reshape(self.Delta.shape[0], -1)  # (G, p)
        K = self._dense(s, torch.zeros_like(self.Delta), detach=False)
        M = inv_sqrt.unsqueeze(-1) * K * inv_sqrt.unsqueeze(-2)
        M = M + torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        return 2.0 * torch.linalg.cholesky(M).diagonal(dim1=-2, dim2=-1).log().sum()

    def _cholesky(self, s: Tensor) -> Tensor:
        return torch.linalg.cholesky(self._dense(s, self.Delta, detach=True))

    def _flat(self, X: Tensor) -> Tensor:
        """``(n, G, nB, nA) -> (G, nB nA, n)``."""
        G, nB, nA = self.index.shape
        return X.reshape(X.shape[0], G, nB * nA).permute(1, 2, 0)

    def solve(self, X, s):
        Y = torch.cholesky_solve(self._flat(X), self._cholesky(s))
        return Y.permute(2, 0, 1).reshape(X.shape)

    def _transform_normals(self, Z, s, randn):
        L = self._cholesky(s)
        x = torch.linalg.solve_triangular(L.transpose(-1, -2), self._flat(Z), upper=True)
        return x.permute(2, 0, 1).reshape(Z.shape)


class PackedKronBlocks:
    """The eigenvalues of several :class:`KronBlockEigen` zero-padded into one batch of rows.

    Rows are the blocks' groups; ``lA`` is padded on the left (it stays ascending, zeros add
    nothing to the log det ratio), ``lB`` on the right. One :class:`KronLogdetRatio` call
    (:meth:`logdet_ratio`) then evaluates the blocks of a ``packable`` posterior class at once.

    Args:
        members: the blocks.
        with_bias: a separate prior on the bias coordinate (:class:`WeightBiasPriorKron`), else
            one prior per block (:class:`ConstantPriorKron`).

    Attributes:
        spectrum: :class:`KronSpectrum` of the rows, with prefix sums and the layout.
        weight_layer: ``(rows,)`` index in ``Kron.params`` of the parameter whose prior applies to
            the row's weight coordinates (its bias if the block has no weight).
        bias_layer: ``(rows,)`` likewise for the bias coordinate (the weight if there is no bias).
    """

    def __init__(self, members: List[KronBlockEigen], with_bias: bool) -> None:
        # each member's held spectrum (with q0 for a truncated A under a bias prior): every other
        # eigenvalue is 0 and adds nothing (KronSpectrum)
        spectra = [e.eig.bias_spectrum()[::2] if with_bias else (e.eig.lA, None) for e in members]
        rows = sum(e.eig.shape[0] for e in members)
        nA = max(la.shape[-1] for la, _ in spectra)
        nB = max(e.eig.lB.shape[-1] for e in members)
        ref = members[0].eig.lA
        lA = ref.new_zeros(rows, nA)
        lB = ref.new_zeros(rows, nB)
        w = ref.new_zeros(rows, nA) if with_bias else None
        weight_layer, bias_layer, layout = [], [], []
        r = 0
        for e, (la, wa) in zip(members, spectra):
            G, na, nb = la.shape[0], la.shape[-1], e.eig.lB.shape[-1]
            layout.append((r, r + G, na, nb))
            lA[r : r + G, nA - na :] = la
            lB[r : r + G, :nb] = e.eig.lB
            if with_bias:
                w[r : r + G, nA - na :] = wa
            weight_layer += [e.weight_layer if e.weight_layer is not None else e.bias_layer] * G
            bias_layer += [e.bias_layer if e.bias_layer is not None else e.weight_layer] * G
            r += G
        self.weight_layer = torch.tensor(weight_layer, dtype=torch.long, device=ref.device)
        self.bias_layer = torch.tensor(bias_layer, dtype=torch.long, device=ref.device)
        self.with_bias = with_bias
        self.spectrum = KronSpectrum(lA, lB, bias_weights=w, prefix_sums=PrefixSums(lA, w), layout=layout)

    def logdet_ratio(self, s: Tensor, layer_prior: Tensor) -> Tensor:
        """The sum of the members' :meth:`PosteriorBlock.logdet_ratio`.

        Args:
            s: 0-d likelihood scale.
            layer_prior: ``(L,)`` prior precision per parameter tensor of ``Kron.params``.

        Returns:
            0-d tensor.
        """
        delta_b = layer_prior[self.bias_layer] if self.with_bias else None
        return KronLogdetRatio.apply(None, None, s, layer_prior[self.weight_layer], delta_b, self.spectrum)
