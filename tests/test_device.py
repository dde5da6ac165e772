"""Device checks: every public path gives the same numbers on each available device.

Parametrised over ``cpu`` and, when available, ``cuda`` (skipped otherwise; CI has no GPU, so
these run on CPU there and on the GPU through ``scripts/device_check.sh``). The reference is a
float64 CPU computation of the same quantity, so a device that computes something else (wrong
layout, a kernel that drops a term, a tensor left on the wrong device) fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import marglik
from marglik.models import SmallCNN

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _problem(seed: int = 0, S: int = 2):
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, num_classes=3, width=4, hidden=8)
    X = torch.randn(5, S, 1, 8, 8)  # S augmented copies per example: the copy axis is shared
    y = torch.randint(0, 3, (5,))
    return model, X, y


def _on(model: nn.Module, X, y, device, dtype):
    import copy

    return copy.deepcopy(model).to(device=device, dtype=dtype), X.to(device, dtype), y.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_factors_match_float64_cpu(device, approx):
    model, X, y = _problem()
    m64, X64, y64 = _on(model, X, y, "cpu", torch.float64)
    ref = marglik.KFAC(m64, approx=approx).fit((X64, y64))
    m, Xd, yd = _on(model, X, y, device, torch.float32)
    got = marglik.KFAC(m, approx=approx).fit((Xd, yd))
    assert all(b.A.device.type == torch.device(device).type for b in got.blocks)
    dense, dense_ref = got.to_dense().double().cpu(), ref.to_dense()
    assert dense_ref.norm() > 0
    assert (dense - dense_ref).norm() < 1e-5 * dense_ref.norm()


@pytest.mark.parametrize("device", DEVICES)
def test_laplace_marglik_and_gradient_match_float64_cpu(device):
    model, X, y = _problem(1)

    def lml_and_grad(dev, dtype):
        m, Xd, yd = _on(model, X, y, dev, dtype)
        la = marglik.KronLaplace(m, "classification", approx="reduce").fit((Xd, yd))
        lp = torch.zeros(la.n_layers, device=dev, dtype=dtype, requires_grad=True)
        lml = la.log_marginal_likelihood(prior_precision=lp.exp())
        (g,) = torch.autograd.grad(lml, lp)
        return float(lml.detach()), g.double().cpu()

    v64, g64 = lml_and_grad("cpu", torch.float64)
    v, g = lml_and_grad(device, torch.float32)
    assert abs(v - v64) < 1e-4 * abs(v64) + 1e-3
    assert (g - g64).norm() < 1e-3 * g64.norm() + 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_kfac_optimizer_step_on_device(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)
    X, y = torch.randn(32, 6, device=device), torch.randint(0, 3, (32,), device=device)
    opt = marglik.KFACOptimizer(model, lr=0.1, damping=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        with opt.track():
            out = model(X)
        opt.update_factors(out, y)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.device.type == torch.device(device).type for p in model.parameters())
    assert losses[-1] < losses[0]
