"""Loss-Hessian square roots, sampled-label and true-label gradients per likelihood.

Every function here works on the model output ``f`` of shape ``(N, C)`` or ``(N, *R, C)``
(``R`` weight-sharing positions with one loss term each) and returns *columns* ``S`` of shape
``(K, *f.shape)`` such that the curvature of the summed loss with respect to ``f`` is
``sum_k S[k] S[k]^T`` (per output position):

* ``type-2``: the exact square root of the loss Hessian,
  cross-entropy ``diag(sqrt p) - p sqrt(p)^T`` (``K = C``; ``K = C - 1`` for ``(N, C)`` outputs,
  see :func:`_ce_sqrt_rank_deficient`), squared error ``I`` (``K = C``), BCE ``sqrt(s (1 - s))``
  (``K = 1``);
* ``mc``: gradients of the loss at labels sampled from the model, divided by
  ``sqrt(mc_samples)`` (``K = mc_samples``);
* ``mc-root``: the type-2 root times random signs, ``sqrt(Lambda) z / sqrt(mc_samples)`` with
  ``z`` Rademacher of length ``C`` per output position (``K = mc_samples``);
* ``empirical``: gradients of the loss at the true labels (``K = 1``).

Why ``mc-root`` beside ``mc``. Both columns have expectation ``E[s s^T] = Lambda`` (the loss
Hessian), so both give an unbiased GGN at one backward column per sample. A marglik hyperstep
also differentiates the curvature with respect to hyperparameters the outputs ``f`` depend on
(the augmentation ranges ``eta``), with the random draw held fixed. For ``mc`` the column is
``p - e_y`` with ``y ~ Cat(p)`` drawn without gradient, so ``E_y[d((p - e_y)(p - e_y)^T)] =
dp (p - E e_y)^T + (p - E e_y) dp^T = 0``: the part of ``dGGN = dJ^T Lambda J + J^T Lambda dJ +
J^T dLambda J`` that comes through the predictions, ``dLambda = diag(dp) - dp p^T - p dp^T``, is
missing (it would need the score-function term of the sampling distribution). For ``mc-root``
the column is ``R z`` with ``R R^T = Lambda`` and ``z`` independent of ``f``, so
``E_z[d(R z z^T R^T)] = dR R^T + R dR^T = dLambda``: pathwise unbiased. The missing term matters:
a wider augmentation range makes predictions less confident, which raises ``Lambda`` and with it
the log-determinant's Occam penalty; without it ``mc`` rewards ranges the data do not support
(on upright digits the default job learned up to 5.4 degrees of rotation under ``mc``, at most
1.2 under ``mc-root``, and ``type-2`` agrees with ``mc-root``: ``results/marglik_vs_grid.md``).

Outputs with positions ``(N, *R, C)``: column ``k`` holds the ``k``-th square-root column of
*every* position at once, so ``K = C`` (not ``R * C``) backward columns suffice -- the convention
of curvlinops and laplace-torch. This is exact whenever output gradients of different positions
do not mix before reaching a layer's output (the expand setting: position-wise layers); where
they mix (attention, or ``reduce`` with per-position losses) it adds cross-position terms that
the exact per-position square roots, and MC sampling in expectation, do not have.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .options import FisherType, Likelihood


def check_output_and_targets(likelihood: Likelihood, f: Tensor, y: Tensor) -> Tensor:
    """Validate shapes/values; return ``y`` reshaped to what the loss needs.

    Classification: ``y`` integer of shape ``f.shape[:-1]`` with values in ``[0, C)``.
    Regression: ``y`` of shape ``f.shape`` (``(N,)`` accepted for ``f`` of shape ``(N, 1)``).
    Binary: ``y`` in ``{0, 1}`` of shape ``f.shape`` (``f`` of shape ``(N,)`` or ``(N, ..., 1)``).
    """
    if f.dim() < 1 or f.shape[0] == 0:
        raise ValueError(f"model output has no examples (shape {tuple(f.shape)})")
    if not torch.isfinite(f).all():
        raise FloatingPointError(
            "model output contains NaN or Inf, so the loss is not finite; check the inputs and parameters"
        )
    if y.shape[0] != f.shape[0]:
        raise ValueError(
            f"target batch size {y.shape[0]} does not match model output batch size {f.shape[0]}"
        )
    if likelihood is Likelihood.CLASSIFICATION:
        if f.dim() < 2:
            raise ValueError(f"classification needs logits of shape (N, ..., C), got {tuple(f.shape)}")
        if y.is_floating_point() or y.is_complex():
            raise ValueError("classification targets must be integer class indices")
        if y.shape != f.shape[:-1]:
            raise ValueError(
                f"classification targets of shape {tuple(y.shape)} do not match logits {tuple(f.shape)}:"
                f" expected {tuple(f.shape[:-1])}"
            )
        C = f.shape[-1]
        if y.numel() and (y.min() < 0 or y.max() >= C):
            raise ValueError(f"class labels must lie in [0, {C}), got range [{int(y.min())}, {int(y.max())}]")
        return y
    # regression / binary
    if y.shape != f.shape:
        if y.numel() == f.numel() and f.shape[-1] == 1 and y.shape == f.shape[:-1]:
            y = y.reshape(f.shape)
        else:
            raise ValueError(
                f"{likelihood.value} targets of shape {tuple(y.shape)} do not match model output {tuple(f.shape)}"
            )
    y = y.to(f.dtype)
    if not torch.isfinite(y).all():
        raise FloatingPointError("targets contain NaN or Inf")
    if likelihood is Likelihood.BINARY and ((y != 0) & (y != 1)).any():
        raise ValueError("binary targets must be 0 or 1")
    return y


def summed_nll(likelihood: Likelihood, f: Tensor, y: Tensor) -> Tensor:
    """The summed negative log-likelihood whose curvature the engine approximates.

    Regression uses ``0.5 * ||y - f||^2`` (unit noise, constants dropped).
    """
    if likelihood is Likelihood.CLASSIFICATION:
        return F.cross_entropy(f.reshape(-1, f.shape[-1]), y.reshape(-1), reduction="sum")
    if likelihood is Likelihood.REGRESSION:
        return 0.5 * (y - f).pow(2).sum()
    return F.binary_cross_entropy_with_logits(f, y, reduction="sum")


def curvature_columns(
    likelihood: Likelihood,
    fisher_type: FisherType,
    f: Tensor,
    y: Tensor,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Columns ``S`` of shape ``(K, *f.shape)`` with ``sum_k S_k S_k^T`` the output curvature.

    ``f`` is detached here unless the caller needs differentiability (then it is used as is).
    """
    if fisher_type is FisherType.TYPE2:
        return _hessian_sqrt(likelihood, f)
    if fisher_type is FisherType.EMPIRICAL:
        return _loss_grad(likelihood, f, y).unsqueeze(0)
    if fisher_type is FisherType.MC_ROOT:
        return _root_times_signs(likelihood, f, mc_samples, generator)
    # Monte-Carlo: loss gradients at labels drawn from the model's predictive distribution.
    samples = _sample_targets(likelihood, f, mc_samples, generator)  # (mc_samples, *targets)
    return _loss_grad(likelihood, f.unsqueeze(0), samples) / math.sqrt(mc_samples)


def _hessian_sqrt(likelihood: Likelihood, f: Tensor) -> Tensor:
    if likelihood is Likelihood.CLASSIFICATION and f.dim() == 2:
        return _ce_sqrt_rank_deficient(f)
    if likelihood is Likelihood.CLASSIFICATION:
        p = torch.softmax(f, dim=-1)  # (*, C)
        C = f.shape[-1]
        sqrt_p = p.clamp_min(0).sqrt()
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        # S[k, ..., c] = sqrt(p_k) * (delta_kc - p_c)
        S = sqrt_p.movedim(-1, 0).unsqueeze(-1) * (eye.view(C, *([1] * (f.dim() - 1)), C) - p.unsqueeze(0))
        return S
    if likelihood is Likelihood.REGRESSION:
        C = f.shape[-1]
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        return eye.view(C, *([1] * (f.dim() - 1)), C).expand(C, *f.shape)
    s = torch.sigmoid(f)
    return (s * (1 - s)).sqrt().unsqueeze(0)


def _root_times_signs(
    likelihood: Likelihood, f: Tensor, mc_samples: int, generator: Optional[torch.Generator]
) -> Tensor:
    """``mc_samples`` columns ``root_times(f, z) / sqrt(mc_samples)`` of shape ``(mc_samples,
    *f.shape)``, ``z`` independent Rademacher signs per sample, position and output (drawn without
    gradient, from ``generator`` where given)."""
    shape = (mc_samples,) + f.shape
    with torch.no_grad():
        z = torch.randint(0, 2, shape, generator=generator,
                          device=generator.device if generator is not None else f.device)
        z = (2 * z - 1).to(device=f.device, dtype=f.dtype)
    return root_times(likelihood, f, z) / math.sqrt(mc_samples)


def root_times(likelihood: Likelihood, f: Tensor, z: Tensor) -> Tensor:
    """``R z`` per output position for ``z`` of shape ``(K, *f.shape)``: ``R`` the loss Hessian's
    root with ``R R^T = Lambda`` (cross-entropy ``diag(sqrt p) - p sqrt(p)^T``, squared error ``I``,
    BCE ``sqrt(s (1 - s))``), differentiable in ``f``. With ``E[z z^T] = I`` (Rademacher signs)
    ``E[(R z)(R z)^T] = Lambda`` and ``E[d((R z)(R z)^T)] = d Lambda``. One matrix-vector product
    per position; the ``C x C`` root is never formed. Returns ``(K, *f.shape)``."""
    if likelihood is Likelihood.CLASSIFICATION:
        p = torch.softmax(f, dim=-1)
        sqrt_p = p.clamp_min(0).sqrt()
        # (diag(sqrt p) - p sqrt(p)^T) z = sqrt(p) * z - p (sqrt(p) . z)
        return sqrt_p * z - p * (sqrt_p * z).sum(-1, keepdim=True)
    if likelihood is Likelihood.REGRESSION:
        return z.to(f.dtype).expand(z.shape[0], *f.shape)
    s = torch.sigmoid(f)
    return (s * (1 - s)).sqrt() * z


def _ce_sqrt_rank_deficient(f: Tensor) -> Tensor:
    """``C - 1`` columns ``S`` with ``S S^T = diag(p) - p p^T`` for logits ``f`` of shape ``(N, C)``.

    The cross-entropy Hessian has rank ``C - 1`` (``1`` is in its null space), so one backward
    column in ``C`` is wasted by the symmetric-looking root ``R = diag(sqrt p) - p sqrt(p)^T``:
    ``R sqrt(p) = 0``. Rotating by the Householder reflection ``Q`` that maps ``e_m`` to
    ``sqrt(p)`` (``m = argmin p``, so ``||sqrt(p) - e_m||^2 = 2 - 2 sqrt(p_m) >= 2 - 2/sqrt(C)`` is
    well away from 0) zeroes column ``m`` of ``R Q``, which is dropped. With one loss term per
    example the factor ``B = sum_k g_k g_k^T`` does not depend on the root, so this only saves
    work; outputs with positions keep ``R`` (curvlinops' convention; there the root matters).
    Returns ``(C - 1, N, C)``.
    """
    N, C = f.shape
    p = torch.softmax(f, dim=-1)
    sqrt_p = p.clamp_min(0).sqrt()
    R = torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)  # (N, C, C), columns k
    m = p.argmin(dim=-1)  # (N,)
    rows = torch.arange(N, device=f.device)
    v = sqrt_p.clone()
    v[rows, m] -= 1
    Rm = R[rows, :, m]  # (N, C): column m of R; R v = -Rm
    RQ = R + (2.0 / (v * v).sum(-1)).view(N, 1, 1) * Rm.unsqueeze(-1) * v.unsqueeze(-2)
    keep = torch.arange(C, device=f.device).expand(N, C)
    keep = keep[keep != m.unsqueeze(-1)].view(N, C - 1)  # column indices without m
    S = torch.gather(RQ, 2, keep.unsqueeze(1).expand(N, C, C - 1))  # (N, C, C - 1)
    return S.permute(2, 0, 1)


def _loss_grad(likelihood: Likelihood, f: Tensor, y: Tensor) -> Tensor:
    """Gradient of the summed loss w.r.t. ``f`` (per output position)."""
    if likelihood is Likelihood.CLASSIFICATION:
        return torch.softmax(f, dim=-1) - F.one_hot(y, f.shape[-1]).to(f.dtype)
    if likelihood is Likelihood.REGRESSION:
        return f - y
    return torch.sigmoid(f) - y


def _sample_targets(
    likelihood: Likelihood, f: Tensor, mc_samples: int, generator: Optional[torch.Generator]
) -> Tensor:
    """``mc_samples`` independent draws of the targets per output position, stacked first."""
    with torch.no_grad():
        f = f.detach()
        if likelihood is Likelihood.CLASSIFICATION:
            p = torch.softmax(f, dim=-1).reshape(-1, f.shape[-1])
            idx = torch.multinomial(p, mc_samples, replacement=True, generator=generator)  # (M, S)
            return idx.T.reshape(mc_samples, *f.shape[:-1])
        if likelihood is Likelihood.REGRESSION:
            noise = torch.randn((mc_samples,) + f.shape, dtype=f.dtype, device=f.device, generator=generator)
            return f + noise
        probs = torch.sigmoid(f).expand((mc_samples,) + f.shape)
        return torch.bernoulli(probs, generator=generator)
