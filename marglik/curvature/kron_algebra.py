"""Linear algebra of the K-FAC Laplace posterior precision ``P = s * K + diag(p)``.

``K`` is a :class:`~marglik.curvature.kron.Kron` (the K-FAC GGN/Fisher of the **summed** loss over
``num_data`` examples), ``s`` a positive scalar (the Laplace posterior uses ``s = 1 / (sigma^2 T)``)
and ``p`` the prior precision, given as

* a scalar (0-d tensor or shape ``(1,)``),
* *layerwise*: shape ``(L,)`` with one entry per parameter tensor in ``Kron.params`` (laplace-torch's
  convention: a weight and its bias are two "layers"),
* *diagonal*: shape ``(P,)`` in the ``Kron.to_dense`` ordering.

:class:`DecomposedKron` eigendecomposes every Kronecker factor **once**, after which the log
determinant, solves and samples cost ``O(P)`` (log det) or a few small matrix products per block
for any ``p`` and ``s``. What is exact and what is approximated, per block type:

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
  ``log det = sum_ij log(s l^A_i l^B_j + d_w) + sum_j log t_j`` -- **exact**, ``O(da db)``.
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


class _KronLogdet(torch.autograd.Function):
    """``sum_g log det(s B_g ⊗ A_g + I ⊗ D)`` with ``D = d_w I`` or ``D = d_w I + (d_b - d_w) e e^T``.

    Inputs: ``A (G, da, da)``, ``B (G, db, db)``, ``s``, ``d_w``, ``d_b`` (0-d or ``None`` for a
    constant prior), and the (constant) decomposition ``lA (G, da)``, ``VA``, ``lB (G, db)``,
    ``VB``, ``lam = lB[:, :, None] * lA[:, None, :]`` and ``u = VA[:, -1, :]``.
    """

    @staticmethod
    def forward(ctx, A, B, s, dw, db, lA, VA, lB, VB, lam, u):  # noqa: D401
        den = s * lam + dw  # (G, db, da)
        R = den.reciprocal()
        out = den.log().sum()
        rank_one = db is not None
        t = None
        if rank_one:
            u2 = (u * u).unsqueeze(-2)  # (G, 1, da)
            t = (u2 * (s * lam + db) * R).sum(-1)  # (G, db)
            out = out + t.log().sum()
        ctx.rank_one = rank_one
        ctx.save_for_backward(s, dw, db if rank_one else None, lA, VA, lB, VB, lam, u if rank_one else None)
        ctx.R, ctx.t = R, t
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        s, dw, db, lA, VA, lB, VB, lam, u = ctx.saved_tensors
        R, t = ctx.R, ctx.t
        need = ctx.needs_input_grad
        gA = gB = gs = gdw = gdb = None
        if ctx.rank_one:
            c = db - dw
            u2 = (u * u).unsqueeze(-2)  # (G, 1, da)
            u2R = u2 * R
            q = u2R.sum(-1)  # (G, db): e^T M_j^{-1} e
            u2R2 = u2R * R
        if need[2]:
            gs = (lam * R).sum()
            if ctx.rank_one:
                gs = gs - (c * (u2R2 * lam).sum(-1) / t).sum()
            gs = g * gs
        if need[3]:
            gdw = R.sum()
            if ctx.rank_one:
                gdw = gdw - ((q + c * u2R2.sum(-1)) / t).sum()
            gdw = g * gdw
        if ctx.rank_one and need[4]:
            gdb = g * (q / t).sum()
        if need[0]:
            alpha = s * (lB.unsqueeze(-1) * R).sum(-2)  # (G, da)
            M = _sym(VA, alpha)
            if ctx.rank_one:
                W = R * u.unsqueeze(-2)  # (G, db, da): rows diag(r_j) u
                beta = s * lB * c / t  # (G, db)
                C = W.transpose(-1, -2) @ (beta.unsqueeze(-1) * W)  # (G, da, da)
                M = M - VA @ C @ VA.transpose(-1, -2)
            gA = g * M
        if need[1]:
            gam = (R * lA.unsqueeze(-2)).sum(-1)  # (G, db)
            if ctx.rank_one:
                gam = gam - c * (u2R2 * lA.unsqueeze(-2)).sum(-1) / t
            gB = g * _sym(VB, s * gam)
        return gA, gB, gs, gdw, gdb, None, None, None, None, None, None


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


def kron_logdet(
    A: Tensor,
    B: Tensor,
    scale: Union[float, Tensor],
    delta: Union[float, Tensor],
    delta_bias: Optional[Union[float, Tensor]] = None,
    eig: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
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
        eig: optional precomputed ``(lA, VA, lB, VB)`` of the detached factors (see
            :func:`eigh_psd`); computed here if ``None``.

    Returns a 0-d tensor, differentiable w.r.t. ``A``, ``B``, ``scale``, ``delta``, ``delta_bias``.
    """
    if A.dim() == 2:
        A, B = A.unsqueeze(0), B.unsqueeze(0)
        if eig is not None:
            eig = tuple(e.unsqueeze(0) for e in eig)
    if eig is None:
        lA, VA, lB, VB, lam = _decompose_pair(A, B)
    else:
        lA, VA, lB, VB = eig
        lam = lB.unsqueeze(-1) * lA.unsqueeze(-2)
    s = _as_tensor(scale, lam)
    dw = _as_tensor(delta, lam)
    db = None if delta_bias is None else _as_tensor(delta_bias, lam)
    u = VA[:, -1, :] if db is not None else None
    return _KronLogdet.apply(A, B, s, dw, db, lA, VA, lB, VB, lam, u)


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
        A, B = A.unsqueeze(0), B.unsqueeze(0)
        prior = prior.reshape(1, B.shape[-1], A.shape[-1])
        if eig is not None:
            eig = tuple(e.unsqueeze(0) for e in eig)
    if eig is None:
        lA, VA, lB, VB, lam = _decompose_pair(A, B)
    else:
        lA, VA, lB, VB = eig
        lam = lB.unsqueeze(-1) * lA.unsqueeze(-2)
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
        prior, kind, s = self._check(prior, scale)
        total = s.new_zeros(())
        for e in self.kron_blocks:
            bp = self._block_prior(e, prior, kind)
            blk = e.block
            if bp[0] == "const":
                total = total + _KronLogdet.apply(
                    blk.A, blk.B, s, bp[1], None, e.lA, e.VA, e.lB, e.VB, e.lam, None
                )
            elif bp[0] == "joint":
                total = total + _KronLogdet.apply(
                    blk.A, blk.B, s, bp[1], bp[2], e.lA, e.VA, e.lB, e.VB, e.lam, e.VA[:, -1, :]
                )
            elif bp[0] == "dense":
                L = torch.linalg.cholesky(self._dense_block(e, s, bp[1]))
                total = total + 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum()
            else:
                total = total + _KronLogdetProjected.apply(
                    blk.A, blk.B, s, bp[1], e.lA, e.VA, e.lB, e.VB, e.lam, *e.clusters()
                )
        for d in self.diag_blocks:
            D = d.block.blocks
            p = self._diag_prior(d, prior, kind)
            if D.shape[-1] == 1:
                total = total + (s * D[:, 0, 0] + p[:, 0]).log().sum()
            else:
                a, b, c, dd = D[:, 0, 0], D[:, 0, 1], D[:, 1, 0], D[:, 1, 1]
                pw, pb = p[:, 0], p[:, 1]
                det = s * s * (a * dd - b * c) + s * (a * pb + dd * pw) + pw * pb
                total = total + det.log().sum()
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
