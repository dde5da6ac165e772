"""Linear algebra of the K-FAC Laplace posterior precision ``P = s * K + diag(p)``.

``K`` is a :class:`~marglik.curvature.kron.Kron` (the K-FAC GGN/Fisher of the **summed** loss over
``num_data`` examples), ``s`` a positive scalar (the Laplace posterior uses ``s = 1 / (sigma^2 T)``)
and ``p`` the prior precision, given as

* a scalar (0-d tensor or shape ``(1,)``),
* *layerwise*: shape ``(L,)`` with one entry per parameter tensor in ``Kron.params`` (laplace-torch's
  convention: a weight and its bias are two "layers"),
* *diagonal*: shape ``(P,)`` in the ``Kron.to_dense`` ordering.

:class:`DecomposedKron` eigendecomposes every Kronecker factor **once**, after which the log
determinant costs at most ``O(P)`` -- usually far less: eigenvalue products that are tiny against
the prior are summed in closed form from prefix sums (see :class:`_KronLogdetRatio`) -- and solves
and samples a few small matrix products per block, for any ``p`` and ``s``. The log determinant is
evaluated as the ratio ``log det P - log det diag(p)`` block by block, without cancellation.
What is exact and what is approximated, per block type:

:class:`KronBlock` group ``g`` with ``K_g = B ⊗ A`` (augmented row-major layout, bias = last input
coordinate), ``A = V_A diag(l^A) V_A^T``, ``B = V_B diag(l^B) V_B^T``:

* prior constant over the block (scalar prior; layerwise prior on a weight-only or bias-only
  block): ``s B ⊗ A + d I`` has eigenvalues ``s l^A_i l^B_j + d`` -- **exact**.
* layerwise prior on a joint weight+bias block (``d_w`` on the weight, ``d_b`` on the bias):
  the prior is ``I ⊗ (d_w I + (d_b - d_w) e e^T)`` with ``e`` the bias coordinate. In ``B``'s
  eigenbasis the posterior splits into ``db`` blocks ``N_j = s l^B_j A + d_w I + c e e^T``
  (``c = d_b - d_w``) and the matrix determinant lemma gives, with ``u = V_A^T e``,
  ``r_ij = 1 / (s l^A_i l^B_j + d_w)``, ``t_j = sum_i u_i^2 (s l^A_i l^B_j + d_b) r_ij``
  (``= 1 + c u^T diag(r_j) u``, written without cancellation),
  ``log det = sum_ij log(s l^A_i l^B_j + d_w) + sum_j log t_j`` -- **exact**.
  Solves use Sherman-Morrison in the same basis.
* diagonal prior: **exact** (dense Cholesky of the ``max(da, db)``-sized block) when ``da == 1``
  or ``db == 1`` (bias-only blocks, single-output layers). Otherwise the standard K-FAC
  treatment (as in EK-FAC, George et al. 2018): the prior is replaced by its diagonal in the
  Kronecker eigenbasis, ``d~_ij = sum_{o,k} V_B[o, j]^2 V_A[k, i]^2 p[o, k]``, averaged over
  clusters of equal eigenvalues of ``A`` (index ``i``) and of ``B`` (index ``j``) so that the
  result does not depend on the basis LAPACK picks inside a degenerate eigenspace (e.g. the null
  space of a rank-deficient factor), and ``log det ~= sum_ij log(s l^A_i l^B_j + d~_ij)``. This is
  exact when ``p`` is constant over the block and, by Hadamard's inequality (and concavity of
  ``log`` for the cluster averages), never below the exact log determinant (so the log marginal
  likelihood is a lower bound of the K-FAC one). The approximation is continuous in ``p`` but
  not in the factors where eigenvalues cross. Its gradient w.r.t. ``p`` and ``s`` is
  exact; w.r.t. the factors it holds the eigenbasis fixed (the true derivative involves
  ``1 / (l_i - l_k)`` and is undefined for repeated eigenvalues), which is exact only when ``p``
  is constant over the block.

:class:`DiagonalBlock` (per-channel ``k x k`` blocks of norm layers / ``Scale`` / ``Bias``): the
posterior blocks ``s D_c + diag(p_c)`` are handled in closed form -- **exact** for every prior.

Gradients. :func:`kron_logdet` and :func:`kron_logdet_projected` are custom autograd functions
whose backward passes are closed form in the eigendecomposition, e.g. for a constant prior
``d logdet / dA = V_A diag_i(sum_j s l^B_j / (s l^A_i l^B_j + d)) V_A^T`` (likewise for ``B``)
and ``d logdet / dd = sum_ij 1 / (s l^A_i l^B_j + d)``; so back-propagation never differentiates
``eigh`` (unstable for repeated eigenvalues). The eigendecomposition is taken of the *detached*
factors; gradients reach ``A`` and ``B`` (and through them e.g. augmentation parameters when the
factors were computed with ``KFAC(differentiable=True)``). Dense and ``DiagonalBlock`` paths use
plain autograd through Cholesky / ``2 x 2`` determinants (closed-form backward, no ``eigh``).
Double backward is not supported through the custom functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from .kron import DiagonalBlock, Kron, KronBlock

__all__ = [
    "eigh_psd",
    "kron_logdet",
    "kron_logdet_projected",
    "DecomposedKron",
    "prior_structure",
    "eigen_clusters",
]


# ------------------------------------------------------------------------------------------------
# eigendecomposition
# ------------------------------------------------------------------------------------------------


def eigh_psd(M: Tensor) -> Tuple[Tensor, Tensor]:
    """Eigendecomposition of (batched) symmetric PSD matrices ``M`` of shape ``(..., d, d)``.

    Returns ``(l, V)`` with ``l`` of shape ``(..., d)`` clamped at 0 (round-off negatives of a PSD
    factor) and ``V`` of shape ``(..., d, d)``; ``M = V diag(l) V^T``. ``M`` is detached. If
    LAPACK fails to converge, the decomposition of ``M + I`` is used and 1 subtracted.
    """
    M = M.detach()
    M = 0.5 * (M + M.transpose(-1, -2))
    try:
        l, V = torch.linalg.eigh(M)
    except RuntimeError:  # pragma: no cover - convergence failure
        eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        l, V = torch.linalg.eigh(M + eye)
        l = l - 1.0
    if not (torch.isfinite(l).all() and torch.isfinite(V).all()):
        # float32 LAPACK (seen with MKL) can return NaN *without raising* on rank-deficient
        # factors (dead ReLU units give zero rows); redo those in float64.
        if not torch.isfinite(M).all():
            raise FloatingPointError("Kronecker factor contains NaN or Inf")
        l64, V64 = torch.linalg.eigh(M.double())
        l, V = l64.to(M.dtype), V64.to(M.dtype)
    return l.clamp_min(0.0), V


def _as_tensor(x: Union[float, Tensor], like: Tensor) -> Tensor:
    if torch.is_tensor(x):
        return x.to(dtype=like.dtype, device=like.device).reshape(())
    return torch.tensor(float(x), dtype=like.dtype, device=like.device)


def _sym(V: Tensor, d: Tensor) -> Tensor:
    """``V diag(d) V^T`` batched over the leading dims."""
    return (V * d.unsqueeze(-2)) @ V.transpose(-1, -2)


def eigen_clusters(l: Tensor, rtol: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Groups of (numerically) equal eigenvalues of ascending ``l`` of shape ``(G, d)``.

    Returns ``ids (G, d)`` (cluster index of each eigenvalue, clusters numbered per group) and
    ``counts (G, d)`` (the size of each eigenvalue's cluster). Two neighbours are equal when they
    differ by at most ``rtol * max(l)`` (default ``10 d eps``).
    """
    G, d = l.shape
    if rtol is None:
        rtol = 10 * d * torch.finfo(l.dtype).eps
    tol = rtol * l.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(l.dtype).tiny)
    new = torch.zeros_like(l, dtype=torch.long)
    new[:, 1:] = (l[:, 1:] - l[:, :-1] > tol).long()
    ids = new.cumsum(-1)
    size = torch.zeros_like(ids).scatter_add_(-1, ids, torch.ones_like(ids))
    return ids, size.gather(-1, ids)


def _cluster_mean(x: Tensor, ids: Tensor, counts: Tensor) -> Tensor:
    """Average ``x (..., G, m, d)`` over the eigenvalue clusters ``ids (G, d)`` of its last dim."""
    idx = ids.unsqueeze(-2).expand(x.shape)
    sums = torch.zeros_like(x).scatter_add_(-1, idx, x)
    return sums.gather(-1, idx) / counts.unsqueeze(-2).to(x.dtype)


def _project_prior(Delta: Tensor, VA: Tensor, VB: Tensor, cA, cB) -> Tensor:
    """``d~ (G, db, da)``: the diagonal of ``(V_B ⊗ V_A)^T diag(Delta) (V_B ⊗ V_A)``, averaged over
    clusters of equal eigenvalues of ``A`` and of ``B`` so that it does not depend on the (arbitrary)
    eigenbasis chosen inside a degenerate eigenspace."""
    dt = (VB * VB).transpose(-1, -2) @ Delta @ (VA * VA)
    if cA is not None:
        dt = _cluster_mean(dt, *cA)
    if cB is not None:
        dt = _cluster_mean(dt.transpose(-1, -2), *cB).transpose(-1, -2)
    return dt


# ------------------------------------------------------------------------------------------------
# custom autograd functions for the log determinant of one KronBlock
# ------------------------------------------------------------------------------------------------


class _Tails:
    """float64 prefix sums over ascending eigenvalues ``lA (G, da)`` (one row per Kronecker group).

    ``p1[m - 1, g, k] = sum_{i < k} lA[g, i]^m`` (``m = 1, 2, 3``) and, for joint weight+bias
    groups with weights ``w = u^2`` (``u`` the bias row of ``V_A``), ``pu[m, g, k] = sum_{i < k}
    w[g, i] lA[g, i]^m`` (``m = 0..3``); shape ``(., G, da + 1)``. They give the contribution of
    all entries ``x = z lA_i`` below ``tau`` of a row in ``O(1)`` through the Taylor series of
    ``log1p`` & co. (see :class:`_KronLogdetRatio`).
    """

    def __init__(self, lA: Tensor, w: Optional[Tensor] = None) -> None:
        l = lA.detach().double()
        pows = torch.stack([l, l * l, l * l * l])  # (3, G, da)
        pad = pows.new_zeros(pows.shape[:-1] + (1,))
        self.p1 = torch.cat([pad, pows.cumsum(-1)], -1)
        self.pu = None
        if w is not None:
            w = w.detach().double()
            wp = torch.cat([w.unsqueeze(0), w * pows], 0)  # (4, G, da)
            self.pu = torch.cat([wp.new_zeros(wp.shape[:-1] + (1,)), wp.cumsum(-1)], -1)

    @staticmethod
    def at(p: Tensor, k: Tensor) -> Tensor:
        """``p (n, G, da + 1)`` gathered at ``k (G, db)`` -> ``(n, G, db)``."""
        return p.gather(-1, k.unsqueeze(0).expand(p.shape[0], -1, -1))


def _bias_weights(VA: Tensor) -> Tensor:
    """``w = u^2 / sum(u^2)`` for the bias row ``u = V_A[:, -1, :]`` (normalised against round-off)."""
    u2 = VA[:, -1, :].square()
    return u2 / u2.sum(-1, keepdim=True)


class _KronLogdetRatio(torch.autograd.Function):
    """``sum_g [log det(s B_g ⊗ A_g + I ⊗ D_g) - log det(I ⊗ D_g)]``, ``D_g = d_w[g] I`` or
    ``D_g = d_w[g] I + (d_b[g] - d_w[g]) e e^T`` (``e`` the last ``A`` coordinate).

    Rows ``g`` are the groups of one Kronecker block or -- zero-padded, which adds nothing -- the
    groups of many blocks evaluated in one call (:class:`DecomposedKron` packs all blocks).

    With ``x_gji = s l^B_gj l^A_gi / d_w[g]`` the *ratio* is computed directly,
    ``sum log1p(x)`` plus, for the joint case, ``sum_gj log t'_gj`` with
    ``t'_gj = sum_i w_gi (1 + rho_g x_gji) / (1 + x_gji)`` (``rho = d_w / d_b``, ``w = u^2``), and
    so are its derivatives, e.g. ``d / d d_w = -sum x / (1 + x) / d_w``: no cancellation between
    the posterior and prior log determinants (each ``O(P log d)``), which matters in float32 for
    large layers whose curvature is small against the prior.

    Cost. Entries ``x < tau = eps^(1/3)`` (tiny curvature against the prior; typically the vast
    majority, K-FAC spectra decay fast) are summed in closed form per row ``j`` from float64
    prefix sums of ``l^A_i^m`` (:class:`_Tails`) and the cubic Taylor polynomials of ``log1p(x)``,
    ``x / (1 + x)`` etc. -- truncation error below ``eps / 4`` relative per entry, i.e. exact in
    floating point. Because both spectra are ascending, the entries ``>= tau`` of a block form a
    staircase whose bounding rectangle is evaluated densely, so one evaluation costs
    ``O(rectangle + G db log da)`` instead of ``O(G da db)``. The full array is formed only when
    the factors need gradients or ``tails`` is ``None``.

    Inputs: ``A (G, da, da)``, ``B (G, db, db)`` (or ``None`` when no factor gradient is wanted),
    ``s`` (0-d), ``d_w (G,)``, ``d_b (G,)`` (or ``None``: constant prior), the decomposition
    ``lA (G, da)`` ascending, ``VA``, ``lB (G, db)``, ``VB`` (``VA``/``VB`` only used for factor
    gradients), ``w (G, da)`` (joint case), the :class:`_Tails` of ``(lA, w)`` (or ``None``) and
    ``layout``: ``(r0, r1, na, nb)`` per packed block (rows ``r0:r1``, real sizes; ``None``: one
    block spanning all rows).
    """

    @staticmethod
    def forward(ctx, A, B, s, dw, db, lA, VA, lB, VB, w, tails, layout=None):  # noqa: D401
        rank_one = db is not None
        G, da = lA.shape
        nb = lB.shape[-1]
        dtype = lA.dtype
        cg = (s / dw).unsqueeze(-1)  # (G, 1)
        z = lB * cg  # (G, db): x_gji = z_gj lA_gi
        dense = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or tails is None
        q1 = q2 = q3 = tp = None
        if dense:
            x = (lB.unsqueeze(-1) * lA.unsqueeze(-2)) * cg.unsqueeze(-1)  # (G, db, da)
            xr = x / (1 + x)
            F = torch.log1p(x).sum()
            Wg = xr.sum((-1, -2))
            if rank_one:
                w3 = w.unsqueeze(-2)
                q1 = (w3 * xr).sum(-1)
                q2 = (w3 * xr / (1 + x)).sum(-1)
                q3 = (w3 * xr * xr).sum(-1)
                tp = (w3 * (1 + x * (dw / db)[:, None, None]) / (1 + x)).sum(-1)
            ctx.x = x
        else:
            tau = torch.finfo(dtype).eps ** (1.0 / 3.0)
            thr = torch.where(z > 0, tau / z, torch.full_like(z, float("inf")))
            k = torch.searchsorted(lA.contiguous(), thr.contiguous())  # (G, db): #entries < tau per row
            F = torch.zeros((), dtype=torch.float64, device=lA.device)
            Wg = torch.zeros(G, dtype=torch.float64, device=lA.device)
            if rank_one:
                q1, q2, q3, tp = (torch.zeros(G, nb, dtype=torch.float64, device=lA.device) for _ in range(4))
            # Explicit part: per block (rows r0:r1, real sizes na x nbb; lA left-, lB right-padded),
            # the rectangle rows j >= j0 (first row with entries >= tau) x columns i >= c0 (the
            # smallest split of those rows) is evaluated densely; the columns i < c0 of these rows
            # and all other rows go to the closed-form tail. Eigenvalues are ascending, so the
            # entries >= tau form a staircase and the rectangle is tight.
            ksplit = k.clone()
            blocks = layout if layout is not None else [(0, G, da, nb)]
            # per row: first j with entries >= tau (nb if none) and the smallest split; then per block
            expl = k < da
            first = torch.where(expl.any(-1), expl.int().argmax(-1), torch.full_like(k[:, 0], nb))
            kmin = k.min(-1).values
            if len(blocks) > 1:
                bid = torch.repeat_interleave(
                    torch.arange(len(blocks), device=k.device),
                    torch.tensor([r1 - r0 for r0, r1, _, _ in blocks], device=k.device),
                )
                j0s = torch.full((len(blocks),), nb, dtype=k.dtype, device=k.device).scatter_reduce(
                    0, bid, first, "amin")
                c0s = torch.full((len(blocks),), da, dtype=k.dtype, device=k.device).scatter_reduce(
                    0, bid, kmin, "amin")
            else:
                j0s, c0s = first.min().reshape(1), kmin.min().reshape(1)
            for (r0, r1, na, nbb), j0, c0 in zip(blocks, j0s.tolist(), c0s.tolist()):
                if j0 >= nbb:
                    continue  # no entry >= tau in this block: all in the tail
                ksplit[r0:r1, j0:nbb] = c0
                x = z[r0:r1, j0:nbb, None] * lA[r0:r1, None, c0:]  # (Gb, nj, ni)
                xr = x / (1 + x)
                F = F + torch.log1p(x).sum().double()
                Wg[r0:r1] += xr.sum((-1, -2)).double()
                if rank_one:
                    w3 = w[r0:r1, None, c0:]
                    q1[r0:r1, j0:nbb] += (w3 * xr).sum(-1).double()
                    q2[r0:r1, j0:nbb] += (w3 * xr / (1 + x)).sum(-1).double()
                    q3[r0:r1, j0:nbb] += (w3 * xr * xr).sum(-1).double()
                    rho = (dw[r0:r1] / db[r0:r1])[:, None, None]
                    tp[r0:r1, j0:nbb] += (w3 * (1 + x * rho) / (1 + x)).sum(-1).double()
            z1 = z.double()
            z2, z3 = z1 * z1, z1 * z1 * z1
            S = _Tails.at(tails.p1, ksplit)  # (3, G, db)
            F = F + (z1 * S[0] - z2 * S[1] / 2 + z3 * S[2] / 3).sum()
            Wg = Wg + (z1 * S[0] - z2 * S[1] + z3 * S[2]).sum(-1)
            if rank_one:
                Su = _Tails.at(tails.pu, ksplit)  # (4, G, db)
                q1t = z1 * Su[1] - z2 * Su[2] + z3 * Su[3]
                q1 = q1 + q1t
                q2 = q2 + z1 * Su[1] - 2 * z2 * Su[2] + 3 * z3 * Su[3]
                q3 = q3 + z2 * Su[2] - 2 * z3 * Su[3]
                tp = tp + Su[0] - (1 - (dw / db).double()).unsqueeze(-1) * q1t
            ctx.x = None
        out = F
        t = None
        if rank_one:
            out = out + tp.log().sum()
            t = tp * (db / dw).unsqueeze(-1)  # t_gj = 1 + c_g w^T diag(r_gj) 1
        ctx.rank_one = rank_one
        ctx.save_for_backward(s, dw, db if rank_one else None, lA, VA, lB, VB, w if rank_one else None)
        ctx.Wg, ctx.q, ctx.t = Wg, (q1, q2, q3), t
        return out.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        s, dw, db, lA, VA, lB, VB, w = ctx.saved_tensors
        Wg, (q1, q2, q3), t = ctx.Wg, ctx.q, ctx.t
        need = ctx.needs_input_grad
        gA = gB = gs = gdw = gdb = None
        dt = s.dtype
        Wg = Wg.to(dt)
        if ctx.rank_one:
            cc = db - dw  # (G,)
            beta = db / dw
            r2 = (q2 / t).sum(-1).to(dt)  # (G,)
        if need[2]:
            gs = Wg.sum() / s
            if ctx.rank_one:
                gs = gs - (cc * r2 / dw).sum() / s
            gs = g * gs
        if need[3]:
            gdw = -Wg / dw
            if ctx.rank_one:
                gdw = gdw + ((q3 / t).sum(-1).to(dt) + beta * r2) / dw
            gdw = g * gdw
        if ctx.rank_one and need[4]:
            gdb = -g * (q1 / t).sum(-1).to(dt) / db
        if need[0] or need[1]:
            x = ctx.x
            R = ((1 + x) * dw[:, None, None]).reciprocal()  # r_gji = 1 / (s lam + d_w)
            if ctx.rank_one:
                tt = t.to(dt)
                ccb = cc.unsqueeze(-1)
        if need[0]:
            alpha = s * (lB.unsqueeze(-1) * R).sum(-2)  # (G, da)
            M = _sym(VA, alpha)
            if ctx.rank_one:
                u = VA[:, -1, :]
                Wm = R * u.unsqueeze(-2)  # (G, db, da): rows diag(r_j) u
                bet = s * lB * ccb / tt  # (G, db)
                C = Wm.transpose(-1, -2) @ (bet.unsqueeze(-1) * Wm)  # (G, da, da)
                M = M - VA @ C @ VA.transpose(-1, -2)
            gA = g * M
        if need[1]:
            gam = (R * lA.unsqueeze(-2)).sum(-1)  # (G, db)
            if ctx.rank_one:
                u2 = VA[:, -1, :].square().unsqueeze(-2)
                gam = gam - ccb * (u2 * R * R * lA.unsqueeze(-2)).sum(-1) / tt
            gB = g * _sym(VB, s * gam)
        return gA, gB, gs, gdw, gdb, None, None, None, None, None, None, None


class _KronLogdetProjected(torch.autograd.Function):
    """``sum_{g,j,i} log(s lam_gji + d~_gji)`` with ``d~`` from :func:`_project_prior`.

    ``Delta (G, db, da)`` is the prior diagonal in the augmented layout. Gradient w.r.t. ``A``/``B``
    holds the eigenbases fixed (see the module docstring).
    """

    @staticmethod
    def forward(ctx, A, B, s, Delta, lA, VA, lB, VB, lam, cA, cB):  # noqa: D401
        den = s * lam + _project_prior(Delta, VA, VB, cA, cB)
        R = den.reciprocal()
        ctx.save_for_backward(s, lA, VA, lB, VB, lam)
        ctx.R, ctx.cA, ctx.cB = R, cA, cB
        return den.log().sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        s, lA, VA, lB, VB, lam = ctx.saved_tensors
        R = ctx.R
        need = ctx.needs_input_grad
        gA = gB = gs = gD = None
        if need[2]:
            gs = g * (lam * R).sum()
        if need[3]:
            Rm = R  # the cluster averaging is a symmetric projector: apply it to R
            if ctx.cA is not None:
                Rm = _cluster_mean(Rm, *ctx.cA)
            if ctx.cB is not None:
                Rm = _cluster_mean(Rm.transpose(-1, -2), *ctx.cB).transpose(-1, -2)
            gD = g * ((VB * VB) @ Rm @ (VA * VA).transpose(-1, -2))
        if need[0]:
            gA = g * _sym(VA, s * (lB.unsqueeze(-1) * R).sum(-2))
        if need[1]:
            gB = g * _sym(VB, s * (R * lA.unsqueeze(-2)).sum(-1))
        return gA, gB, gs, gD, None, None, None, None, None, None, None


def _decompose_pair(A: Tensor, B: Tensor):
    lA, VA = eigh_psd(A)
    lB, VB = eigh_psd(B)
    lam = lB.unsqueeze(-1) * lA.unsqueeze(-2)
    return lA, VA, lB, VB, lam


def _grouped_eig(A: Tensor, B: Tensor, eig: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]):
    """Factors with a leading group axis (added for 2-d input) and their eigendecompositions
    ``(lA, VA, lB, VB, lam)``, ``lam[g, j, i] = lB[g, j] lA[g, i]``; reuses ``eig`` when given."""
    if A.dim() == 2:
        A, B = A.unsqueeze(0), B.unsqueeze(0)
        if eig is not None:
            eig = tuple(e.unsqueeze(0) for e in eig)
    if eig is None:
        return A, B, _decompose_pair(A, B)
    lA, VA, lB, VB = eig
    return A, B, (lA, VA, lB, VB, lB.unsqueeze(-1) * lA.unsqueeze(-2))


def kron_logdet(
    A: Tensor,
    B: Tensor,
    scale: Union[float, Tensor],
    delta: Union[float, Tensor],
    delta_bias: Optional[Union[float, Tensor]] = None,
    eig: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
    log_ratio: bool = False,
) -> Tensor:
    """Exact ``sum_g log det(s B_g ⊗ A_g + I ⊗ D)`` with closed-form gradients.

    Args:
        A: ``(G, da, da)`` (or ``(da, da)``) symmetric PSD input factor.
        B: ``(G, db, db)`` (or ``(db, db)``) symmetric PSD output factor.
        scale: ``s > 0``.
        delta: prior precision ``d_w > 0`` on every coordinate (on the weight coordinates if
            ``delta_bias`` is given).
        delta_bias: prior precision of the last ``A`` coordinate (the bias of a joint block);
            ``None`` means ``D = d_w I``.
        eig: optional precomputed ``(lA, VA, lB, VB)`` of the detached factors from
            :func:`eigh_psd` (eigenvalues ascending); computed here if ``None``.
        log_ratio: return ``log det(s B ⊗ A + I ⊗ D) - log det(I ⊗ D)`` instead (computed
            without cancellation, see :class:`_KronLogdetRatio`).

    Returns a 0-d tensor, differentiable w.r.t. ``A``, ``B``, ``scale``, ``delta``, ``delta_bias``.
    """
    A, B, (lA, VA, lB, VB, lam) = _grouped_eig(A, B, eig)
    s = _as_tensor(scale, lam)
    dw = _as_tensor(delta, lam)
    db = None if delta_bias is None else _as_tensor(delta_bias, lam)
    G = lam.shape[0]
    w = _bias_weights(VA) if db is not None else None
    ratio = _KronLogdetRatio.apply(
        A, B, s, dw.expand(G), None if db is None else db.expand(G), lA, VA, lB, VB, w, _Tails(lA, w)
    )
    if not log_ratio:
        G, n_b, n_a = lam.shape
        if db is None:
            ratio = ratio + G * n_b * n_a * dw.log()
        else:
            ratio = ratio + G * n_b * ((n_a - 1) * dw.log() + db.log())
    return ratio


def kron_logdet_projected(
    A: Tensor,
    B: Tensor,
    scale: Union[float, Tensor],
    prior: Tensor,
    eig: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
) -> Tensor:
    """K-FAC approximation of ``sum_g log det(s B_g ⊗ A_g + diag(prior_g))`` (see module docstring).

    ``prior`` has shape ``(G, db, da)`` (augmented row-major layout of ``B ⊗ A``). Exact when the
    prior is constant per group; an upper bound of the exact log determinant otherwise. The
    projected prior is averaged over clusters of equal eigenvalues (of ``A`` and of ``B``), which
    makes it independent of the eigenbasis chosen inside degenerate eigenspaces (e.g. the null
    space of a rank-deficient factor); by concavity of ``log`` this keeps the upper bound.
    """
    if A.dim() == 2:
        prior = prior.reshape(1, B.shape[-1], A.shape[-1])
    A, B, (lA, VA, lB, VB, lam) = _grouped_eig(A, B, eig)
    s = _as_tensor(scale, lam)
    cA, cB = eigen_clusters(lA), eigen_clusters(lB)
    return _KronLogdetProjected.apply(A, B, s, prior.to(lam.dtype), lA, VA, lB, VB, lam, cA, cB)


# ------------------------------------------------------------------------------------------------
# prior structure
# ------------------------------------------------------------------------------------------------


def prior_structure(prior_precision: Tensor, n_layers: int, n_params: int) -> str:
    """``"scalar"``, ``"layerwise"`` or ``"diagonal"`` for a prior precision tensor, else ValueError.

    A length that matches both ``n_layers`` and ``n_params`` is read as layerwise (same diagonal).
    """
    p = prior_precision
    if p.dim() == 0 or (p.dim() == 1 and p.numel() == 1):
        return "scalar"
    if p.dim() != 1:
        raise ValueError(
            f"prior precision must be a scalar or a 1-d tensor, got shape {tuple(p.shape)}"
        )
    if p.numel() == n_layers:
        return "layerwise"
    if p.numel() == n_params:
        return "diagonal"
    raise ValueError(
        f"prior precision of length {p.numel()} matches neither the number of parameter tensors "
        f"({n_layers}, layerwise) nor the number of parameters ({n_params}, diagonal); pass a scalar, "
        f"a ({n_layers},) or a ({n_params},) tensor"
    )


# ------------------------------------------------------------------------------------------------
# decomposed Kron
# ------------------------------------------------------------------------------------------------


@dataclass
class _KronEig:
    block: KronBlock
    glob: Tensor  # (G, db, da) global indices in Kron.to_dense order
    lA: Tensor
    VA: Tensor
    lB: Tensor
    VB: Tensor
    lam: Tensor  # (G, db, da)
    iw: Optional[int]  # index of the weight in Kron.params
    ib: Optional[int]
    cA: Optional[Tuple[Tensor, Tensor]] = None  # eigenvalue clusters (diagonal-prior projection)
    cB: Optional[Tuple[Tensor, Tensor]] = None

    def clusters(self):
        if self.cA is None:
            self.cA, self.cB = eigen_clusters(self.lA), eigen_clusters(self.lB)
        return self.cA, self.cB

    @property
    def joint(self) -> bool:
        return self.iw is not None and self.ib is not None


@dataclass
class _DiagInfo:
    block: DiagonalBlock
    glob: Tensor  # (C, k)
    idx: List[int]  # indices of the present params in Kron.params


class _Pack:
    """The eigenvalues of several :class:`KronBlock` s zero-padded into one batch of rows.

    Rows are the blocks' groups; ``lA`` is padded on the left (it stays ascending, zeros add
    nothing to the log det ratio), ``lB`` on the right. ``wl`` / ``bl`` hold, per row, the index
    in ``Kron.params`` of the parameter whose (layerwise) prior applies to the weight / bias
    coordinates. One :class:`_KronLogdetRatio` call then evaluates all blocks at once.
    """

    def __init__(self, eigs: List["_KronEig"], joint: bool) -> None:
        rows = sum(e.lA.shape[0] for e in eigs)
        da = max(e.lA.shape[-1] for e in eigs)
        db = max(e.lB.shape[-1] for e in eigs)
        ref = eigs[0].lA
        self.lA = ref.new_zeros(rows, da)
        self.lB = ref.new_zeros(rows, db)
        self.w = ref.new_zeros(rows, da) if joint else None
        wl, bl = [], []
        self.layout = []
        r = 0
        for e in eigs:
            G, na, nb = e.lA.shape[0], e.lA.shape[-1], e.lB.shape[-1]
            self.layout.append((r, r + G, na, nb))
            self.lA[r : r + G, da - na :] = e.lA
            self.lB[r : r + G, :nb] = e.lB
            if joint:
                self.w[r : r + G, da - na :] = _bias_weights(e.VA)
            wl += [e.iw if e.iw is not None else e.ib] * G
            bl += [e.ib if e.ib is not None else e.iw] * G
            r += G
        self.wl = torch.tensor(wl, dtype=torch.long, device=ref.device)
        self.bl = torch.tensor(bl, dtype=torch.long, device=ref.device)
        self.tails = _Tails(self.lA, self.w)
        self.rows = rows


class DecomposedKron:
    """A :class:`Kron` with its factors eigendecomposed once, for posterior computations.

    All methods take the prior precision ``prior`` (scalar / layerwise / diagonal, see the module
    docstring) and the likelihood scale ``scale`` (``s``) and work with the posterior precision
    ``P = s * kron + diag(prior)``. Vectors are in ``kron.to_dense()`` order (length ``P``).

    Args:
        kron: the curvature. Its factors may carry an autograd graph; the decomposition uses
            detached copies, :meth:`logdet` routes gradients to the factors in closed form.
    """

    def __init__(self, kron: Kron) -> None:
        if len(kron.blocks) == 0:
            raise ValueError("the Kron has no blocks")
        self.kron = kron
        self.params = list(kron.params)
        self.n_params = kron.num_params
        self.n_layers = len(self.params)
        pos = {id(p): i for i, p in enumerate(self.params)}
        self.kron_blocks: List[_KronEig] = []
        self.diag_blocks: List[_DiagInfo] = []
        for blk in kron.blocks:
            gidx = kron.block_indices(blk)
            if isinstance(blk, KronBlock):
                G, da, db = blk.groups, blk.A.shape[-1], blk.B.shape[-1]
                glob = gidx[blk.dense_index()].reshape(G, db, da)
                lA, VA, lB, VB, lam = _decompose_pair(blk.A, blk.B)
                self.kron_blocks.append(
                    _KronEig(
                        blk, glob, lA, VA, lB, VB, lam,
                        pos[id(blk.weight)] if blk.weight is not None else None,
                        pos[id(blk.bias)] if blk.bias is not None else None,
                    )
                )
            else:
                C, k, _ = blk.blocks.shape
                self.diag_blocks.append(
                    _DiagInfo(blk, gidx.reshape(k, C).T.contiguous(), [pos[id(p)] for p in blk.params])
                )
        ref = self.kron_blocks[0].lam if self.kron_blocks else self.diag_blocks[0].block.blocks
        self.dtype, self.device = ref.dtype, ref.device
        self._packs: dict = {}
        self._layer_of = torch.cat(
            [torch.full((p.numel(),), i, dtype=torch.long) for i, p in enumerate(self.params)]
        ).to(self.device)

    # -------------------------------------------------------------------------- prior helpers
    def structure(self, prior: Tensor) -> str:
        return prior_structure(prior, self.n_layers, self.n_params)

    def prior_diagonal(self, prior: Union[float, Tensor]) -> Tensor:
        """The prior precision expanded to the ``(P,)`` diagonal."""
        prior = self._prior(prior)
        kind = self.structure(prior)
        if kind == "scalar":
            return prior.reshape(()).expand(self.n_params)
        if kind == "layerwise":
            return prior[self._layer_of]
        return prior

    def _prior(self, prior: Union[float, Tensor]) -> Tensor:
        if not torch.is_tensor(prior):
            prior = torch.tensor(float(prior))
        return prior.to(dtype=self.dtype, device=self.device)

    def exact(self, prior: Union[float, Tensor]) -> bool:
        """Whether :meth:`logdet` / :meth:`solve` / :meth:`sample` are exact for this prior."""
        kind = self.structure(self._prior(prior))
        if kind != "diagonal":
            return True
        return all(1 in (e.lam.shape[-1], e.lam.shape[-2]) for e in self.kron_blocks)

    def _block_prior(self, e: _KronEig, prior: Tensor, kind: str):
        """``("const", d)``, ``("joint", d_w, d_b)``, ``("dense", Delta)`` or ``("proj", Delta)``."""
        if kind == "scalar":
            return ("const", prior.reshape(()))
        if kind == "layerwise":
            if e.joint:
                return ("joint", prior[e.iw], prior[e.ib])
            return ("const", prior[e.iw if e.iw is not None else e.ib])
        Delta = prior[e.glob]
        if 1 in (e.lam.shape[-1], e.lam.shape[-2]):
            return ("dense", Delta)
        return ("proj", Delta)

    def _diag_prior(self, d: _DiagInfo, prior: Tensor, kind: str) -> Tensor:
        """Prior of a DiagonalBlock as ``(C, k)``."""
        C, k = d.glob.shape
        if kind == "scalar":
            return prior.reshape(1, 1).expand(C, k)
        if kind == "layerwise":
            return prior[torch.tensor(d.idx, device=prior.device)].reshape(1, k).expand(C, k)
        return prior[d.glob]

    def _check(self, prior: Union[float, Tensor], scale: Union[float, Tensor]) -> Tuple[Tensor, str, Tensor]:
        prior = self._prior(prior)
        kind = self.structure(prior)
        s = _as_tensor(scale, prior)
        return prior, kind, s

    # -------------------------------------------------------------------------- log determinant
    def logdet(self, prior: Union[float, Tensor], scale: Union[float, Tensor] = 1.0) -> Tensor:
        """``log det(s K + diag(prior))`` (0-d); exact except for the projected diagonal-prior case."""
        prior = self._prior(prior)
        return self.logdet_ratio(prior, scale) + self.prior_diagonal(prior).log().sum()

    def logdet_ratio(self, prior: Union[float, Tensor], scale: Union[float, Tensor] = 1.0) -> Tensor:
        """``log det(s K + diag(prior)) - log det(diag(prior))`` (0-d), computed blockwise as a ratio.

        Every block contributes ``log det(I + s D^{-1/2} K_b D^{-1/2})`` evaluated without forming
        the two (large, nearly cancelling) log determinants, so the value and its gradient w.r.t.
        the prior stay accurate in float32 when the curvature is small compared with the prior.
        """
        prior, kind, s = self._check(prior, scale)
        total = s.new_zeros(())
        factor_grad = any(e.block.A.requires_grad or e.block.B.requires_grad for e in self.kron_blocks)
        if kind != "diagonal" and not factor_grad and self.kron_blocks:
            # all Kronecker blocks in one or two vectorised calls
            p = prior.reshape(()).expand(self.n_layers) if kind == "scalar" else prior
            if kind == "scalar":
                groups = [("all", self.kron_blocks, False)]
            else:
                groups = [("const", [e for e in self.kron_blocks if not e.joint], False),
                          ("joint", [e for e in self.kron_blocks if e.joint], True)]
            for key, eigs, joint in groups:
                if not eigs:
                    continue
                if key not in self._packs:
                    self._packs[key] = _Pack(eigs, joint)
                pk = self._packs[key]
                total = total + _KronLogdetRatio.apply(
                    None, None, s, p[pk.wl], p[pk.bl] if joint else None, pk.lA, None, pk.lB, None, pk.w, pk.tails,
                    pk.layout,
                )
        for e in self.kron_blocks:
            bp = self._block_prior(e, prior, kind)
            blk = e.block
            G = e.lA.shape[0]
            if bp[0] in ("const", "joint") and not factor_grad:
                continue  # done above
            if bp[0] == "const":
                total = total + _KronLogdetRatio.apply(
                    blk.A, blk.B, s, bp[1].expand(G), None, e.lA, e.VA, e.lB, e.VB, None, None
                )
            elif bp[0] == "joint":
                total = total + _KronLogdetRatio.apply(
                    blk.A, blk.B, s, bp[1].expand(G), bp[2].expand(G), e.lA, e.VA, e.lB, e.VB, _bias_weights(e.VA), None
                )
            elif bp[0] == "dense":
                Delta = bp[1]
                isd = Delta.rsqrt().reshape(Delta.shape[0], -1)  # (G, p)
                K = self._dense_block(e, s, torch.zeros_like(Delta))
                M = isd.unsqueeze(-1) * K * isd.unsqueeze(-2)
                M = M + torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
                L = torch.linalg.cholesky(M)
                total = total + 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum()
            else:
                total = total + _KronLogdetProjected.apply(
                    blk.A, blk.B, s, bp[1], e.lA, e.VA, e.lB, e.VB, e.lam, *e.clusters()
                ) - bp[1].log().sum()
        for d in self.diag_blocks:
            D = d.block.blocks
            p = self._diag_prior(d, prior, kind)
            if D.shape[-1] == 1:
                total = total + torch.log1p(s * D[:, 0, 0] / p[:, 0]).sum()
            else:
                a, b, c, dd = D[:, 0, 0], D[:, 0, 1], D[:, 1, 0], D[:, 1, 1]
                pw, pb = p[:, 0], p[:, 1]
                x = s * s * (a * dd - b * c) / (pw * pb) + s * (a / pw + dd / pb)
                total = total + torch.log1p(x).sum()
        return total

    @staticmethod
    def _dense_block(e: _KronEig, s: Tensor, Delta: Tensor, detach: bool = False) -> Tensor:
        """``s B_g ⊗ A_g + diag(Delta_g)`` as ``(G, db da, db da)`` (only for small blocks)."""
        A, B = e.block.A, e.block.B
        if detach:
            A, B = A.detach(), B.detach()
        G, db, da = Delta.shape
        K = (B.unsqueeze(-1).unsqueeze(-3) * A.unsqueeze(-3).unsqueeze(-2)).reshape(G, db * da, db * da)
        return s * K + torch.diag_embed(Delta.reshape(G, db * da))

    # -------------------------------------------------------------------------- solve
    def solve(self, V: Tensor, prior: Union[float, Tensor], scale: Union[float, Tensor] = 1.0) -> Tensor:
        """``P^{-1} v`` for every row ``v`` of ``V`` of shape ``(..., P)``; returns ``(..., P)``.

        Uses the same (possibly projected) posterior as :meth:`logdet`. Not differentiated through
        the factors (the decomposition is constant); differentiable w.r.t. ``V``, ``prior``, ``scale``.
        """
        prior, kind, s = self._check(prior, scale)
        if V.shape[-1] != self.n_params:
            raise ValueError(f"expected vectors of length {self.n_params}, got shape {tuple(V.shape)}")
        lead = V.shape[:-1]
        V2 = V.reshape(-1, self.n_params).to(self.dtype)
        out = torch.zeros_like(V2)
        for e in self.kron_blocks:
            bp = self._block_prior(e, prior, kind)
            X = V2[:, e.glob]  # (n, G, db, da)
            out[:, e.glob] = self._kron_solve(e, bp, s, X)
        for d in self.diag_blocks:
            X = V2[:, d.glob]  # (n, C, k)
            out[:, d.glob] = self._diag_solve(d, self._diag_prior(d, prior, kind), s, X)
        return out.reshape(*lead, self.n_params)

    def _kron_solve(self, e: _KronEig, bp, s: Tensor, X: Tensor) -> Tensor:
        if bp[0] == "dense":
            M = self._dense_block(e, s, bp[1], detach=True)
            G, db, da = e.glob.shape
            rhs = X.reshape(X.shape[0], G, db * da).permute(1, 2, 0)  # (G, p, n)
            Y = torch.cholesky_solve(rhs, torch.linalg.cholesky(M))
            return Y.permute(2, 0, 1).reshape(X.shape)
        VA, VB = e.VA, e.VB
        Xh = VB.transpose(-1, -2) @ X @ VA  # (n, G, db, da)
        if bp[0] == "proj":
            Yh = Xh / (s * e.lam + _project_prior(bp[1], VA, VB, *e.clusters()))
        else:
            R = (s * e.lam + bp[1]).reciprocal()
            Yh = R * Xh
            if bp[0] == "joint":
                dw, db = bp[1], bp[2]
                u = VA[:, -1, :].unsqueeze(-2)  # (G, 1, da)
                t = (u * u * (s * e.lam + db) * R).sum(-1)  # (G, db)
                Ru = R * u
                proj = (Ru * Xh).sum(-1, keepdim=True)  # (n, G, db, 1)
                Yh = Yh - ((db - dw) / t).unsqueeze(-1) * Ru * proj
        return VB @ Yh @ VA.transpose(-1, -2)

    @staticmethod
    def _diag_solve(d: _DiagInfo, p: Tensor, s: Tensor, X: Tensor) -> Tensor:
        D = d.block.blocks.detach()
        if D.shape[-1] == 1:
            return X / (s * D[:, 0, 0] + p[:, 0]).unsqueeze(-1)
        a = s * D[:, 0, 0] + p[:, 0]
        b = s * D[:, 0, 1]
        c = s * D[:, 1, 0]
        dd = s * D[:, 1, 1] + p[:, 1]
        det = a * dd - b * c
        x0, x1 = X[..., 0], X[..., 1]
        return torch.stack([(dd * x0 - b * x1) / det, (a * x1 - c * x0) / det], dim=-1)

    def inv_quad(self, J: Tensor, prior: Union[float, Tensor], scale: Union[float, Tensor] = 1.0) -> Tensor:
        """``J P^{-1} J^T`` for Jacobians ``J`` of shape ``(N, K, P)``; returns ``(N, K, K)``."""
        S = self.solve(J, prior, scale)
        return J.to(S.dtype) @ S.transpose(-1, -2)

    # -------------------------------------------------------------------------- sampling
    def sample(
        self,
        n_samples: int,
        prior: Union[float, Tensor],
        scale: Union[float, Tensor] = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """``(n_samples, P)`` draws from ``N(0, P^{-1})`` (same posterior as :meth:`logdet`)."""
        prior, kind, s = self._check(prior, scale)
        prior, s = prior.detach(), s.detach()
        n = int(n_samples)
        if n < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        out = torch.zeros(n, self.n_params, dtype=self.dtype, device=self.device)

        def randn(*shape):
            return torch.randn(*shape, dtype=self.dtype, device=self.device, generator=generator)

        for e in self.kron_blocks:
            bp = self._block_prior(e, prior, kind)
            G, db, da = e.glob.shape
            Z = randn(n, G, db, da)
            if bp[0] == "dense":
                L = torch.linalg.cholesky(self._dense_block(e, s, bp[1], detach=True))
                z = Z.reshape(n, G, db * da).permute(1, 2, 0)  # (G, p, n)
                x = torch.linalg.solve_triangular(L.transpose(-1, -2), z, upper=True)
                out[:, e.glob] = x.permute(2, 0, 1).reshape(n, G, db, da)
            elif bp[0] == "joint":
                # y ~ N(0, P) from the factor square roots and the prior; then P^{-1} y ~ N(0, P^{-1})
                lr = (e.lam * s).sqrt()
                Y0 = e.VB @ (lr * Z) @ e.VA.transpose(-1, -2)
                Dm = bp[1].expand(G, db, da).clone()
                Dm[..., -1] = bp[2]
                Y0 = Y0 + Dm.sqrt() * randn(n, G, db, da)
                out[:, e.glob] = self._kron_solve(e, bp, s, Y0)
            else:
                if bp[0] == "proj":
                    den = s * e.lam + _project_prior(bp[1], e.VA, e.VB, *e.clusters())
                else:
                    den = s * e.lam + bp[1]
                out[:, e.glob] = e.VB @ (Z * den.rsqrt()) @ e.VA.transpose(-1, -2)
        for d in self.diag_blocks:
            p = self._diag_prior(d, prior, kind)
            D = d.block.blocks.detach()
            M = s * D + torch.diag_embed(p)
            L = torch.linalg.cholesky(M)  # (C, k, k)
            C, k = d.glob.shape
            z = randn(C, k, n)
            x = torch.linalg.solve_triangular(L.transpose(-1, -2), z, upper=True)  # (C, k, n)
            out[:, d.glob] = x.permute(2, 0, 1)
        return out

    def to_dense(self, prior: Union[float, Tensor], scale: Union[float, Tensor] = 1.0) -> Tensor:
        """Dense ``(P, P)`` posterior precision ``s K + diag(prior)`` (exact, for testing)."""
        prior, kind, s = self._check(prior, scale)
        return s * self.kron.to_dense() + torch.diag(self.prior_diagonal(prior))
