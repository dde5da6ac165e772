"""Eigendecompositions of Kronecker factors, and operations in a Kronecker eigenbasis.

A :class:`~marglik.curvature.kron.KronBlock` holds, per group ``g``, factors ``A_g`` (``nA x nA``,
input side, bias = last coordinate) and ``B_g`` (``nB x nB``, output side) whose Kronecker product
``B_g ⊗ A_g`` acts on the augmented weight matrix ``[W_g, b_g]`` of shape ``(nB, nA)`` flattened
row-major. With ``A = V_A diag(l^A) V_A^T`` and ``B = V_B diag(l^B) V_B^T`` the product has the
eigenvectors ``V_B ⊗ V_A`` and the eigenvalues ``lam[g, j, i] = l^B_gj l^A_gi``; in matrix form a
vector ``X (nB, nA)`` has the eigen-coordinates ``V_B^T X V_A`` (:meth:`KronEigen.to_eigenbasis`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["eigh_psd", "eigen_clusters", "cluster_mean", "sym_from_eigen", "KronEigen"]

Clusters = Tuple[Tensor, Tensor]


def eigh_psd(M: Tensor) -> Tuple[Tensor, Tensor]:
    """Eigendecomposition of (batched) symmetric positive semi-definite matrices.

    ``M`` is detached and symmetrised first. If LAPACK fails to converge, the decomposition of
    ``M + I`` is used and 1 subtracted; if it returns NaN without raising (float32 LAPACK on
    rank-deficient factors, seen with MKL), the decomposition is redone in float64.

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
    if not (torch.isfinite(lam).all() and torch.isfinite(V).all()):
        if not torch.isfinite(M).all():
            raise FloatingPointError("Kronecker factor contains NaN or Inf")
        l64, V64 = torch.linalg.eigh(M.double())
        lam, V = l64.to(M.dtype), V64.to(M.dtype)
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


def cluster_mean(x: Tensor, ids: Tensor, counts: Tensor) -> Tensor:
    """Average ``x`` over clusters of its last dimension (a symmetric projector).

    Args:
        x: ``(..., G, m, d)``.
        ids: ``(G, d)`` cluster indices from :func:`eigen_clusters`.
        counts: ``(G, d)`` cluster sizes from :func:`eigen_clusters`.

    Returns:
        ``x`` with every entry replaced by the mean over its cluster, same shape.
    """
    idx = ids.unsqueeze(-2).expand(x.shape)
    sums = torch.zeros_like(x).scatter_add_(-1, idx, x)
    return sums.gather(-1, idx) / counts.unsqueeze(-2).to(x.dtype)


@dataclass
class KronEigen:
    """Eigendecomposition of a grouped Kronecker product ``B_g ⊗ A_g`` (factors detached).

    Attributes:
        lA: ``(G, nA)`` eigenvalues of ``A``, ascending.
        VA: ``(G, nA, nA)`` eigenvectors of ``A`` (columns).
        lB: ``(G, nB)`` eigenvalues of ``B``, ascending.
        VB: ``(G, nB, nB)`` eigenvectors of ``B``.
        lam: ``(G, nB, nA)`` eigenvalues of the product, ``lam[g, j, i] = lB[g, j] lA[g, i]``.
    """

    lA: Tensor
    VA: Tensor
    lB: Tensor
    VB: Tensor
    lam: Tensor
    _clusters: Optional[Tuple[Clusters, Clusters]] = field(default=None, repr=False, compare=False)

    @classmethod
    def decompose(cls, A: Tensor, B: Tensor) -> "KronEigen":
        """Decompose ``(G, nA, nA)`` and ``(G, nB, nB)`` factors with :func:`eigh_psd`."""
        lA, VA = eigh_psd(A)
        lB, VB = eigh_psd(B)
        return cls.from_decompositions(lA, VA, lB, VB)

    @classmethod
    def from_decompositions(cls, lA: Tensor, VA: Tensor, lB: Tensor, VB: Tensor) -> "KronEigen":
        """Wrap precomputed factor decompositions (eigenvalues ascending)."""
        return cls(lA, VA, lB, VB, lB.unsqueeze(-1) * lA.unsqueeze(-2))

    @property
    def shape(self) -> torch.Size:
        """``(G, nB, nA)``: groups, output and input (augmented) dimension."""
        return self.lam.shape

    def clusters(self) -> Tuple[Clusters, Clusters]:
        """The :func:`eigen_clusters` of ``lA`` and of ``lB`` (computed once)."""
        if self._clusters is None:
            self._clusters = (eigen_clusters(self.lA), eigen_clusters(self.lB))
        return self._clusters

    def bias_weights(self) -> Tensor:
        """``(G, nA)``: ``w = u^2 / sum(u^2)`` for the bias row ``u = V_A[:, -1, :]``.

        ``w_i`` is the weight of eigenvector ``i`` of ``A`` on the bias coordinate; the sum is 1
        up to round-off, against which it is normalised.
        """
        u2 = self.VA[:, -1, :].square()
        return u2 / u2.sum(-1, keepdim=True)

    def to_eigenbasis(self, X: Tensor) -> Tensor:
        """``V_B^T X V_A`` for ``X`` of shape ``(..., G, nB, nA)``."""
        return self.VB.transpose(-1, -2) @ X @ self.VA

    def from_eigenbasis(self, Y: Tensor) -> Tensor:
        """``V_B Y V_A^T`` for ``Y`` of shape ``(..., G, nB, nA)`` (inverse of :meth:`to_eigenbasis`)."""
        return self.VB @ Y @ self.VA.transpose(-1, -2)

    def project_diagonal(self, Delta: Tensor) -> Tensor:
        """Diagonal of ``(V_B ⊗ V_A)^T diag(Delta) (V_B ⊗ V_A)``, averaged over eigenvalue clusters.

        The average over clusters of equal eigenvalues of ``A`` and of ``B`` makes the result
        independent of the (arbitrary) basis LAPACK picks inside a degenerate eigenspace.

        Args:
            Delta: ``(G, nB, nA)`` diagonal entries in the augmented layout.

        Returns:
            ``(G, nB, nA)``: ``d~[g, j, i] = sum_{o,k} V_B[g, o, j]^2 V_A[g, k, i]^2 Delta[g, o, k]``,
            cluster-averaged.
        """
        return self._cluster_average((self.VB * self.VB).transpose(-1, -2) @ Delta @ (self.VA * self.VA))

    def project_diagonal_adjoint(self, R: Tensor) -> Tensor:
        """Adjoint of :meth:`project_diagonal`: maps ``(G, nB, nA)`` eigen-coordinates back.

        Used for the gradient of a function of the projected diagonal w.r.t. ``Delta``.
        """
        return (self.VB * self.VB) @ self._cluster_average(R) @ (self.VA * self.VA).transpose(-1, -2)

    def _cluster_average(self, x: Tensor) -> Tensor:
        cA, cB = self.clusters()
        x = cluster_mean(x, *cA)
        return cluster_mean(x.transpose(-1, -2), *cB).transpose(-1, -2)
