"""marglik's factors equal curvlinops' KFACLinearOperator factors (converted to marglik's scale)."""

from __future__ import annotations

import pytest
import torch
from curvlinops_ref import curvlinops_factors
from torch import nn

import marglik

RTOL = 1e-8


class _MLPPositions(nn.Module):
    """Linear layers on ``(N, R, D)``; ``(N, R, C)`` output (expand) or mean over R (reduce)."""

    def __init__(self, reduce: bool):
        super().__init__()
        self.l1, self.l2, self.reduce = nn.Linear(4, 6), nn.Linear(6, 3), reduce

    def forward(self, x):
        out = self.l2(torch.relu(self.l1(x)))
        return out.mean(1) if self.reduce else out


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(3, 4, 2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 16, 3),
    )


def _data(model_kind, approx, likelihood, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if model_kind == "linear":
        model = _MLPPositions(reduce=approx == "reduce")
        X = torch.randn(6, 5, 4, generator=g)
    else:
        model = _conv_net()
        X = torch.randn(6, 2, 10, 10, generator=g)
    with torch.no_grad():
        out = model(X)
    if likelihood == "classification":
        y = torch.randint(0, out.shape[-1], out.shape[:-1], generator=g)
    else:
        y = torch.randn(out.shape, generator=g)
    return model, X, y


@pytest.mark.parametrize("model_kind", ["linear", "conv2d"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_factors_equal_curvlinops(model_kind, approx, fisher_type, likelihood, float64):
    model, X, y = _data(model_kind, approx, likelihood)
    ref = curvlinops_factors(model, likelihood, X, y, approx=approx, fisher_type=fisher_type)
    loader = [(X[:4], y[:4]), (X[4:], y[4:])]  # two batches on our side
    kron = marglik.KFAC(model, likelihood, approx=approx, fisher_type=fisher_type).fit(loader)
    assert {b.name for b in kron.blocks} == set(ref)
    for b in kron.blocks:
        A, B = ref[b.name]
        assert ((b.A[0] - A).norm() / A.norm()).item() < RTOL, b.name
        assert ((b.B[0] - B).norm() / B.norm()).item() < RTOL, b.name


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_wide_layers_equal_curvlinops(approx, float64):
    """Layers with >= 256 inputs/outputs take the blocked symmetric Gram path (curvature/gram.py)."""
    torch.manual_seed(3)

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(260, 270), nn.Linear(270, 4)

        def forward(self, x):
            out = self.l2(torch.tanh(self.l1(x)))
            return out.mean(1) if approx == "reduce" else out

    model = Wide()
    X = torch.randn(5, 3, 260)
    out = model(X)
    y = torch.randint(0, 4, out.shape[:-1])
    ref = curvlinops_factors(model, "classification", X, y, approx=approx, fisher_type="type-2")
    kron = marglik.KFAC(model, "classification", approx=approx).fit((X, y))
    for b in kron.blocks:
        A, B = ref[b.name]
        assert ((b.A[0] - A).norm() / A.norm()).item() < RTOL
        assert ((b.B[0] - B).norm() / B.norm()).item() < RTOL
