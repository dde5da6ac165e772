"""Eigendecompositions of Kronecker factors, and operations in a Kronecker eigenbasis.

A :class:`~marglik.curvature.kron.KronBlock` holds, per group ``g``, factors ``A_g`` (``nA x nA``,
input side, bias = last coordinate) and ``B_g`` (``nB x nB``, output side) whose Kronecker product
``B_g ⊗ A_g`` acts on the augmented weight matrix ``[W_g, b_g]`` of shape ``(nB, nA)`` flattened
row-major. With ``A = V_A diag(l^A) V_A^T`` and ``B = V_B diag(l^B) V_B^T`` the product has the
eigenvectors ``V_B ⊗ V_A`` and the eigenvalues ``lam[g, j, i] = l^B_gj l^A_gi``; in matrix form a
vector ``X (nB, nA)`` has the eigen-coordinates ``V_B^T X V_A`` (:meth:`KronEigen.to_eigenbasis`).

Truncated decompositions. A factor built from ``m`` rows with ``m`` well below its dimension ``n`` is
held as those rows (:class:`~marglik.curvature.row_factor.RowFactor`) and decomposed on its row space
only: ``k = m`` eigenpairs (:class:`FactorEigen`), the other ``n - k`` eigenvalues exactly 0 on the
orthogonal complement, whose basis is never formed. Everything downstream sums over the held pairs
and treats the complement in closed form: a function of ``B ⊗ A`` that is ``phi(lam)`` on the held pairs
is ``phi(0)`` on every other one (:meth:`KronEigen.apply_spectral`); the projected diagonal prior sees
the complement as one cluster of ``n - k`` equal eigenvalues (:meth:`KronEigen.project_diagonal`,
:meth:`KronEigen.apply_extended`); the weight-and-bias prior needs the one complement direction the
bias coordinate has (:meth:`KronEigen.bias_spectrum`). With ``k = n`` (dense factors) every formula
reduces to the full-basis one, so there is one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .kron import Factor
from .row_factor import RowFactor, eigh_rows

__all__ = ["eigh_psd", "eigen_clusters", "cluster_mean", "sym_from_eigen", "FactorEigen", "KronEigen", "decompose_factors"]

Clusters = Tuple[Tensor, Tensor]


def eigh_psd(M: Tensor) -> Tuple[Tensor, Tensor]:
    """Eigendecomposition of (batched) symmetric positive semi-definite matrices.

    ``M`` is detached and symmetrised first. If LAPACK fails to converge, the decomposition of
    ``M + I`` is used and 1 subtracted; matrices of the batch whose decomposition came back with NaN
    without an error (float32 LAPACK on rank-deficient factors, seen with MKL) are redone in
    float64 -- those alone, not the whole batch.

    Args:
        M: ``(..., d, d)`` symmetric PSD matrices (e.g. Kronecker factors).

    Returns:
        ``(l, V)``: eigenvalues ``(..., d)`` in ascending order, clamped at 0 (round-off negatives
        of a PSD matrix), and orthonormal eigenvectors ``(..., d, d)`` with ``M = V diag(l) V^T``.

    Raises:
        FloatingPointError: ``M`` contains NaN or Inf.
    """
    M = M.detach()
    M = 0.5 * (M + M.transpose(-1, -2))
    try:
        lam, V = torch.linalg.eigh(M)
    except RuntimeError:  # pragma: no cover - convergence failure
        eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        lam, V = torch.linalg.eigh(M + eye)
        lam = lam - 1.0
    bad = ~(torch.isfinite(lam).all(-1) & torch.isfinite(V).flatten(-2).all(-1))  # (...)
    if bad.any():
        if not torch.isfinite(M).all():
            raise FloatingPointError("Kronecker factor contains NaN or Inf")
        l64, V64 = torch.linalg.eigh(M[bad].double())
        lam, V = lam.clone(), V.clone()
        lam[bad], V[bad] = l64.to(M.dtype), V64.to(M.dtype)
    return lam.clamp_min(0.0), V


def sym_from_eigen(V: Tensor, d: Tensor) -> Tensor:
    """The symmetric matrix ``V diag(d) V^T``, batched over the leading dimensions.

    Args:
        V: ``(..., n, n)`` eigenvectors.
        d: ``(..., n)`` eigenvalues.

    Returns:
        ``(..., n, n)``.
    """
    return (V * d.unsqueeze(-2)) @ V.transpose(-1, -2)


def eigen_clusters(lam: Tensor, rtol: Optional[float] = None) -> Clusters:
    """Groups of (numerically) equal eigenvalues.

    Two neighbours are equal when they differ by at most ``rtol * max(lam)`` of their row.

    Args:
        lam: ``(G, d)`` eigenvalues, ascending along the last dimension.
        rtol: relative tolerance; default ``10 d eps`` of ``lam``'s dtype.

    Returns:
        ``(ids, counts)``, both ``(G, d)`` long: the cluster index of each eigenvalue (numbered
        per row from 0) and the size of its cluster.
    """
    G, d = lam.shape
    if rtol is None:
        rtol = 10 * d * torch.finfo(lam.dtype).eps
    tol = rtol * lam.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny)
    new = torch.zeros_like(lam, dtype=torch.long)
    new[:, 1:] = (lam[:, 1:] - lam[:, :-1] > tol).long()
    ids = new.cumsum(-1)
    size = torch.zeros_like(ids).scatter_add_(-1, ids, torch.ones_like(ids))
    return ids, size.gather(-1, ids)


def cluster_mean(x: Tensor, ids: Tensor, counts: Tensor, mult: Optional[Tensor] = None) -> Tensor:
    """Average ``x`` over clusters of its last dimension (a symmetric projector).

    Args:
        x: ``(..., G, m, d)``.
        ids: ``(G, d)`` cluster indices from :func:`eigen_clusters`.
        counts: ``(G, d)`` cluster sizes from :func:`eigen_clusters`.
        mult: ``(G, d)`` multiplicities (weights) of the entries, or ``None`` (all 1). An entry that
            stands for several equal eigenvalues (the null space of a factor held as rows) has its
            mean over them as value and their number as multiplicity.

    Returns:
        ``x`` with every entry replaced by the (weighted) mean over its cluster, same shape.
    """
    idx = ids.unsqueeze(-2).expand(x.shape)
    if mult is None:
        sums = torch.zeros_like(x).scatter_add_(-1, idx, x)
        return sums.gather(-1, idx) / counts.unsqueeze(-2).to(x.dtype)
    w = mult.unsqueeze(-2).to(x.dtype).expand(x.shape)
    sums = torch.zeros_like(x).scatter_add_(-1, idx, x * w)
    weights = torch.zeros_like(x).scatter_add_(-1, idx, w)
    return sums.gather(-1, idx) / weights.gather(-1, idx)


@dataclass
class FactorEigen:
    """Eigenpairs of a PSD factor ``F_g`` (``n x n`` per group), all of them or those on its row space.

    A dense factor gets all ``k = n`` eigenpairs (:func:`eigh_psd`). A factor held as rows
    (:class:`~marglik.curvature.row_factor.RowFactor`, ``m < n`` rows) gets the ``k = m`` eigenpairs
    on its row space (:func:`~marglik.curvature.row_factor.eigh_rows`); on the orthogonal complement
    of :attr:`V` (:attr:`complement` dimensions) the factor is exactly 0. Every formula of the
    posterior that sums over eigenvalues treats that complement in closed form.

    Attributes:
        evals: ``(G, k)`` eigenvalues, ascending, clamped at 0.
        V: ``(G, n, k)`` orthonormal eigenvectors (columns).
        rows_V: ``rows @ V`` ``(G, m, k)`` for a factor held as rows (the gradient w.r.t. the rows
            is ``2 rows_V M V^T`` for a gradient ``V M V^T`` w.r.t. the factor); ``None`` for dense.
    """

    evals: Tensor
    V: Tensor
    rows_V: Optional[Tensor] = None

    @classmethod
    def of(cls, F: Factor) -> "FactorEigen":
        """Decompose a factor: a dense ``(G, n, n)`` one with :func:`eigh_psd`, a :class:`RowFactor`
        with fewer rows than ``n`` with :func:`~marglik.curvature.row_factor.eigh_rows`."""
        return decompose_factors([F])[0]

    @property
    def n(self) -> int:
        """The factor's dimension."""
        return self.V.shape[-2]

    @property
    def k(self) -> int:
        """The number of eigenpairs held."""
        return self.V.shape[-1]

    @property
    def complement(self) -> int:
        """``n - k``: the dimension on which the factor is 0 without an eigenvector held."""
        return self.n - self.k

    @property
    def from_rows(self) -> bool:
        """Whether the factor was held as rows (gradients go to the rows)."""
        return self.rows_V is not None

    def grad(self, M: Tensor) -> Tensor:
        """The gradient w.r.t. the stored factor of a function whose gradient w.r.t. ``F`` is
        ``V M V^T`` plus anything on the complement of ``V``.

        Args:
            M: ``(G, k, k)``, or ``(G, k)`` for a diagonal ``M``.

        Returns:
            Dense factor: ``V M V^T`` ``(G, n, n)``. Rows: ``2 (rows V) M V^T`` ``(G, m, n)`` (the
            complement of ``V`` is orthogonal to the rows, so it adds nothing).
        """
        if M.dim() == 2:
            if self.rows_V is None:
                return sym_from_eigen(self.V, M)
            return 2.0 * (self.rows_V * M.unsqueeze(-2)) @ self.V.transpose(-1, -2)
        left = self.V if self.rows_V is None else 2.0 * self.rows_V
        return left @ M @ self.V.transpose(-1, -2)

    def squared_columns(self) -> Tuple[Tensor, Tensor]:
        """Columns of squared eigenvector entries and their multiplicities, the complement as one column.

        Returns:
            ``(W, mult)``: ``W`` ``(G, n, k')`` with ``W[:, r, i] = V[:, r, i]^2`` for the ``k`` held
            eigenvectors and, when :attr:`complement` ``> 0``, a first column ``1 - sum_i V[:, r, i]^2``
            (the squared norm of coordinate ``r`` on the complement: the sum of the squared entries of
            any orthonormal basis of it); ``mult`` ``(G, k')``: 1, and :attr:`complement` for that column.
        """
        W = self.V * self.V
        mult = torch.ones(W.shape[0], W.shape[-1], dtype=W.dtype, device=W.device)
        if self.complement == 0:
            return W, mult
        rest = (1.0 - W.sum(-1, keepdim=True)).clamp_min(0.0)
        cmult = torch.full_like(mult[:, :1], float(self.complement))
        return torch.cat([rest, W], -1), torch.cat([cmult, mult], -1)

    def extended_eigenvalues(self) -> Tensor:
        """``(G, k')``: :attr:`l` with a leading 0 for the complement when there is one."""
        if self.complement == 0:
            return self.evals
        return torch.cat([self.evals.new_zeros(self.evals.shape[0], 1), self.evals], -1)


def decompose_factors(factors: Sequence[Factor]) -> List[FactorEigen]:
    """:meth:`FactorEigen.of` for many factors, with one batched call per shape.

    Dense factors of equal size (and dtype / device) are stacked into one :func:`eigh_psd` call,
    row factors of equal ``(m, d)`` into one :func:`~marglik.curvature.row_factor.eigh_rows` call
    (on a GPU, few large batched calls beat many small ones; on a CPU it is the same work).

    Args:
        factors: dense ``(G, n, n)`` tensors or :class:`RowFactor` s.

    Returns:
        One :class:`FactorEigen` per factor, in order.
    """
    groups: Dict[Tuple, List[int]] = {}
    tensors: List[Tensor] = []
    for i, F in enumerate(factors):
        if isinstance(F, RowFactor) and F.num_rows < F.shape[-1]:
            t, kind = F.rows, "rows"
        else:
            t, kind = (F.dense() if isinstance(F, RowFactor) else F), "dense"
        tensors.append(t)
        groups.setdefault((kind, tuple(t.shape[1:]), t.dtype, t.device), []).append(i)
    out: List[Optional[FactorEigen]] = [None] * len(factors)
    for (kind, _, _, _), idx in groups.items():
        batch = torch.cat([tensors[i] for i in idx]) if len(idx) > 1 else tensors[idx[0]]
        parts = eigh_rows(batch) if kind == "rows" else (*eigh_psd(batch), None)
        sizes = [tensors[i].shape[0] for i in idx]
        split = [p.split(sizes) if p is not None else [None] * len(idx) for p in parts]
        for j, i in enumerate(idx):
            out[i] = FactorEigen(*(sp[j] for sp in split))
    return out


@dataclass
class KronEigen:
    """Eigendecomposition of a grouped Kronecker product ``B_g ⊗ A_g`` (factors detached).

    Each factor's eigenpairs are a :class:`FactorEigen`: all of them (dense factor), or those on
    its row space (a factor held as rows, whose complement has eigenvalue 0). ``lam`` holds the
    products over the held eigenpairs; every other eigenvalue of ``B ⊗ A`` is 0.

    Attributes:
        a: :class:`FactorEigen` of ``A`` (``nA`` wide, ``kA`` pairs).
        b: :class:`FactorEigen` of ``B`` (``nB`` wide, ``kB`` pairs).
        lam: ``(G, kB, kA)`` eigenvalues of the product, ``lam[g, j, i] = lB[g, j] lA[g, i]``.
    """

    a: FactorEigen
    b: FactorEigen
    lam: Tensor
    _clusters: Optional[Tuple[Clusters, Clusters]] = field(default=None, repr=False, compare=False)

    @classmethod
    def decompose(cls, A: Factor, B: Factor) -> "KronEigen":
        """Decompose the factors (dense ``(G, n, n)`` or :class:`RowFactor`) with :meth:`FactorEigen.of`."""
        return cls.from_factors(*decompose_factors([A, B]))

    @classmethod
    def from_factors(cls, a: FactorEigen, b: FactorEigen) -> "KronEigen":
        """Wrap two factor decompositions."""
        return cls(a, b, b.evals.unsqueeze(-1) * a.evals.unsqueeze(-2))

    @classmethod
    def from_decompositions(cls, lA: Tensor, VA: Tensor, lB: Tensor, VB: Tensor) -> "KronEigen":
        """Wrap precomputed full factor decompositions (eigenvalues ascending)."""
        return cls.from_factors(FactorEigen(lA, VA), FactorEigen(lB, VB))

    lA = property(lambda self: self.a.evals, doc="``(G, kA)`` eigenvalues of ``A``.")
    VA = property(lambda self: self.a.V, doc="``(G, nA, kA)`` eigenvectors of ``A``.")
    lB = property(lambda self: self.b.evals, doc="``(G, kB)`` eigenvalues of ``B``.")
    VB = property(lambda self: self.b.V, doc="``(G, nB, kB)`` eigenvectors of ``B``.")

    @property
    def shape(self) -> torch.Size:
        """``(G, nB, nA)``: groups, output and input (augmented) dimension (of the full product)."""
        return torch.Size((self.lam.shape[0], self.b.n, self.a.n))

    @property
    def truncated(self) -> bool:
        """Whether either factor holds fewer eigenpairs than its dimension."""
        return self.a.complement > 0 or self.b.complement > 0

    def clusters(self) -> Tuple[Clusters, Clusters]:
        """The :func:`eigen_clusters` of the extended eigenvalues of ``A`` and ``B`` (computed once)."""
        if self._clusters is None:
            self._clusters = (eigen_clusters(self.a.extended_eigenvalues()), eigen_clusters(self.b.extended_eigenvalues()))
        return self._clusters

    def bias_spectrum(self) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """``A``'s eigenpairs as the weight-and-bias algebra needs them: with the bias coordinate
        ``e`` (the last one) inside their span.

        A full decomposition is returned as it is. For a factor held as rows, ``e`` generally has a
        component ``e_perp = e - V V^T e`` on the complement, where ``A`` is 0: the unit vector
        ``q0 = e_perp / |e_perp|`` (the zero vector where ``e`` lies in the span:
        :func:`_bias_complement_direction`) is an eigenvector of ``A`` with eigenvalue 0, and every other
        direction of the complement is orthogonal to ``e`` and to the rows, so it drops out of the
        log determinant, the solves and the gradients (``t_j``, ``u`` and ``C`` of
        :class:`~marglik.curvature.posterior_blocks.WeightBiasPriorKron`). ``q0`` is prepended.

        Returns:
            ``(lA, VA, w, rows_V)``: eigenvalues ``(G, k')``, eigenvectors ``(G, nA, k')``, bias
            weights ``w = u^2 / sum(u^2)`` for ``u = VA[:, -1, :]`` ``(G, k')`` and ``rows @ VA``
            ``(G, m, k')`` (``None`` for a dense factor).
        """
        a = self.a
        evals, V, rows_V = a.evals, a.V, a.rows_V
        if a.complement > 0:
            q0 = _bias_complement_direction(V)
            evals = torch.cat([evals.new_zeros(evals.shape[0], 1), evals], -1)
            V = torch.cat([q0.unsqueeze(-1), V], -1)
            if rows_V is not None:
                rows_V = torch.cat([rows_V.new_zeros(rows_V.shape[0], rows_V.shape[1], 1), rows_V], -1)
        u2 = V[:, -1, :].square()
        return evals, V, u2 / u2.sum(-1, keepdim=True), rows_V

    def bias_weights(self) -> Tensor:
        """``(G, k')``: the bias weights of :meth:`bias_spectrum`."""
        return self.bias_spectrum()[2]

    def to_eigenbasis(self, X: Tensor) -> Tensor:
        """``V_B^T X V_A`` for ``X`` of shape ``(..., G, nB, nA)``; ``(..., G, kB, kA)``."""
        return self.VB.transpose(-1, -2) @ X @ self.VA

    def from_eigenbasis(self, Y: Tensor) -> Tensor:
        """``V_B Y V_A^T`` for ``Y`` of shape ``(..., G, kB, kA)``; ``(..., G, nB, nA)``."""
        return self.VB @ Y @ self.VA.transpose(-1, -2)

    def apply_spectral(self, X: Tensor, phi: Tensor, phi0: Tensor) -> Tensor:
        """``f(P) X`` for an operator diagonal in the eigenbasis of ``B ⊗ A``: ``phi`` ``(G, kB, kA)``
        on the held eigenvector pairs, the scalar ``phi0`` on everything else (every pair with a
        complement direction). ``phi0 X + V_B ((phi - phi0) * V_B^T X V_A) V_A^T``, which is exact for
        full and for truncated decompositions.

        Args:
            X: ``(..., G, nB, nA)``.
            phi: ``(G, kB, kA)``.
            phi0: 0-d.

        Returns:
            ``(..., G, nB, nA)``.
        """
        if not self.truncated:
            return self.from_eigenbasis(phi * self.to_eigenbasis(X))
        return phi0 * X + self.from_eigenbasis((phi - phi0) * self.to_eigenbasis(X))

    def project_diagonal(self, Delta: Tensor) -> Tensor:
        """Diagonal of ``(V_B ⊗ V_A)^T diag(Delta) (V_B ⊗ V_A)``, averaged over eigenvalue clusters.

        The average over clusters of equal eigenvalues of ``A`` and of ``B`` makes the result
        independent of the (arbitrary) basis LAPACK picks inside a degenerate eigenspace. A
        truncated factor's complement (eigenvalue 0) is one extra entry, first, holding the mean over
        the complement's directions (:meth:`FactorEigen.squared_columns`), weighted by its dimension
        in the cluster averages.

        Args:
            Delta: ``(G, nB, nA)`` diagonal entries in the augmented layout.

        Returns:
            ``(G, kB', kA')`` (``k'`` = ``k`` plus 1 for a complement):
            ``d~[g, j, i] = sum_{o,k} W_B[g, o, j] W_A[g, k, i] Delta[g, o, k] / (mult_B[j] mult_A[i])``,
            cluster-averaged.
        """
        WA, mA = self.a.squared_columns()
        WB, mB = self.b.squared_columns()
        P = WB.transpose(-1, -2) @ Delta @ WA
        if self.truncated:
            P = P / (mB.unsqueeze(-1) * mA.unsqueeze(-2))
        return self._cluster_average(P)

    def project_diagonal_adjoint(self, R: Tensor) -> Tensor:
        """Adjoint of ``sum_ji mult_j mult_i f(d~_ji)`` w.r.t. ``Delta`` given ``R = f'(d~)``: ``(G, nB, nA)``.

        ``W_B CA(R) W_A^T`` with ``CA`` the weighted cluster average (a symmetric projector in the
        multiplicity-weighted inner product, which the multiplicities of the sum cancel).
        """
        WA, _ = self.a.squared_columns()
        WB, _ = self.b.squared_columns()
        return WB @ self._cluster_average(R) @ WA.transpose(-1, -2)

    def multiplicities(self) -> Tensor:
        """``(G, kB', kA')``: how many eigenvalues of ``B ⊗ A`` each entry of :meth:`project_diagonal` stands for."""
        _, mA = self.a.squared_columns()
        _, mB = self.b.squared_columns()
        return mB.unsqueeze(-1) * mA.unsqueeze(-2)

    def extended_lam(self) -> Tensor:
        """``(G, kB', kA')``: :attr:`lam` with zero rows / columns for the complements."""
        return self.b.extended_eigenvalues().unsqueeze(-1) * self.a.extended_eigenvalues().unsqueeze(-2)

    def apply_extended(self, X: Tensor, phi: Tensor) -> Tensor:
        """``f(P) X`` for an operator given on the extended entries ``(G, kB', kA')`` (constant on
        each complement): the four parts ``P_B X P_A``, ``P_B X Q_A``, ``Q_B X P_A``, ``Q_B X Q_A``
        (``P = V V^T``, ``Q = I - P``) each scaled by their entries.

        Args:
            X: ``(..., G, nB, nA)``.
            phi: ``(G, kB', kA')``.

        Returns:
            ``(..., G, nB, nA)``.
        """
        cA, cB = self.a.complement > 0, self.b.complement > 0
        VA, VB = self.VA, self.VB
        XA = X @ VA  # (..., nB, kA)
        rest_A = X - XA @ VA.transpose(-1, -2) if cA else None  # X Q_A
        phi_r = phi[..., int(cB):, int(cA):]
        out = VB @ (phi_r * (VB.transpose(-1, -2) @ XA)) @ VA.transpose(-1, -2)
        if cA:  # rows of B's eigenbasis x A's complement: phi[:, j, 0]
            out = out + VB @ (phi[..., int(cB):, :1] * (VB.transpose(-1, -2) @ rest_A))
        if cB:
            QB_XA = XA - VB @ (VB.transpose(-1, -2) @ XA)  # Q_B X V_A
            out = out + (phi[..., :1, int(cA):] * QB_XA) @ VA.transpose(-1, -2)
            if cA:
                QB_rest = rest_A - VB @ (VB.transpose(-1, -2) @ rest_A)
                out = out + phi[..., :1, :1] * QB_rest
        return out

    def _cluster_average(self, x: Tensor) -> Tensor:
        cA, cB = self.clusters()
        mA = self.a.squared_columns()[1] if self.a.complement else None
        mB = self.b.squared_columns()[1] if self.b.complement else None
        x = cluster_mean(x, *cA, mA)
        return cluster_mean(x.transpose(-1, -2), *cB, mB).transpose(-1, -2)


def _bias_complement_direction(V: Tensor) -> Tensor:
    """``q0 = e_perp / |e_perp|`` for ``e_perp = e - V V^T e`` (``e`` the last unit vector), ``(G, nA)``.

    ``e_perp`` is projected off ``V`` twice (one Gram-Schmidt pass leaves an error of order
    ``eps / |e_perp|`` along ``V`` in ``q0``; the second removes it). Where ``e`` lies in the span of
    ``V`` -- the rows' weight parts are linearly dependent, e.g. an all-zero input (dead ReLUs) gives
    the row ``[0, ..., 0, 1] = e`` itself -- ``|e_perp|`` is round-off and its direction noise: ``q0``
    is then the zero vector, which carries no bias weight (``u^2 = |e_perp|^2``, below
    ``1e-26`` there), instead of a spurious unit vector that breaks the orthogonality of
    ``[q0, V]``.
    """
    e = torch.zeros(V.shape[:-1], dtype=V.dtype, device=V.device)
    e[:, -1] = 1.0
    e_perp = e
    for _ in range(2):
        e_perp = e_perp - (V @ (V.transpose(-1, -2) @ e_perp.unsqueeze(-1))).squeeze(-1)
    norm = e_perp.norm(dim=-1, keepdim=True)
    tol = 64 * torch.finfo(V.dtype).eps * V.shape[-2] ** 0.5
    return torch.where(norm > tol, e_perp / norm.clamp_min(tol), torch.zeros_like(e_perp))
