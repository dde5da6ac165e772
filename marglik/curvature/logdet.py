"""Log determinants of Kronecker-factored posterior blocks, with closed-form gradients.

For one :class:`~marglik.curvature.kron.KronBlock` group with factors ``A`` (``nA x nA``) and
``B`` (``nB x nB``), decomposition ``lA, V_A, lB, V_B`` (:class:`~marglik.curvature.eigen.KronEigen`,
``lam_ji = lB_j lA_i``), likelihood scale ``s`` and a diagonal prior ``D``:

* :func:`kron_logdet` / :class:`KronLogdetRatio`: ``D = delta_w I`` (constant prior), or
  ``D = delta_w I + (delta_b - delta_w) e e^T`` on every output row (``e`` the bias coordinate:
  a weight prior ``delta_w`` and a bias prior ``delta_b``). Exact, by the eigenvalues
  ``s lam + delta_w`` and the matrix determinant lemma (see :class:`KronLogdetRatio`).
* :func:`kron_logdet_projected` / :class:`KronLogdetProjected`: any diagonal ``D``, replaced by the
  diagonal of its projection onto the Kronecker eigenbasis (the K-FAC approximation, see
  :meth:`~marglik.curvature.eigen.KronEigen.project_diagonal`).

Gradients. The backward passes are closed form in the eigendecomposition, e.g. for a constant
prior ``d logdet / dA = V_A diag_i(sum_j s lB_j / (s lam_ji + delta)) V_A^T`` (likewise for ``B``)
and ``d logdet / d delta = sum_ji 1 / (s lam_ji + delta)``; so back-propagation never
differentiates ``eigh`` (unstable for repeated eigenvalues). The eigendecomposition is taken of the
*detached* factors; gradients reach ``A`` and ``B`` (and through them e.g. augmentation parameters
when the factors were computed with ``KFAC(differentiable=True)``). For the projected prior the
factor gradient holds the eigenbasis fixed (the true derivative involves ``1 / (l_i - l_k)``, undefined
for repeated eigenvalues), which is exact only when the prior is constant over the block. Double
backward is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from .eigen import FactorEigen, KronEigen

__all__ = ["kron_logdet", "kron_logdet_projected", "KronLogdetRatio", "KronLogdetProjected", "KronSpectrum",
           "PrefixSums", "as_scalar"]

#: rows ``r0:r1`` of a packed batch and the real sizes ``(nA, nB)`` of the block they hold
BlockRows = Tuple[int, int, int, int]


def as_scalar(x: Union[float, Tensor], like: Tensor) -> Tensor:
    """A float or one-element tensor as a 0-d tensor with ``like``'s dtype and device."""
    if torch.is_tensor(x):
        return x.to(dtype=like.dtype, device=like.device).reshape(())
    return torch.tensor(float(x), dtype=like.dtype, device=like.device)


class PrefixSums:
    """float64 prefix sums of powers of ascending eigenvalues ``lA`` (one row per group).

    ``powers[m - 1, g, k] = sum_{i < k} lA[g, i]^m`` (``m = 1, 2, 3``) and, with bias weights ``w``
    (:meth:`KronEigen.bias_weights`), ``weighted[m, g, k] = sum_{i < k} w[g, i] lA[g, i]^m``
    (``m = 0..3``); shape ``(., G, nA + 1)``. They give the contribution of all entries
    ``x = z lA_i`` below a threshold of a row in ``O(1)`` through the Taylor series of ``log1p``
    and its relatives (see :class:`KronLogdetRatio`).
    """

    def __init__(self, lA: Tensor, w: Optional[Tensor] = None) -> None:
        lam = lA.detach().double()
        pows = torch.stack([lam, lam * lam, lam * lam * lam])  # (3, G, nA)
        pad = pows.new_zeros(pows.shape[:-1] + (1,))
        self.powers = torch.cat([pad, pows.cumsum(-1)], -1)
        self.weighted: Optional[Tensor] = None
        if w is not None:
            w = w.detach().double()
            wp = torch.cat([w.unsqueeze(0), w * pows], 0)  # (4, G, nA)
            self.weighted = torch.cat([wp.new_zeros(wp.shape[:-1] + (1,)), wp.cumsum(-1)], -1)

    @staticmethod
    def at(p: Tensor, k: Tensor) -> Tensor:
        """``p (n, G, nA + 1)`` gathered at the counts ``k (G, nB)``; returns ``(n, G, nB)``."""
        return p.gather(-1, k.unsqueeze(0).expand(p.shape[0], -1, -1))


@dataclass
class KronSpectrum:
    """The non-differentiable input of :class:`KronLogdetRatio`: ``G`` rows of eigenvalues.

    The eigenvalues are those a :class:`~marglik.curvature.eigen.KronEigen` holds: all of a dense
    factor's, or those on the row space of a factor held as rows (with, for the weight-and-bias
    prior, the zero eigenvalue of the bias direction ``q0``, :meth:`KronEigen.bias_spectrum`). Every
    other eigenvalue of ``B ⊗ A`` is 0 and adds nothing to the log det ratio (``log1p(0) = 0``) nor
    to its gradients.

    Attributes:
        lA: ``(G, kA)`` eigenvalues of ``A``, ascending.
        lB: ``(G, kB)`` eigenvalues of ``B``.
        VA: ``(G, nA, kA)`` eigenvectors of ``A``; needed only for factor gradients.
        VB: ``(G, nB, kB)`` eigenvectors of ``B``; needed only for factor gradients.
        bias_weights: ``(G, kA)`` bias weights (weight-and-bias prior only).
        prefix_sums: :class:`PrefixSums` of ``(lA, bias_weights)``; ``None`` evaluates every
            eigenvalue product explicitly.
        layout: :data:`BlockRows` of each block when rows of several blocks are packed
            (zero-padded) together; ``None``: one block over all rows.
        rows_VA: ``rows @ VA`` when ``A`` is held as rows (the factor gradient then goes to the rows,
            :meth:`~marglik.curvature.eigen.FactorEigen.grad`); ``None`` for a dense ``A``.
        rows_VB: likewise for ``B``.
    """

    lA: Tensor
    lB: Tensor
    VA: Optional[Tensor] = None
    VB: Optional[Tensor] = None
    bias_weights: Optional[Tensor] = None
    prefix_sums: Optional[PrefixSums] = None
    layout: Optional[List[BlockRows]] = None
    rows_VA: Optional[Tensor] = None
    rows_VB: Optional[Tensor] = None

    @classmethod
    def of(cls, eig: KronEigen, weight_and_bias: bool, prefix_sums: bool) -> "KronSpectrum":
        """The spectrum of one decomposed block (with its eigenvectors, for factor gradients)."""
        if weight_and_bias:
            lA, VA, w, rows_VA = eig.bias_spectrum()
        else:
            lA, VA, w, rows_VA = eig.a.evals, eig.a.V, None, eig.a.rows_V
        return cls(lA, eig.lB, VA, eig.VB, w, PrefixSums(lA, w) if prefix_sums else None,
                   rows_VA=rows_VA, rows_VB=eig.b.rows_V)


@dataclass
class _RatioSums:
    """Sums over the entries ``x_gji = s lam_gji / delta_w[g]`` that the log det ratio and its
    gradients need (the ``q`` and ``t'`` only with a bias prior, weights ``w`` and
    ``rho = delta_w / delta_b``)."""

    log1p: Tensor  #: 0-d, ``sum log1p(x)``
    frac: Tensor  #: ``(G,)``, ``sum_ji x / (1 + x)``
    q1: Optional[Tensor] = None  #: ``(G, nB)``, ``sum_i w x / (1 + x)``
    q2: Optional[Tensor] = None  #: ``sum_i w x / (1 + x)^2``
    q3: Optional[Tensor] = None  #: ``sum_i w (x / (1 + x))^2``
    tprime: Optional[Tensor] = None  #: ``sum_i w (1 + rho x) / (1 + x)``

    def add_(self, other: "_RatioSums", rows: slice, cols: slice) -> None:
        """Add ``other`` (of rows ``rows`` and output indices ``cols``) in float64."""
        self.log1p = self.log1p + other.log1p.double()
        self.frac[rows] += other.frac.double()
        if other.q1 is not None:
            self.q1[rows, cols] += other.q1.double()
            self.q2[rows, cols] += other.q2.double()
            self.q3[rows, cols] += other.q3.double()
            self.tprime[rows, cols] += other.tprime.double()


def _entry_sums(x: Tensor, w: Optional[Tensor], rho: Optional[Tensor]) -> _RatioSums:
    """:class:`_RatioSums` of an explicit array ``x (G, nj, ni)`` with bias weights ``w (G, ni)``."""
    xr = x / (1 + x)
    sums = _RatioSums(torch.log1p(x).sum(), xr.sum((-1, -2)))
    if w is not None:
        w3 = w.unsqueeze(-2)
        sums.q1 = (w3 * xr).sum(-1)
        sums.q2 = (w3 * xr / (1 + x)).sum(-1)
        sums.q3 = (w3 * xr * xr).sum(-1)
        sums.tprime = (w3 * (1 + x * rho[:, None, None]) / (1 + x)).sum(-1)
    return sums


def _staircase_sums(z: Tensor, spec: KronSpectrum, rho: Optional[Tensor]) -> _RatioSums:
    """:class:`_RatioSums` of ``x_gji = z_gj lA_gi`` with the small entries summed in closed form.

    Entries ``x < tau = eps^(1/3)`` are summed per row ``j`` from :class:`PrefixSums` and the cubic
    Taylor polynomials (truncation error below ``eps / 4`` relative per entry). Both spectra are
    ascending, so the entries ``>= tau`` of a block form a staircase: its bounding rectangle (rows
    ``j >= j0``, the first row with an entry ``>= tau``, x columns ``i >= c0``, the smallest split of
    those rows) is evaluated explicitly, everything else goes to the tail.
    """
    lA, w, prefix = spec.lA, spec.bias_weights, spec.prefix_sums
    G, nA = lA.shape
    nB = z.shape[-1]
    dev = lA.device
    tau = torch.finfo(lA.dtype).eps ** (1.0 / 3.0)
    thr = torch.where(z > 0, tau / z, torch.full_like(z, float("inf")))
    k = torch.searchsorted(lA.contiguous(), thr.contiguous())  # (G, nB): number of entries < tau per row
    f64 = dict(dtype=torch.float64, device=dev)
    sums = _RatioSums(torch.zeros((), **f64), torch.zeros(G, **f64))
    if w is not None:
        sums.q1, sums.q2, sums.q3, sums.tprime = (torch.zeros(G, nB, **f64) for _ in range(4))
    split = k.clone()  # per row: the explicit part starts at column split
    blocks = spec.layout if spec.layout is not None else [(0, G, nA, nB)]
    has_explicit = k < nA
    first_row = torch.where(has_explicit.any(-1), has_explicit.int().argmax(-1), torch.full_like(k[:, 0], nB))
    min_split = k.min(-1).values
    if len(blocks) > 1:
        block_of_row = torch.repeat_interleave(
            torch.arange(len(blocks), device=dev), torch.tensor([r1 - r0 for r0, r1, _, _ in blocks], device=dev)
        )
        j0s = torch.full((len(blocks),), nB, dtype=k.dtype, device=dev).scatter_reduce(
            0, block_of_row, first_row, "amin")
        c0s = torch.full((len(blocks),), nA, dtype=k.dtype, device=dev).scatter_reduce(
            0, block_of_row, min_split, "amin")
    else:
        j0s, c0s = first_row.min().reshape(1), min_split.min().reshape(1)
    for (r0, r1, _, nb), j0, c0 in zip(blocks, j0s.tolist(), c0s.tolist()):
        if j0 >= nb:
            continue  # no entry >= tau in this block: all in the tail
        split[r0:r1, j0:nb] = c0
        x = z[r0:r1, j0:nb, None] * lA[r0:r1, None, c0:]  # (rows, nj, ni)
        sums.add_(_entry_sums(x, None if w is None else w[r0:r1, c0:], None if rho is None else rho[r0:r1]),
                  slice(r0, r1), slice(j0, nb))
    z1 = z.double()
    z2, z3 = z1 * z1, z1 * z1 * z1
    S = PrefixSums.at(prefix.powers, split)  # (3, G, nB)
    sums.log1p = sums.log1p + (z1 * S[0] - z2 * S[1] / 2 + z3 * S[2] / 3).sum()
    sums.frac = sums.frac + (z1 * S[0] - z2 * S[1] + z3 * S[2]).sum(-1)
    if w is not None:
        Su = PrefixSums.at(prefix.weighted, split)  # (4, G, nB)
        q1_tail = z1 * Su[1] - z2 * Su[2] + z3 * Su[3]
        sums.q1 = sums.q1 + q1_tail
        sums.q2 = sums.q2 + z1 * Su[1] - 2 * z2 * Su[2] + 3 * z3 * Su[3]
        sums.q3 = sums.q3 + z2 * Su[2] - 2 * z3 * Su[3]
        sums.tprime = sums.tprime + Su[0] - (1 - rho.double()).unsqueeze(-1) * q1_tail
    return sums


class KronLogdetRatio(torch.autograd.Function):
    """``sum_g [log det(s B_g ⊗ A_g + I ⊗ D_g) - log det(I ⊗ D_g)]`` with closed-form gradients.

    ``D_g = delta_w[g] I``, or ``D_g = delta_w[g] I + (delta_b[g] - delta_w[g]) e e^T`` (``e`` the last
    ``A`` coordinate, the bias). Rows ``g`` are the groups of one Kronecker block or -- zero-padded,
    which adds nothing -- the groups of several blocks evaluated in one call.

    With ``x_gji = s lB_gj lA_gi / delta_w[g]`` the *ratio* is computed directly: ``sum log1p(x)``
    plus, with a bias prior, ``sum_gj log t'_gj``, ``t'_gj = sum_i w_gi (1 + rho_g x_gji) / (1 + x_gji)``
    (``rho = delta_w / delta_b``, ``w`` the bias weights): by the matrix determinant lemma in ``B``'s
    eigenbasis, ``log det(s lB_j A + D) = sum_i log(s lB_j lA_i + delta_w) + log t_j`` with
    ``t_j = 1 + (delta_b - delta_w) u^T diag(1 / (s lB_j lA + delta_w)) u = t'_j delta_b / delta_w``
    (``u`` the bias row of ``V_A``, ``w = u^2``), written without cancellation. The derivatives
    are likewise ratios, e.g. ``d / d delta_w = -sum x / (1 + x) / delta_w``: nothing cancels between
    the posterior and prior log determinants (each ``O(P log d)``), which matters in float32 for
    large layers whose curvature is small against the prior.

    Cost. With :class:`PrefixSums` in the spectrum, the entries that are tiny against the prior
    (typically the vast majority, K-FAC spectra decay fast) are summed in closed form, so one
    evaluation costs ``O(explicit rectangle + G nB log nA)`` instead of ``O(G nA nB)``. The full
    array is formed when a factor needs a gradient or the spectrum has no prefix sums.

    ``apply(A, B, scale, delta_w, delta_b, spectrum)``:

    Args:
        A: ``(G, nA, nA)`` input factors, or ``None`` (no factor gradient wanted).
        B: ``(G, nB, nB)`` output factors, or ``None``.
        scale: ``s``, 0-d.
        delta_w: ``(G,)`` prior precision of every (weight) coordinate.
        delta_b: ``(G,)`` prior precision of the bias coordinate, or ``None`` (constant prior).
        spectrum: :class:`KronSpectrum` of the rows (with ``bias_weights`` when ``delta_b`` is given,
            with ``VA`` / ``VB`` when ``A`` / ``B`` need gradients).

    Returns:
        0-d tensor in the eigenvalues' dtype.
    """

    @staticmethod
    def forward(ctx, A, B, scale, delta_w, delta_b, spectrum: KronSpectrum):  # noqa: D401
        lA, lB = spectrum.lA, spectrum.lB
        w = spectrum.bias_weights
        with_bias = delta_b is not None
        s_over_dw = (scale / delta_w).unsqueeze(-1)  # (G, 1)
        rho = delta_w / delta_b if with_bias else None
        explicit = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or spectrum.prefix_sums is None
        if explicit:
            x = (lB.unsqueeze(-1) * lA.unsqueeze(-2)) * s_over_dw.unsqueeze(-1)  # (G, nB, nA)
            sums = _entry_sums(x, w, rho)
            ctx.x = x
        else:
            sums = _staircase_sums(lB * s_over_dw, spectrum, rho)  # x_gji = z_gj lA_gi
            ctx.x = None
        out = sums.log1p
        t = None
        if with_bias:
            out = out + sums.tprime.log().sum()
            t = sums.tprime * (delta_b / delta_w).unsqueeze(-1)  # t_gj = 1 + c_g w^T diag(r_gj) 1
        ctx.with_bias = with_bias
        ctx.spectrum = spectrum
        ctx.save_for_backward(scale, delta_w, delta_b, lA, spectrum.VA, lB, spectrum.VB, w)
        ctx.sums, ctx.t = sums, t
        return out.to(lA.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        s, dw, db, lA, VA, lB, VB, w = ctx.saved_tensors
        spectrum = ctx.spectrum
        sums, t = ctx.sums, ctx.t
        need = ctx.needs_input_grad
        gA = gB = gs = gdw = gdb = None
        dt = s.dtype
        frac = sums.frac.to(dt)
        if ctx.with_bias:
            c = db - dw  # (G,)
            r2 = (sums.q2 / t).sum(-1).to(dt)  # (G,)
        if need[2]:
            gs = frac.sum() / s
            if ctx.with_bias:
                gs = gs - (c * r2 / dw).sum() / s
            gs = g * gs
        if need[3]:
            gdw = -frac / dw
            if ctx.with_bias:
                gdw = gdw + ((sums.q3 / t).sum(-1).to(dt) + db / dw * r2) / dw
            gdw = g * gdw
        if ctx.with_bias and need[4]:
            gdb = -g * (sums.q1 / t).sum(-1).to(dt) / db
        if need[0] or need[1]:
            R = ((1 + ctx.x) * dw[:, None, None]).reciprocal()  # r_gji = 1 / (s lam + delta_w)
            if ctx.with_bias:
                t_dt = t.to(dt)
                c_col = c.unsqueeze(-1)
        if need[0]:
            M = s * (lB.unsqueeze(-1) * R).sum(-2)  # (G, kA): diag(alpha)
            if ctx.with_bias:
                u = VA[:, -1, :]
                Wm = R * u.unsqueeze(-2)  # (G, kB, kA): rows diag(r_j) u
                bet = s * lB * c_col / t_dt  # (G, kB)
                C = Wm.transpose(-1, -2) @ (bet.unsqueeze(-1) * Wm)  # (G, kA, kA)
                M = torch.diag_embed(M) - C
            gA = g * FactorEigen(lA, VA, spectrum.rows_VA).grad(M)
        if need[1]:
            gam = (R * lA.unsqueeze(-2)).sum(-1)  # (G, kB)
            if ctx.with_bias:
                u2 = VA[:, -1, :].square().unsqueeze(-2)
                gam = gam - c_col * (u2 * R * R * lA.unsqueeze(-2)).sum(-1) / t_dt
            gB = g * FactorEigen(lB, VB, spectrum.rows_VB).grad(s * gam)
        return gA, gB, gs, gdw, gdb, None


class KronLogdetProjected(torch.autograd.Function):
    """``sum_{g,j,i} log(s lam_gji + d~_gji)``, ``d~`` the projected prior diagonal.

    ``apply(A, B, scale, Delta, eig)``:

    Args:
        A: ``(G, nA, nA)`` input factors (or ``None``).
        B: ``(G, nB, nB)`` output factors (or ``None``).
        scale: ``s``, 0-d.
        Delta: ``(G, nB, nA)`` prior diagonal in the augmented layout.
        eig: :class:`KronEigen` of the detached factors.

    Returns:
        0-d tensor. The gradient w.r.t. ``A`` / ``B`` holds the eigenbases fixed.
    """

    @staticmethod
    def forward(ctx, A, B, scale, Delta, eig: KronEigen):  # noqa: D401
        den = scale * eig.extended_lam() + eig.project_diagonal(Delta)
        ctx.save_for_backward(scale)
        ctx.R, ctx.eig = den.reciprocal(), eig
        if not eig.truncated:
            return den.log().sum()
        return (eig.multiplicities() * den.log()).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        R, eig = ctx.R, ctx.eig
        need = ctx.needs_input_grad
        gA = gB = gs = gD = None
        Rh = R[..., int(eig.b.complement > 0):, int(eig.a.complement > 0):]  # the held pairs (lam > 0 only there)
        if need[2]:
            gs = g * (eig.lam * Rh).sum()
        if need[3]:
            gD = g * eig.project_diagonal_adjoint(R)  # the cluster average is a symmetric projector
        if need[0]:
            gA = g * eig.a.grad(s * (eig.lB.unsqueeze(-1) * Rh).sum(-2))
        if need[1]:
            gB = g * eig.b.grad(s * (Rh * eig.lA.unsqueeze(-2)).sum(-1))
        return gA, gB, gs, gD, None


def _grouped(A: Tensor, B: Tensor, eig: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]):
    """Factors with a leading group axis (added for 2-d input) and their :class:`KronEigen`."""
    if A.dim() == 2:
        A, B = A.unsqueeze(0), B.unsqueeze(0)
        if eig is not None:
            eig = tuple(e.unsqueeze(0) for e in eig)
    return A, B, KronEigen.decompose(A, B) if eig is None else KronEigen.from_decompositions(*eig)


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
        A: ``(G, nA, nA)`` (or ``(nA, nA)``) symmetric PSD input factor.
        B: ``(G, nB, nB)`` (or ``(nB, nB)``) symmetric PSD output factor.
        scale: ``s > 0``.
        delta: prior precision ``delta_w > 0`` on every coordinate (on the weight coordinates if
            ``delta_bias`` is given).
        delta_bias: prior precision of the last ``A`` coordinate (the bias of a joint block);
            ``None`` means ``D = delta_w I``.
        eig: optional precomputed ``(lA, VA, lB, VB)`` of the detached factors from
            :func:`~marglik.curvature.eigen.eigh_psd` (eigenvalues ascending); computed if ``None``.
        log_ratio: return ``log det(s B ⊗ A + I ⊗ D) - log det(I ⊗ D)`` instead (computed
            without cancellation, see :class:`KronLogdetRatio`).

    Returns:
        0-d tensor, differentiable w.r.t. ``A``, ``B``, ``scale``, ``delta``, ``delta_bias``.
    """
    A, B, eig_ = _grouped(A, B, eig)
    s = as_scalar(scale, eig_.lam)
    dw = as_scalar(delta, eig_.lam)
    db = None if delta_bias is None else as_scalar(delta_bias, eig_.lam)
    G, nB, nA = eig_.shape
    spectrum = KronSpectrum.of(eig_, weight_and_bias=db is not None, prefix_sums=True)
    ratio = KronLogdetRatio.apply(A, B, s, dw.expand(G), None if db is None else db.expand(G), spectrum)
    if log_ratio:
        return ratio
    if db is None:
        return ratio + G * nB * nA * dw.log()
    return ratio + G * nB * ((nA - 1) * dw.log() + db.log())


def kron_logdet_projected(
    A: Tensor,
    B: Tensor,
    scale: Union[float, Tensor],
    prior: Tensor,
    eig: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
) -> Tensor:
    """K-FAC approximation of ``sum_g log det(s B_g ⊗ A_g + diag(prior_g))``.

    The prior diagonal is replaced by the diagonal of its projection onto the Kronecker
    eigenbasis, averaged over clusters of equal eigenvalues (of ``A`` and of ``B``) so that it does
    not depend on the basis chosen inside degenerate eigenspaces (e.g. the null space of a
    rank-deficient factor). Exact when the prior is constant per group; otherwise, by Hadamard's
    inequality and concavity of ``log``, never below the exact log determinant.

    Args:
        A: ``(G, nA, nA)`` (or ``(nA, nA)``) symmetric PSD input factor.
        B: ``(G, nB, nB)`` (or ``(nB, nB)``) symmetric PSD output factor.
        scale: ``s > 0``.
        prior: ``(G, nB, nA)`` (or ``(nB, nA)``) positive prior diagonal in the augmented
            row-major layout of ``B ⊗ A``.
        eig: optional precomputed ``(lA, VA, lB, VB)`` as in :func:`kron_logdet`.

    Returns:
        0-d tensor, differentiable w.r.t. ``A``, ``B`` (eigenbasis held fixed), ``scale``, ``prior``.
    """
    if A.dim() == 2:
        prior = prior.reshape(1, B.shape[-1], A.shape[-1])
    A, B, eig_ = _grouped(A, B, eig)
    return KronLogdetProjected.apply(A, B, as_scalar(scale, eig_.lam), prior.to(eig_.lam.dtype), eig_)
