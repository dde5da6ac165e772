"""marglik's K-FAC factors against BackPACK's KFLR (exact type-2 K-FAC) on an ``nn.Sequential`` CNN.

BackPACK's conventions (read from ``backpack/extensions/secondorder/hbp/{linear,convnd}.py`` and
``backpack/core/derivatives/crossentropyloss.py``), for a batch of ``N`` examples:

* the loss-Hessian square root is that of the loss as defined: ``reduction="sum"`` gives the GGN of
  the summed loss (marglik's convention), ``reduction="mean"`` divides it by ``N`` -- so ``B`` is
  ``B_ours`` or ``B_ours / N``; ``A`` is always divided by ``N`` (a batch mean), whatever the
  reduction.
* ``nn.Linear`` (2-d inputs): ``A = 1/N sum_n x x^T``, ``B = sum_n sum_c s s^T`` -- exactly
  marglik's expand (= reduce) factors.
* ``nn.Conv2d``: ``A = 1/N sum_n sum_r a a^T`` over the ``R`` output positions (unfolded input,
  summed, not averaged, over positions), i.e. ``R * A_expand``; ``B = sum_n sum_c (sum_r s)(sum_r
  s)^T``: the output-gradient square root is summed over positions *before* the outer product,
  i.e. marglik's reduce ``B`` (the exact GGN of the bias), not expand's ``sum_{n,r} g g^T``. So
  BackPACK's conv KFLR is ``(R A_expand) ⊗ B_reduce``; only its ``A`` is comparable to expand.
  The bias factor ``[B]`` equals the bias block of both, ``B_reduce``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import marglik

backpack = pytest.importorskip("backpack")
from backpack import backpack as backpack_ctx  # noqa: E402
from backpack import extend  # noqa: E402
from backpack.context import CTX  # noqa: E402
from backpack.extensions import KFLR  # noqa: E402


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 4),
    )


def _kflr(model, X, y, reduction):
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss(reduction=reduction))
    try:
        with backpack_ctx(KFLR()):
            loss_fn(model(X), y).backward()
        return {name: [f.detach().clone() for f in p.kflr] for name, p in model.named_parameters()}
    finally:
        CTX.remove_hooks()


def _ours(model, X, y, approx):
    kron = marglik.KFAC(model, "classification", approx=approx, fisher_type="type-2").fit((X, y))
    return {blk.name: blk for blk in kron.blocks}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_kflr_factors_match_expand_and_reduce_with_stated_scaling(float64, reduction):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(5, 2, 6, 6, generator=g)
    y = torch.randint(0, 4, (5,), generator=g)
    N = len(y)
    model = _model()
    bp = _kflr(model, X, y, reduction)
    expand, reduce = _ours(model, X, y, "expand"), _ours(model, X, y, "reduce")
    b_scale = 1.0 if reduction == "sum" else 1.0 / N
    positions = {"0": 6 * 6, "2": 3 * 3}  # R: output positions of each convolution
    for name, R in positions.items():
        ex, re = expand[name], reduce[name]
        din = ex.weight[0].numel()
        B_bp, A_bp = bp[f"{name}.weight"]
        torch.testing.assert_close(A_bp, R * ex.A[0, :din, :din], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(B_bp, b_scale * re.B[0], rtol=1e-10, atol=1e-12)
        (B_bias,) = bp[f"{name}.bias"]
        torch.testing.assert_close(B_bias, b_scale * re.B[0] * re.A[0, -1, -1], rtol=1e-10, atol=1e-12)
        # negative control: BackPACK's B is not expand's (positions' cross terms are kept)
        assert not torch.allclose(B_bp, b_scale * ex.B[0], rtol=1e-3)
    lin = expand["5"]
    din = lin.weight[0].numel()
    B_bp, A_bp = bp["5.weight"]
    torch.testing.assert_close(A_bp, lin.A[0, :din, :din], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B_bp, b_scale * lin.B[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bp["5.bias"][0], b_scale * lin.B[0] * lin.A[0, -1, -1], rtol=1e-10, atol=1e-12)
