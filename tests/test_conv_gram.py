"""The shifted-correlation patch Gram of stride-1 convolutions equals the unfolded Gram (float64)."""

from __future__ import annotations

import pytest
import torch
from cases import CASES
from reference import block_diagonal_mask, exact_ggn
from torch import nn

import marglik
from marglik.curvature.layers import conv as conv_rule
from marglik.curvature.layers.conv import ConvRule, unfold, zero_pad_geometry
from marglik.curvature.layers.conv_gram import lag_gram_applies, lag_gram_cost, lag_patch_gram, unfold_gram_cost

GEOMETRIES = {
    "3x3_same": (lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 4, 7, 5)),
    "3x3_valid": (lambda: nn.Conv2d(4, 6, 3), (3, 4, 7, 5)),
    "rect_dilated": (lambda: nn.Conv2d(4, 6, (3, 2), padding=(2, 0), dilation=(2, 1)), (2, 4, 9, 6)),
    "same_dilated": (lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2), (2, 4, 8, 8)),
    "even_same": (lambda: nn.Conv2d(4, 6, 4, padding="same"), (2, 4, 8, 8)),
    "pad_beyond_kernel": (lambda: nn.Conv2d(4, 6, 3, padding=3), (2, 4, 5, 5)),
    "kernel_as_large_as_input": (lambda: nn.Conv2d(4, 6, 5, padding=1), (2, 4, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 5, padding=1), (3, 4, 11)),
    "conv3d": (lambda: nn.Conv3d(4, 6, (2, 3, 2), padding=(1, 1, 0)), (2, 4, 4, 5, 3)),
    "groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (3, 4, 7, 5)),
    "1x1": (lambda: nn.Conv2d(4, 6, 1), (3, 4, 7, 5)),
}


def _unfolded_gram(m, x):
    U = unfold(m, x)
    T, _, L = U.shape
    G = m.groups
    X = U.view(T, G, -1, L).permute(1, 2, 0, 3).reshape(G, -1, T * L)
    return X @ X.transpose(1, 2)


def _lag_gram(m, x):
    return lag_patch_gram(m, x, *zero_pad_geometry(m, x.shape[2:]))


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_lag_gram_equals_unfolded_gram(name, float64):
    build, shape = GEOMETRIES[name]
    torch.manual_seed(0)
    m = build()
    x = torch.randn(shape)
    ref = _unfolded_gram(m, x)
    A = _lag_gram(m, x)
    assert A.shape == ref.shape
    assert ((A - ref).norm() / ref.norm()).item() < 1e-13
    assert torch.equal(A, A.transpose(-1, -2))


def test_lag_gram_is_differentiable(float64):
    m = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 4, 5, requires_grad=True)
    w = torch.randn(18, 18)
    torch.autograd.gradcheck(lambda x: (_lag_gram(m, x)[0] * w).sum(), (x,))


def test_rule_chooses_the_cheaper_gram():
    wide = nn.Conv2d(64, 64, 3, padding=1)
    assert lag_gram_applies(wide)
    assert lag_gram_cost(wide, [32, 32], [1, 1], [32, 32]) < 0.5 * unfold_gram_cost(wide, [32, 32])
    pointwise = nn.Conv2d(64, 64, 1)
    assert lag_gram_cost(pointwise, [32, 32], [0, 0], [32, 32]) > unfold_gram_cost(pointwise, [32, 32])
    depthwise = nn.Conv2d(96, 96, 7, padding=3, groups=96)  # memory passes per lag dominate
    assert lag_gram_cost(depthwise, [56, 56], [3, 3], [56, 56]) > unfold_gram_cost(depthwise, [56, 56])
    grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4)
    assert lag_gram_cost(grouped, [32, 32], [1, 1], [32, 32]) < 0.8 * unfold_gram_cost(grouped, [32, 32])
    assert not lag_gram_applies(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert not lag_gram_applies(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


def test_rule_stats_match_unfolded_stats_on_a_wide_layer(float64):
    """Through :meth:`ConvRule.expand_input_stats`, where the cost model picks the lag path."""
    m = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    XtX, xsum, M = ConvRule().expand_input_stats(m, x)
    X = ConvRule().expand_inputs(m, x)
    assert M == X.shape[2]
    assert torch.allclose(XtX, X @ X.transpose(1, 2), rtol=1e-12, atol=1e-12)
    assert torch.allclose(xsum, X.sum(2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if c.setting == "expand" and c.id.startswith("conv")],
                         ids=lambda c: c.id)
def test_expand_exact_with_lag_gram_forced(case, float64, monkeypatch):
    """The exactness cases again, with every eligible convolution on the shifted-correlation path."""
    monkeypatch.setattr(conv_rule, "_LAG_GRAM_MAX_COST", float("inf"))
    model, X, y = case.data()
    G = exact_ggn(model, "regression", X, y)
    kron = marglik.KFAC(model, "regression", approx="expand").fit((X, y))
    K = kron.to_dense()
    mask = block_diagonal_mask(kron)
    assert ((K - G * mask).norm() / (G * mask).norm()).item() < 1e-10
