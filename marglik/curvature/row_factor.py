"""Kronecker factors held as their rows: ``F = R^T R`` with ``R`` of shape ``(G, m, d)``, ``m < d``.

A K-FAC factor is a sum of outer products of ``m`` rows (examples, positions, examples x classes):
K-FAC-reduce's input factor ``A = 1/N sum_n a_n a_n^T`` has ``m = N`` rows, its output factor
``B = sum_{n,k} g_nk g_nk^T`` has ``m = N K``. So its rank is at most ``m``, and when ``m`` is below
the dimension ``d`` the dense ``d x d`` factor is mostly null space. A marginal-likelihood step fits
on a few batches (``m`` = 32..1000) while the factors of a Wide ResNet are up to ``2305`` wide, so a
dense eigendecomposition (``O(d^3)``, 1 s for ``d = 2305`` on one CPU thread) does work the data does
not fill.

:class:`RowFactor` keeps the rows instead (scaled so that ``F = rows^T rows`` exactly, including the
``1 / count`` normalisation of ``A``) and :func:`eigh_rows` decomposes it exactly through a thin QR
factorisation ``R^T = Q T`` (``Q`` orthonormal ``(d, m)``, ``T`` ``(m, m)`` upper triangular): then
``F = Q (T T^T) Q^T``, and the ``m x m`` eigendecomposition ``T T^T = S diag(l) S^T`` gives ``F``'s
eigenpairs ``(l, Q S)`` on the row space; on its orthogonal complement (``d - m`` dimensions) the
eigenvalue is exactly 0. Cost ``O(d m^2 + m^3)`` instead of ``O(d^3)``. The QR (rather than the
``m x m`` Gram ``R R^T``, which is cheaper still) is the choice because ``Q S`` is orthonormal to working
precision for every row set, rank-deficient ones included (duplicated rows, rows of dead ReLUs),
where the Gram route ``R^T S l^{-1/2}`` divides by (near-)zero eigenvalues.

How the posterior algebra uses that form (the complement in closed form) is in
:mod:`marglik.curvature.eigen` and :mod:`marglik.curvature.posterior_blocks`. When to keep rows is
:func:`keep_rows`: the engine accumulates rows over batches while their number stays at most
``ROWS_MAX_FRACTION * d`` and switches to the dense sum beyond that.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .options import StrOption

__all__ = ["RowFactor", "FactorForm", "eigh_rows", "keep_rows", "ROWS_MAX_FRACTION"]

#: rows are kept while ``m <= ROWS_MAX_FRACTION * d``. The break-even of the QR route against a dense
#: ``eigh`` measured on one CPU thread (float32, ``d`` = 577 / 1153 / 2305) lies at ``m / d`` of about
#: 0.6-0.75; half leaves a margin (``scripts/bench_marglik_step.py`` records the measurement).
ROWS_MAX_FRACTION = 0.5


class FactorForm(StrOption):
    """How the engine stores a Kronecker factor (``KFAC(factor_form=...)``).

    * ``AUTO``: as rows (:class:`RowFactor`) when its rows number at most ``ROWS_MAX_FRACTION`` of
      its dimension, else dense -- chosen per factor, after every batch;
    * ``DENSE``: always the dense ``d x d`` sum (the path every peer takes; for comparisons).
    """

    AUTO = "auto"
    DENSE = "dense"


def keep_rows(num_rows: int, dim: int, form: FactorForm) -> bool:
    """Whether a factor of ``dim`` built from ``num_rows`` rows is kept as rows under ``form``."""
    return form is FactorForm.AUTO and num_rows <= ROWS_MAX_FRACTION * dim


class RowFactor:
    """A PSD Kronecker factor ``F_g = rows_g^T rows_g`` per group, held as its rows.

    Args:
        rows: ``(G, m, d)``; may carry an autograd graph (``KFAC(differentiable=True)``): the
            posterior's closed-form gradients are returned w.r.t. the rows
            (:mod:`marglik.curvature.logdet`).

    Attributes:
        rows: the rows.
    """

    def __init__(self, rows: Tensor) -> None:
        if rows.dim() != 3:
            raise ValueError(f"rows must have shape (G, m, d), got {tuple(rows.shape)}")
        self.rows = rows

    @property
    def shape(self) -> torch.Size:
        """``(G, d, d)``: the shape of the dense factor."""
        G, _, d = self.rows.shape
        return torch.Size((G, d, d))

    @property
    def num_rows(self) -> int:
        """``m``."""
        return self.rows.shape[1]

    @property
    def requires_grad(self) -> bool:
        """Whether the rows carry an autograd graph."""
        return self.rows.requires_grad

    @property
    def dtype(self) -> torch.dtype:
        """The rows' dtype."""
        return self.rows.dtype

    @property
    def device(self) -> torch.device:
        """The rows' device."""
        return self.rows.device

    def dense(self) -> Tensor:
        """The dense factor ``rows^T rows``, ``(G, d, d)`` (differentiable)."""
        return self.rows.transpose(-1, -2) @ self.rows

    def columns(self, cols: slice) -> "RowFactor":
        """The factor of a subset of the coordinates (a principal submatrix): ``rows[..., cols]``."""
        return RowFactor(self.rows[..., cols])

    def detach(self) -> "RowFactor":
        """The same factor without autograd history."""
        return RowFactor(self.rows.detach())

    def __repr__(self) -> str:
        G, m, d = self.rows.shape
        return f"RowFactor(G={G}, m={m}, d={d}, dtype={self.rows.dtype})"


def eigh_rows(rows: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Eigenpairs of ``F = rows^T rows`` on the row space, through a thin QR (module docstring).

    Args:
        rows: ``(G, m, d)`` with ``m <= d`` (detached internally).

    Returns:
        ``(l, V, RV)``: eigenvalues ``(G, m)`` ascending and clamped at 0, orthonormal eigenvectors
        ``(G, d, m)`` (``F = V diag(l) V^T``, and ``F V_perp = 0`` on the complement of ``V``), and
        ``rows @ V`` ``(G, m, m)`` (what the gradient w.r.t. the rows needs, without a ``d``-sized
        product).

    Raises:
        FloatingPointError: the rows contain NaN or Inf.
    """
    from .eigen import eigh_psd

    R = rows.detach()
    if not torch.isfinite(R).all():
        raise FloatingPointError("Kronecker factor rows contain NaN or Inf")
    Q, T = torch.linalg.qr(R.transpose(-1, -2))  # rows^T = Q T: (G, d, m), (G, m, m)
    evals, S = eigh_psd(T @ T.transpose(-1, -2))
    return evals, Q @ S, T.transpose(-1, -2) @ S  # rows V = T^T Q^T Q S


def concat_rows(a: Optional[Tensor], b: Tensor) -> Tensor:
    """Rows ``b (G, m2, d)`` appended to ``a (G, m1, d)`` (or ``b`` alone)."""
    return b if a is None else torch.cat([a, b], dim=1)
