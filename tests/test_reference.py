"""Self-tests of the dense references in ``tests/reference.py``."""

from __future__ import annotations

import pytest
import torch
from reference import (
    ConvExpand,
    ConvReduce,
    DeepLinearExpand,
    DeepLinearReduce,
    exact_empirical_fisher,
    exact_ggn,
    exact_hessian,
    kron_to_param_order,
    make_targets,
    module_indices,
    summed_loss,
)
from torch import nn

DT = torch.float64


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 3)])
def test_linear_mse_closed_form(shape):
    torch.manual_seed(0)
    D, C = shape[-1], 2
    lin = nn.Linear(D, C).to(DT)
    X = torch.randn(*shape, dtype=DT)
    y = make_targets("regression", lin(X).detach())
    G = exact_ggn(lin, "regression", X, y)

    a = X.reshape(-1, D)
    M = a.shape[0]
    S, s = a.T @ a, a.sum(0)
    eye = torch.eye(C, dtype=DT)
    ref = torch.zeros(C * D + C, C * D + C, dtype=DT)
    ref[: C * D, : C * D] = torch.kron(eye, S)  # W row-major: index i * D + j
    ref[: C * D, C * D :] = torch.kron(eye, s[:, None])
    ref[C * D :, : C * D] = torch.kron(eye, s[None, :])
    ref[C * D :, C * D :] = M * eye
    torch.testing.assert_close(G, ref)

    # same thing via the Kronecker form  I_C ⊗ sum ã ã^T  in augmented ordering
    at = torch.cat([a, torch.ones(M, 1, dtype=DT)], 1)
    torch.testing.assert_close(kron_to_param_order(at.T @ at, eye, lin.weight.shape, True), ref)
    # for a linear model in the parameters the GGN equals the Hessian
    torch.testing.assert_close(G, exact_hessian(lin, "regression", X, y))


@pytest.mark.parametrize("likelihood", ["classification", "binary"])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 3)])
def test_linear_ggn_equals_hessian(likelihood, shape):
    torch.manual_seed(1)
    C = 3 if likelihood == "classification" else 2
    lin = nn.Linear(shape[-1], C).to(DT)
    X = torch.randn(*shape, dtype=DT)
    y = make_targets(likelihood, lin(X).detach())
    G = exact_ggn(lin, likelihood, X, y)

    # brute force: autograd.functional.hessian of the summed loss over the flat parameters
    W, b = lin.weight.detach(), lin.bias.detach()

    def loss_flat(theta):
        Wt = theta[: W.numel()].view_as(W)
        bt = theta[W.numel() :]
        return summed_loss(X @ Wt.T + bt, y, likelihood)

    H = torch.autograd.functional.hessian(loss_flat, torch.cat([W.reshape(-1), b]))
    torch.testing.assert_close(G, H)
    assert torch.linalg.eigvalsh(G).min() > -1e-10


@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
def test_ggn_nonlinear_against_loop(likelihood):
    torch.manual_seed(2)
    C = 1 if likelihood == "binary" else 3
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C)).to(DT)
    X = torch.randn(5, 2, 3, dtype=DT)
    out = model(X).detach()
    y = make_targets(likelihood, out)
    params = list(model.parameters())
    G = exact_ggn(model, likelihood, X, y)

    ref = 0
    for n in range(X.shape[0]):
        for r in range(X.shape[1]):
            f = model(X[n, r])
            J = torch.cat(
                [
                    torch.cat([g.reshape(-1) for g in torch.autograd.grad(f[c], params, retain_graph=True)])[None]
                    for c in range(C)
                ]
            )
            if likelihood == "classification":
                p = f.detach().softmax(-1)
                Lam = torch.diag(p) - torch.outer(p, p)
            elif likelihood == "regression":
                Lam = torch.eye(C, dtype=DT)
            else:
                s = f.detach().sigmoid()
                Lam = torch.diag(s * (1 - s))
            ref = ref + J.T @ Lam @ J
    torch.testing.assert_close(G, ref)

    # empirical Fisher against a loop over examples
    E = exact_empirical_fisher(model, likelihood, X, y)
    ref_e = 0
    for n in range(X.shape[0]):
        loss = summed_loss(model(X[n : n + 1]), y[n : n + 1], likelihood)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
        ref_e = ref_e + torch.outer(g, g)
    torch.testing.assert_close(E, ref_e)


def test_param_subset_and_frozen():
    torch.manual_seed(3)
    model = DeepLinearExpand(3, (4,), 2).to(DT)
    X = torch.randn(3, 2, 3, dtype=DT)
    y = make_targets("classification", model(X).detach())
    G = exact_ggn(model, "classification", X, y)
    idx = module_indices(model, "layers.1")
    sub = [model.layers[1].weight, model.layers[1].bias]
    torch.testing.assert_close(exact_ggn(model, "classification", X, y, params=sub), G[idx][:, idx])
    model.layers[0].weight.requires_grad_(False)
    G2 = exact_ggn(model, "classification", X, y)
    keep = torch.arange(model.layers[0].weight.numel(), G.shape[0])
    torch.testing.assert_close(G2, G[keep][:, keep])


@pytest.mark.parametrize(
    "make",
    [
        lambda: DeepLinearExpand(3, (4,), 2),
        lambda: DeepLinearReduce(3, (4,), 2),
        lambda: ConvExpand(1, kernel_size=2, stride=2, padding=1),
        lambda: ConvExpand(2, kernel_size=2, dilation=2, padding=1),
        lambda: ConvExpand(3, in_channels=2, hidden=(2,), kernel_size=2),
        lambda: ConvReduce(2, kernel_size=3, stride=2, padding=1),
    ],
)
def test_models_tiny_and_shapes(make):
    torch.manual_seed(4)
    model = make().to(DT)
    assert sum(p.numel() for p in model.parameters()) < 500
    if isinstance(model, (DeepLinearExpand, DeepLinearReduce)):
        X = torch.randn(2, 3, 3, dtype=DT)
    else:
        dim = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(next(m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)))]
        X = torch.randn(2, 2, *([5] * dim), dtype=DT)
    out = model(X)
    assert out.dim() == (3 if isinstance(model, (DeepLinearExpand, ConvExpand)) else 2)
    y = make_targets("regression", out.detach())
    G = exact_ggn(model, "regression", X, y)
    assert G.shape == (sum(p.numel() for p in model.parameters()),) * 2
    torch.testing.assert_close(G, G.T)
