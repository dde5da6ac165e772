"""torchvision's classification families, as shipped (in-place ReLUs, residual ``+=``), end to end.

Per family (tiny float64 instances of torchvision's own classes, ``tests/zoo_cases.py``):

* every trainable parameter gets a block, and recording leaves the model as it was (same output,
  same buffers, no hook left);
* every ungrouped ``Conv2d`` / ``Linear`` block equals curvlinops' K-FAC factors (1e-8);
* every per-channel block (BatchNorm, LayerNorm, ConvNeXt's ``LayerNorm2d``) equals the exact
  GGN's entries coupling one channel's weight and bias, and every dense leaf block (ConvNeXt's
  ``layer_scale``, ViT's class token and positional embedding, MaxViT's and Swin's relative-position
  bias tables) the exact GGN block, from ``torch.func`` Jacobians (1e-10): their flavour is exact.
  Not referenced independently: grouped convolutions (curvlinops has none; ``tests/test_kfac_exact.py``
  covers them) and Swin's ``qkv`` / ``proj``, recorded through the attention's functional calls;
* ``KronLaplace``: a finite log marginal likelihood whose gradient w.r.t. the layerwise log prior
  precision matches central finite differences, and a GLM predictive that is a distribution.
"""

from __future__ import annotations

import pytest
import torch
import zoo_cases as Z
from curvlinops_ref import curvlinops_factors
from reference import exact_ggn
from torch import nn

import marglik
from marglik.curvature.kron import DiagonalBlock
from marglik.curvature.module_selection import uses_children_functionally

FAMILIES = list(Z.BUILDERS)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _curvlinops_params(model):
    """Parameters of the modules curvlinops covers: ungrouped Conv2d and Linear called as modules (not
    MultiheadAttention's out_proj, not Swin's qkv / proj, whose weights their attention uses functionally)."""
    functional = {id(c) for m in model.modules() if uses_children_functionally(m) for c in m.children()}
    return [
        p for m in model.modules()
        if ((isinstance(m, nn.Conv2d) and m.groups == 1) or type(m) is nn.Linear) and id(m) not in functional
        for p in m.parameters(recurse=False)
    ]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_blocks_exact_and_model_untouched(name, float64):
    model = Z.build(name)
    X, y = Z.data(name)
    with torch.no_grad():
        before = model(X)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    kron = marglik.KFAC(model, approx="expand").fit((X, y))

    with torch.no_grad():
        assert torch.equal(model(X), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _hooks(model) == hooks
    assert {id(p) for p in kron.params} == {id(p) for p in model.parameters()}  # everything covered

    ref = curvlinops_factors(model, "classification", X, y, params=_curvlinops_params(model))
    assert ref, "no curvlinops-covered layer"
    for b in kron.blocks:
        if b.name in ref:
            A, B = ref[b.name]
            assert _rel(b.A[0], A) < 1e-8, b.name
            assert _rel(b.B[0], B) < 1e-8, b.name

    exact = [b for b in kron.blocks if isinstance(b, DiagonalBlock) or (b.weight is None and b.name not in ref
                                                                          and b.A.shape[-1] == 1)]
    if name == "squeezenet1_1":
        assert not exact  # no norm layer, no raw parameter: curvlinops covers every block
        return
    params = [p for b in exact for p in b.params]
    G = exact_ggn(model, "classification", X, y, params=params)
    start = 0
    for b in exact:
        n = b.num_params
        Gb = G[start : start + n, start : start + n]
        if isinstance(b, DiagonalBlock):  # exact per channel: the GGN's entries coupling one channel's (w, b)
            ch = torch.arange(n) % b.blocks.shape[0]
            Gb = Gb * (ch[:, None] == ch[None, :])
        assert _rel(b.to_dense(), Gb) < 1e-10, b.name
        start += n


@pytest.mark.parametrize("name", FAMILIES)
def test_family_laplace(name, float64):
    model = Z.build(name)
    X, y = Z.data(name)
    la = marglik.KronLaplace(model, "classification").fit((X, y))
    log_prior = torch.linspace(-1.0, 1.0, la.n_layers, dtype=torch.float64).requires_grad_(True)

    def lml(lp):
        return la.log_marginal_likelihood(prior_precision=lp.exp())

    value = lml(log_prior)
    assert torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, log_prior)
    eps = 1e-6
    for i in (0, la.n_layers // 2, la.n_layers - 1):
        e = torch.zeros_like(log_prior)
        e[i] = eps
        with torch.no_grad():
            fd = (lml(log_prior + e) - lml(log_prior - e)) / (2 * eps)
        assert abs(fd.item() - grad[i].item()) < 1e-6 * max(1.0, abs(fd.item())), (name, i)
    probs = la(X[:2], link_approx="probit")
    assert probs.shape == (2, Z.C)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, dtype=torch.float64))
