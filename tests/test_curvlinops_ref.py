"""Check the curvlinops -> marglik conversion in ``tests/curvlinops_ref.py``.

The reference here is a brute-force K-FAC computed directly from the definitions (layer inputs
from forward hooks / ``F.unfold``, output gradients from ``torch.autograd.grad``), plus the
exactness of K-FAC-expand/-reduce on deep linear networks with a Gaussian likelihood.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from curvlinops_ref import curvlinops_factors
from reference import (
    ConvExpand,
    ConvReduce,
    DeepLinearExpand,
    DeepLinearReduce,
    canonical_likelihood,
    exact_ggn,
    kron_to_param_order,
    make_targets,
    module_indices,
)
from torch import nn

DT = torch.float64


# ----------------------------------------------------------------------------------------------
# brute-force K-FAC from the definitions
# ----------------------------------------------------------------------------------------------


def _inputs(module, x):
    """Layer inputs as ``(N, R, din)``."""
    if isinstance(module, nn.Conv2d):
        assert module.groups == 1
        p = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return p.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _outputs(module, g):
    """Output gradients as ``(N, R, dout)``."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _backprop_vectors(likelihood, f2, y2, fisher_type, mc_samples, seed, sqrt="curvlinops"):
    """Vectors ``V_k`` (``(M, C)``) such that ``B = sum_k g(V_k) g(V_k)^T``.

    type-2: column ``k`` of a square root ``S_m`` of the loss Hessian at every position ``m``,
    all positions backpropagated together. ``sqrt="curvlinops"`` uses curvlinops' CE root
    ``diag(sqrt p) - p sqrt(p)^T`` (column k = ``sqrt(p_k) (e_k - p)``); ``"sym"`` the symmetric
    root from ``eigh``. The choice matters only when one layer position feeds several loss
    positions (e.g. reduce with ``(N, R, C)`` outputs): then ``B`` contains cross terms
    ``sum_k J_r^T S_r[:, k] S_r'[:, k]^T J_r'`` that depend on the root.
    """
    f2 = f2.detach()
    C = f2.shape[-1]
    if fisher_type == "type-2":
        if likelihood == "classification":
            p = f2.softmax(-1)
            if sqrt == "curvlinops":
                S = torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :]
            else:
                Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
                evals, evecs = torch.linalg.eigh(Lam)
                S = evecs * evals.clamp(min=0).sqrt()[:, None, :]  # S S^T = Lam
        elif likelihood == "regression":
            S = torch.eye(C, dtype=f2.dtype).expand(f2.shape[0], C, C)
        else:
            s = f2.sigmoid()
            S = torch.diag_embed((s * (1 - s)).sqrt())
        return [S[:, :, k] for k in range(C)]
    if fisher_type == "empirical":
        f = f2.clone().requires_grad_(True)
        if likelihood == "classification":
            loss = F.cross_entropy(f, y2, reduction="sum")
        elif likelihood == "regression":
            loss = 0.5 * (f - y2).pow(2).sum()
        else:
            loss = F.binary_cross_entropy_with_logits(f, y2, reduction="sum")
        return [torch.autograd.grad(loss, f)[0]]
    # mc: replicate curvlinops' RNG stream with marglik's sampling convention
    gen = torch.Generator(device=f2.device).manual_seed(seed)
    V = []
    for _ in range(mc_samples):
        if likelihood == "classification":
            p = f2.softmax(dim=1)
            lab = p.multinomial(num_samples=1, generator=gen).squeeze(-1)
            v = p - F.one_hot(lab, C).to(p.dtype)
        elif likelihood == "regression":
            eps = torch.randn(f2.shape, dtype=f2.dtype, device=f2.device, generator=gen)
            v = f2 - (f2 + eps)  # y ~ N(f, I), gradient of 0.5 ||y - f||^2
        else:
            s = f2.sigmoid()
            v = s - s.bernoulli(generator=gen)
        V.append(v / math.sqrt(mc_samples))
    return V


def brute_kfac(model, likelihood, X, y, approx, fisher_type, mc_samples=1, seed=0, sqrt="curvlinops"):
    lik = canonical_likelihood(likelihood)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    store = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, (i[0].detach(), o)))
        for n, m in mods.items()
    ]
    f = model(X)
    for h in hooks:
        h.remove()
    C = f.shape[-1]
    f2 = f.reshape(-1, C)
    y2 = y.reshape(-1) if lik == "classification" else y.reshape(-1, C)
    names = list(mods)
    outs = [store[n][1] for n in names]

    B = {n: 0 for n in names}
    V = _backprop_vectors(lik, f2, y2, fisher_type, mc_samples, seed, sqrt)
    for k, v in enumerate(V):
        grads = torch.autograd.grad((f2 * v).sum(), outs, retain_graph=k < len(V) - 1)
        for n, g in zip(names, grads):
            g = _outputs(mods[n], g)
            if approx == "reduce":
                g = g.sum(1, keepdim=True)
            g = g.reshape(-1, g.shape[-1])
            B[n] = B[n] + g.T @ g

    res = {}
    for n in names:
        a = _inputs(mods[n], store[n][0])
        if mods[n].bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
        if approx == "reduce":
            a = a.mean(1, keepdim=True)
        a = a.reshape(-1, a.shape[-1])
        res[n] = (a.T @ a / a.shape[0], B[n])
    return res


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


def mlp(C):
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, C))


class ConvNet(nn.Module):
    """Conv2d -> ReLU -> 1x1 Conv2d, output (N, R, C)."""

    def __init__(self, C):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, C, 1)

    def forward(self, x):
        return self.c2(self.c1(x).relu()).flatten(2).transpose(1, 2)


class ConvPoolNet(nn.Module):
    """Conv2d (dilated) -> ReLU -> mean pool -> Linear, output (N, C)."""

    def __init__(self, C):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 2, dilation=2, padding=1)
        self.head = nn.Linear(3, C)

    def forward(self, x):
        return self.head(self.c1(x).relu().mean((-2, -1)))


def _setup(kind, likelihood, seed=0):
    torch.manual_seed(seed)
    C = 1 if likelihood == "binary" else 3
    if kind == "mlp":
        model, X = mlp(C), torch.randn(4, 3, 3)
    elif kind == "conv":
        model, X = ConvNet(C), torch.randn(3, 2, 5, 5)
    else:
        model, X = ConvPoolNet(C), torch.randn(3, 2, 4, 4)
    model, X = model.to(DT), X.to(DT)
    y = make_targets(likelihood, model(X).detach())
    return model, X, y


def _assert_factors_match(ours, ref):
    assert set(ours) == set(ref)
    for n in ref:
        A, B = ours[n]
        Ar, Br = ref[n]
        torch.testing.assert_close(A, Ar, msg=f"A of {n}")
        torch.testing.assert_close(B, Br, msg=f"B of {n}")


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------

LIKS = ["classification", "regression", "binary"]


@pytest.mark.parametrize("kind", ["mlp", "conv", "convpool"])
@pytest.mark.parametrize("likelihood", LIKS)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "mc"])
def test_conversion_against_brute_force(kind, likelihood, approx, fisher_type):
    model, X, y = _setup(kind, likelihood)
    mc = 3 if fisher_type == "mc" else 1
    ours = curvlinops_factors(model, likelihood, X, y, approx, fisher_type, mc_samples=mc, seed=7)
    ref = brute_kfac(model, likelihood, X, y, approx, fisher_type, mc_samples=mc, seed=7)
    _assert_factors_match(ours, ref)


@pytest.mark.parametrize("likelihood", LIKS)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "mc"])
def test_mean_reduction_and_batches(likelihood, fisher_type):
    """``reduction='mean'`` converts to the same factors; several batches accumulate."""
    model, X, y = _setup("mlp", likelihood, seed=1)
    base = curvlinops_factors(model, likelihood, X, y, "expand", fisher_type, seed=3)
    mean = curvlinops_factors(model, likelihood, X, y, "expand", fisher_type, seed=3, reduction="mean")
    _assert_factors_match(mean, base)
    if fisher_type != "mc":  # mc draws differ per batch shape; deterministic types must agree
        for approx in ["expand", "reduce"]:
            full = curvlinops_factors(model, likelihood, X, y, approx, fisher_type)
            split = curvlinops_factors(model, likelihood, X, y, approx, fisher_type, batch_size=2)
            _assert_factors_match(split, full)


def test_frozen_parameters():
    model, X, y = _setup("mlp", "classification", seed=2)
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    ours = curvlinops_factors(model, "classification", X, y, "expand")
    ref = brute_kfac(model, "classification", X, y, "expand", "type-2")
    assert ours["0"][0].shape == (3, 3)  # no bias column
    torch.testing.assert_close(ours["0"][0], ref["0"][0][:3, :3])
    torch.testing.assert_close(ours["0"][1], ref["0"][1])
    torch.testing.assert_close(ours["2"][0], torch.ones(1, 1, dtype=DT))
    torch.testing.assert_close(ours["2"][1], ref["2"][1])


@pytest.mark.parametrize(
    "make, approx, shape",
    [
        (lambda: DeepLinearExpand(3, (4, 3), 2), "expand", (4, 3, 3)),
        (lambda: DeepLinearReduce(3, (4,), 2), "reduce", (4, 3, 3)),
        (lambda: ConvExpand(2, hidden=(3,), kernel_size=2, stride=2, padding=1), "expand", (3, 2, 4, 4)),
        (lambda: ConvReduce(2, kernel_size=3, stride=2, padding=1), "reduce", (3, 2, 5, 5)),
    ],
)
def test_exact_for_deep_linear_gaussian(make, approx, shape):
    """K-FAC-expand/-reduce are exact for deep linear nets in their setting (Gaussian)."""
    torch.manual_seed(5)
    model = make().to(DT)
    X = torch.randn(*shape, dtype=DT)
    y = make_targets("regression", model(X).detach())
    G = exact_ggn(model, "regression", X, y)
    facs = curvlinops_factors(model, "regression", X, y, approx, "type-2")
    mods = dict(model.named_modules())
    for name, (A, B) in facs.items():
        idx = module_indices(model, name)
        blockG = G[idx][:, idx]
        K = kron_to_param_order(A, B, mods[name].weight.shape, mods[name].bias is not None)
        torch.testing.assert_close(K, blockG, msg=name)


def test_type2_root_dependence():
    """Type-2 B depends on the choice of Hessian square root iff loss positions get mixed.

    With one loss position per example (``(N, C)`` output) any root gives the same B; with
    ``(N, R, C)`` outputs and K-FAC-reduce curvlinops' batched backprop of column ``k`` of every
    position's root creates root-dependent cross terms between positions.
    """
    model, X, y = _setup("convpool", "classification")
    a = brute_kfac(model, "classification", X, y, "reduce", "type-2", sqrt="curvlinops")
    b = brute_kfac(model, "classification", X, y, "reduce", "type-2", sqrt="sym")
    _assert_factors_match(a, b)

    model, X, y = _setup("mlp", "classification")
    a = brute_kfac(model, "classification", X, y, "reduce", "type-2", sqrt="curvlinops")
    b = brute_kfac(model, "classification", X, y, "reduce", "type-2", sqrt="sym")
    assert not torch.allclose(a["0"][1], b["0"][1], rtol=1e-2, atol=1e-6)
    # expand on a per-position MLP does not mix positions: root-independent
    a = brute_kfac(model, "classification", X, y, "expand", "type-2", sqrt="curvlinops")
    b = brute_kfac(model, "classification", X, y, "expand", "type-2", sqrt="sym")
    _assert_factors_match(a, b)
