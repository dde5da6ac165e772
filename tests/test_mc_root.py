"""``fisher_type="mc-root"``: the loss Hessian's root times Rademacher signs
(:func:`marglik.curvature.likelihoods.root_times`). Checked exactly in float64 by enumerating every
sign vector: its columns' outer products average to the type-2 Hessian (the K-FAC factors' convergence
for every likelihood: ``tests/test_kfac_features.py::test_mc_converges_to_type2``), and so do their derivatives
with respect to what the outputs depend on, which the sampled-label ``mc`` columns' derivatives do not
(the negative control, and the reason the tuning default is ``mc-root``)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from test_tuning import tiny

import marglik
from marglik.curvature.likelihoods import _hessian_sqrt, _loss_grad, root_times
from marglik.curvature.options import Likelihood
from marglik.tuning import Config, ConfigError


def all_signs(C: int) -> torch.Tensor:
    """Every Rademacher vector of length ``C``: ``(2**C, C)``, each equally likely."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=C)), dtype=torch.float64)


def expected_outer(likelihood: Likelihood, f: torch.Tensor) -> torch.Tensor:
    """``E_z[(R z)(R z)^T]`` per position, exactly: the mean over all sign vectors."""
    Z = all_signs(f.shape[-1])
    cols = torch.stack([root_times(likelihood, f, z.expand(1, *f.shape))[0] for z in Z])  # (2^C, *f, C)
    return torch.einsum("k...i,k...j->...ij", cols, cols) / len(Z)


def hessian(likelihood: Likelihood, f: torch.Tensor) -> torch.Tensor:
    """The loss Hessian per position from the type-2 root (``sum_k S_k S_k^T``)."""
    S = _hessian_sqrt(likelihood, f)
    return torch.einsum("k...i,k...j->...ij", S, S)


@pytest.mark.parametrize("likelihood, shape", [
    ("classification", (5, 4)), ("classification", (3, 2, 4)), ("regression", (5, 3)), ("binary", (5, 1)),
])
def test_signs_average_to_the_loss_hessian(likelihood, shape, float64):
    lik = Likelihood(likelihood)
    f = torch.randn(*shape)
    assert torch.allclose(expected_outer(lik, f), hessian(lik, f), atol=1e-12)


def test_derivative_is_unbiased_and_sampled_labels_miss_the_prediction_term(float64):
    """d/dtheta of a linear functional of the output curvature, with the draw held fixed (what a
    hyperstep's autograd does): averaged over the sign vectors it equals the derivative of the exact
    Hessian; averaged over labels drawn from the (detached) predictive, the sampled-label columns'
    derivative is zero in expectation for the prediction term and misses ``d Lambda``."""
    torch.manual_seed(0)
    C = 4
    x, W = torch.randn(6, 3), torch.randn(3, C)
    M = torch.randn(C, C)
    theta = torch.tensor(0.7, requires_grad=True)
    lik = Likelihood.CLASSIFICATION

    def f_of(th):
        return (x * th) @ W  # outputs depending on a hyperparameter, like an augmentation range

    def grad(value):
        (g,) = torch.autograd.grad(value, theta)
        return g

    exact = grad((hessian(lik, f_of(theta)) * M).sum())
    root = grad((expected_outer(lik, f_of(theta)) * M).sum())
    assert torch.allclose(root, exact, rtol=1e-10)

    f = f_of(theta)
    p = torch.softmax(f, -1).detach()
    sampled = 0.0
    for y in range(C):  # E_y[.] with y ~ Cat(p) (p without gradient, as the sampler draws it)
        g = _loss_grad(lik, f, torch.full((f.shape[0],), y))
        sampled = sampled + (p[:, y, None, None] * g[:, :, None] * g[:, None, :] * M).sum()
    # the value agrees (both are unbiased for the Hessian) ...
    assert torch.allclose(sampled, (hessian(lik, f) * M).sum(), rtol=1e-10)
    # ... the derivative does not: the sampled-label one is zero in expectation through p
    assert abs(grad(sampled)) < 1e-12 and abs(exact) > 0.1


def test_augmentation_gradient_matches_type2_in_expectation(float64):
    """Through the engine: the eta gradient of a linear functional of the differentiable factors
    (B weighted by random numbers; the plain sum would hide ``d Lambda``, since ``Lambda 1 = 0``) under mc-root with many sign vectors matches type-2's; under sampled labels it does not."""
    from marglik.augment import AffineAugmentation

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, 3))
    X, y = 3 * torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))  # confident predictions: d Lambda is large
    aug = AffineAugmentation(1, ["rotation"]).double()
    with torch.no_grad():
        aug.eta.fill_(0.6)
    eps = aug.sample_eps(4, torch.Generator().manual_seed(2))  # one fixed rotation per image

    def eta_grad(fisher_type, samples):
        kfac = marglik.KFAC(model, "classification", approx="expand", fisher_type=fisher_type, mc_samples=samples,
                            generator=torch.Generator().manual_seed(1), differentiable=True)
        aug.eta.grad = None
        kron = kfac.fit((aug(X, eps=eps)[:, 0], y))
        weights = torch.Generator().manual_seed(4)  # a random linear functional of every B
        sum((b.B * torch.randn(b.B.shape, generator=weights, dtype=b.B.dtype)).sum() for b in kron.blocks).backward()
        return float(aug.eta.grad[0])

    exact = eta_grad("type-2", 1)
    assert abs(eta_grad("mc-root", 4000) - exact) < 0.05 * abs(exact)
    assert abs(eta_grad("mc", 4000) - exact) > 0.2 * abs(exact)


def test_mc_root_with_a_peer_backend_is_a_one_line_config_error():
    """laplace-torch's backends have no mc-root; hyper.batchwise takes it (tests/test_batchwise.py)."""
    with pytest.raises(ConfigError, match="curvature.fisher_type") as err:
        tiny(curvature={"fisher_type": "mc-root", "backend": "curvlinops"}, hyper={"augmentation": False})
    assert "mc-root" in str(err.value) and "\n" not in str(err.value)
    tiny(curvature={"fisher_type": "mc-root"}, hyper={"batchwise": True})  # no error


def test_the_default_resolves_per_backend():
    """``curvature.fisher_type`` left null is mc-root for marglik's own K-FAC and mc for a laplace-torch
    peer (which has no mc-root), from Python and from the CLI's composed config; a stated value stays."""
    from test_config import _compose

    peer = {"curvature": {"backend": "curvlinops"}, "hyper": {"augmentation": False}}
    assert Config.from_dict().curvature.fisher_type == "mc-root"
    assert Config.from_dict(**peer).curvature.fisher_type == "mc"
    assert Config.from_dict(_compose(["curvature.backend=curvlinops", "hyper.augmentation=false"])).curvature.fisher_type == "mc"
    assert Config.from_dict(_compose()).curvature.fisher_type == "mc-root"
    assert Config.from_dict(curvature={"backend": "curvlinops", "fisher_type": "type-2"},
                            hyper={"augmentation": False}).curvature.fisher_type == "type-2"
