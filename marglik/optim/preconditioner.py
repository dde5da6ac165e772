"""The K-FAC preconditioner of :class:`marglik.optim.KFACOptimizer`, one covered block at a time:
its damped inverses (:func:`update_inverse`) and the preconditioned gradient (:func:`precondition`).

Pure mechanics on a block's optimizer state ``st`` (a dict): the factor EMAs it reads are
``A (G, da, da)`` and ``B (G, db, db)`` for a Kronecker block (``G`` groups, ``da`` inputs with
the bias as the last column, ``db`` outputs), or ``D (C, k, k)`` for a per-channel block; the
inverses it writes are cached there. The damping rules are in the optimizer's module docstring.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import Tensor

from ..curvature.blocks import CoveredModule
from ..curvature.eigen import eigh_psd
from ..curvature.options import BlockKind, StrOption

__all__ = ["DampingRule", "DAMPING_RULES", "update_inverse", "precondition", "spd_inverse"]


class DampingRule(StrOption):
    """How the damping enters the preconditioner (see :mod:`marglik.optim.kfac_optimizer`)."""

    PI = "pi"  # factored Tikhonov damping, Cholesky inverses
    EIGEN = "eigen"  # exact damping in the Kronecker eigenbasis


DAMPING_RULES = tuple(r.value for r in DampingRule)


def update_inverse(st: Dict[str, Any], kind: BlockKind, damping: float, rule: DampingRule) -> None:
    """Recompute a block's cached inverses (or eigendecompositions) from its factor EMAs.

    Computed in float64 and stored in the factors' dtype: ``D_inv (C, k, k)`` for a per-channel
    block; ``QA, dA, QB, dB`` (eigenbases and eigenvalues of ``A`` and ``B``) for
    ``rule="eigen"``; else ``A_inv``, ``B_inv`` of the factored Tikhonov damping and ``pi (G,)``.
    Also records ``inv_damping`` and ``inv_rule`` (an int: torch's ``load_state_dict`` mangles
    strings), so a changed damping or rule is noticed.

    Args:
        st: the block's optimizer state, updated in place.
        kind: the block's kind (``BlockKind.DIAG``: per-channel, else Kronecker).
        damping: ``lambda`` (> 0).
        rule: the damping rule.
    """
    if kind is BlockKind.DIAG:
        D = st["D"].double()
        eye = torch.eye(D.shape[-1], dtype=D.dtype, device=D.device)
        st["D_inv"] = torch.linalg.inv(D + damping * eye).to(st["D"].dtype)
    else:
        A, B = st["A"].double(), st["B"].double()
        dtype = st["A"].dtype
        if rule is DampingRule.EIGEN:
            dA, QA = eigh_psd(A)
            dB, QB = eigh_psd(B)
            st["QA"], st["dA"] = QA.to(dtype), dA.to(dtype)
            st["QB"], st["dB"] = QB.to(dtype), dB.to(dtype)
        else:
            A, B = 0.5 * (A + A.mT), 0.5 * (B + B.mT)
            da, db = A.shape[-1], B.shape[-1]
            trA = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1) / da
            trB = torch.diagonal(B, dim1=-2, dim2=-1).sum(-1) / db
            ok = (trA > 0) & (trB > 0)
            pi = torch.where(ok, (trA / torch.where(ok, trB, torch.ones_like(trB))).clamp_min(0).sqrt(),
                             torch.ones_like(trA))
            s = math.sqrt(damping)
            eyeA = torch.eye(da, dtype=A.dtype, device=A.device)
            eyeB = torch.eye(db, dtype=B.dtype, device=B.device)
            st["A_inv"] = spd_inverse(A + (pi * s).view(-1, 1, 1) * eyeA).to(dtype)
            st["B_inv"] = spd_inverse(B + (s / pi).view(-1, 1, 1) * eyeB).to(dtype)
            st["pi"] = pi.to(dtype)
    st["inv_damping"] = float(damping)
    st["inv_rule"] = DAMPING_RULES.index(rule)


def precondition(st: Dict[str, Any], layer: CoveredModule, damping: float, rule: DampingRule) -> List[Tensor]:
    """Preconditioned gradients of a covered block's parameters.

    A Kronecker block's gradients are stacked into ``M = [W, b] (G, db, da)`` and mapped to
    ``B_inv M A_inv`` (``rule="pi"``) or ``(B ⊗ A + damping)^-1 M`` in the eigenbasis
    (``rule="eigen"``); a per-channel block's ``(C, k)`` gradients to ``D_inv g`` per channel.

    Args:
        st: the block's optimizer state with the inverses of :func:`update_inverse`.
        layer: the covered block (its parameters' ``.grad``; a missing gradient counts as zero).
        damping: ``lambda`` (used by ``rule="eigen"``).
        rule: the damping rule the inverses were computed with.

    Returns:
        One tensor per parameter of ``layer.params``, shaped like it.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.params]
    if layer.kind is BlockKind.DIAG:
        Gm = torch.stack([g.reshape(-1) for g in grads], dim=-1)  # (C, k)
        U = (st["D_inv"] @ Gm.unsqueeze(-1)).squeeze(-1)
        return [U[:, i].reshape(p.shape) for i, p in enumerate(layer.params)]
    G = layer.groups
    parts, sizes = [], []
    if layer.weight is not None:
        db = layer.weight.shape[0] // G
        w = grads[0].reshape(G, db, -1)
        parts.append(w)
        sizes.append(w.shape[-1])
    if layer.bias is not None:
        db = layer.bias.numel() // G  # a raw parameter's block (e.g. a class token) is bias-only
        parts.append(grads[-1].reshape(G, db, 1))
        sizes.append(1)
    M = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # (G, db, da)
    if rule is DampingRule.EIGEN:
        QA, QB = st["QA"], st["QB"]
        V = QB.mT @ M @ QA
        V = V / (st["dB"].unsqueeze(-1) * st["dA"].unsqueeze(-2) + damping)
        U = QB @ V @ QA.mT
    else:
        U = st["B_inv"] @ M @ st["A_inv"]
    out = []
    pieces = torch.split(U, sizes, dim=-1)
    for p, piece in zip(layer.params, pieces):
        out.append(piece.reshape(p.shape))
    return out


def spd_inverse(M: Tensor) -> Tensor:
    """Inverse of a batch of symmetric positive-definite matrices (Cholesky; eigh as fallback).

    Args:
        M: ``(..., d, d)`` symmetric positive (semi-)definite matrices.

    Returns:
        ``(..., d, d)`` inverses (eigenvalues clamped to the dtype's smallest positive number when
        the Cholesky fails).
    """
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info == 0).all()):
        return torch.cholesky_inverse(L)
    d, Q = torch.linalg.eigh(M)
    return (Q / d.clamp_min(torch.finfo(M.dtype).tiny).unsqueeze(-2)) @ Q.mT
