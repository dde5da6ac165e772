"""laplace-torch's own last-layer and subnetwork test cases, run with marglik's backends.

The cases of laplace-torch's ``tests/test_lllaplace.py`` and ``tests/test_subnetlaplace.py`` that
exercise a backend (fit, log likelihood, closed-form log marginal likelihood, last-layer Jacobians,
functional variance, predictives, subnetwork masks, samples), rewritten and parametrized over
:class:`MarglikGGN`, :class:`MarglikEF` and their reduce defaults. Plus laplace-torch's
``marglik_training`` with a ready-made reduce backend.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Normal
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", category=FutureWarning)
laplace = pytest.importorskip("laplace")
from laplace import Laplace, marglik_training  # noqa: E402
from laplace.lllaplace import DiagLLLaplace, FullLLLaplace, KronLLLaplace  # noqa: E402
from laplace.subnetlaplace import SubnetLaplace  # noqa: E402
from laplace.utils import (  # noqa: E402
    FeatureExtractor,
    LargestMagnitudeSubnetMask,
    LastLayerSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
)

from marglik import MarglikEF, MarglikEFReduce, MarglikGGN, MarglikGGNReduce  # noqa: E402

DT = torch.float64
BACKENDS = [MarglikGGN, MarglikEF, MarglikGGNReduce, MarglikEFReduce]
LL_FLAVOURS = [FullLLLaplace, KronLLLaplace, DiagLLLaplace]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def two_layer() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(3, 20), nn.Linear(20, 2)).to(DT)


def loader(likelihood: str) -> DataLoader:
    g = torch.Generator().manual_seed(11)
    X = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.randint(2, (10,), generator=g) if likelihood == "classification" else torch.randn(
        10, 2, generator=g, dtype=DT)
    return DataLoader(TensorDataset(X, y), batch_size=3)


# ------------------------------------------------------------------ last layer


@pytest.mark.parametrize("Backend", BACKENDS)
@pytest.mark.parametrize("flavour", LL_FLAVOURS)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_ll_functionality(Backend, flavour, likelihood):
    """Fit, log likelihood, the log marginal likelihood against its closed form from the posterior
    precision, last-layer Jacobians against autograd, and the functional variance J Sigma J^T."""
    model = two_layer()
    dl = loader(likelihood)
    sigma = 1.0 if likelihood == "classification" else 0.3
    lap = flavour(model, likelihood, sigma_noise=sigma, prior_precision=0.7, backend=Backend)
    lap.fit(dl)
    X, y = dl.dataset.tensors
    f = model(X).detach()
    assert lap.n_data == 10 and lap.n_outputs == 2
    loglik = Categorical(logits=f).log_prob(y).sum() if likelihood == "classification" else Normal(
        f, sigma).log_prob(y).sum()
    torch.testing.assert_close(lap.log_likelihood, loglik)

    fe = FeatureExtractor(model, last_layer_name="1")
    theta = parameters_to_vector(fe.last_layer.parameters()).detach()
    torch.testing.assert_close(theta, lap.mean)
    P0 = torch.diag(lap.prior_precision_diag)
    logdet_post = lap.posterior_precision.log().sum() if flavour is DiagLLLaplace else lap.posterior_precision.logdet()
    lml = loglik - 0.5 * theta @ P0 @ theta + 0.5 * (P0.logdet() - logdet_post)
    torch.testing.assert_close(lap.log_marginal_likelihood(), lml)

    _, phi = fe.forward_with_features(X)
    J = torch.func.vmap(torch.func.jacrev(lambda p, x: torch.func.functional_call(fe.last_layer, p, (x,))),
                        in_dims=(None, 0))(dict(fe.last_layer.named_parameters()), phi.detach())
    J = torch.cat([J["weight"].flatten(2), J["bias"]], dim=-1)  # (N, C, P)
    Js, f_ll = lap.backend.last_layer_jacobians(X)
    torch.testing.assert_close(Js, J)
    torch.testing.assert_close(f_ll, f)
    if flavour is FullLLLaplace:
        Sigma = lap.posterior_covariance
    elif flavour is KronLLLaplace:
        Sigma = lap.posterior_precision.to_matrix(exponent=-1)
    else:
        Sigma = torch.diag(lap.posterior_variance)
    torch.testing.assert_close(lap.functional_variance(Js), torch.einsum("mkp,pq,mcq->mkc", J, Sigma, J))

    torch.manual_seed(61)
    samples = lap.sample(n_samples=20000)
    assert samples.shape == (20000, len(theta))
    torch.testing.assert_close(samples.mean(0), lap.mean, atol=0.05, rtol=0)


@pytest.mark.parametrize("Backend", BACKENDS)
@pytest.mark.parametrize("flavour", LL_FLAVOURS)
def test_ll_predictives(Backend, flavour):
    model = two_layer()
    dl = loader("regression")
    lap = flavour(model, "regression", sigma_noise=0.3, prior_precision=0.7, backend=Backend)
    lap.fit(dl)
    X = dl.dataset.tensors[0]
    f = model(X).detach()
    with pytest.raises(ValueError):
        lap(X, pred_type="linear")
    f_mu, f_var = lap(X, pred_type="glm")
    torch.testing.assert_close(f_mu, f)
    assert f_var.shape == (10, 2, 2)
    f_mu, f_var = lap(X, pred_type="nn", link_approx="mc")
    assert f_mu.shape == f_var.shape == (10, 2)
    assert lap.predictive_samples(X, pred_type="glm", n_samples=7).shape == (7, 10, 2)

    dl = loader("classification")
    lap = flavour(model, "classification", prior_precision=0.7, backend=Backend)
    lap.fit(dl)
    for kw in (dict(link_approx="mc", n_samples=50), dict(link_approx="probit"), dict(link_approx="bridge"),
               dict(link_approx="bridge_norm")):
        p = lap(X, pred_type="glm", **kw)
        assert p.shape == (10, 2)
        torch.testing.assert_close(p.sum(-1), torch.ones(10, dtype=DT))
    p = lap(X, pred_type="nn", link_approx="mc", n_samples=50)
    torch.testing.assert_close(p.sum(-1), torch.ones(10, dtype=DT))


# ------------------------------------------------------------------ subnetwork


def subnet(model, likelihood, indices, structure, Backend):
    lap = Laplace(model, likelihood, subset_of_weights="subnetwork", subnetwork_indices=indices,
                  hessian_structure=structure, backend=Backend)
    lap.fit(loader(likelihood))
    return lap


@pytest.mark.parametrize("Backend", [MarglikGGN, MarglikEF])
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_subnet_layer_masks_equal_last_layer(Backend, structure, likelihood):
    """A subnetwork over the last layer's parameters (by parameter names, module name or
    LastLayerSubnetMask) has the last-layer Laplace's Hessian; one over all parameters has the
    all-weights Hessian; custom indices fit with the right shapes."""
    model = two_layer()
    dl = loader(likelihood)
    ll = Laplace(model, likelihood, subset_of_weights="last_layer", hessian_structure=structure, backend=Backend)
    ll.fit(dl)
    masks = [ParamNameSubnetMask(model, parameter_names=["1.weight", "1.bias"]),
             ModuleNameSubnetMask(model, module_names=["1"]), LastLayerSubnetMask(model)]
    for mask in masks:
        mask.select(dl)
        lap = subnet(model, likelihood, mask.indices, structure, Backend)
        assert isinstance(lap, SubnetLaplace) and lap.n_params_subnet == 42
        torch.testing.assert_close(lap.H, ll.H, rtol=1e-10, atol=1e-12)
    P = sum(p.numel() for p in model.parameters())
    lap = subnet(model, likelihood, torch.arange(P), structure, Backend)
    full = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, backend=Backend)
    full.fit(dl)
    torch.testing.assert_close(lap.H, full.H, rtol=1e-10, atol=1e-12)
    idx = torch.LongTensor([0, 5, 11, 42])
    lap = subnet(model, likelihood, idx, structure, Backend)
    assert lap.H.shape == ((4, 4) if structure == "full" else (4,))
    assert lap.backend.subnetwork_indices.equal(idx)
    assert torch.isfinite(lap.log_marginal_likelihood())


@pytest.mark.parametrize("Backend", [MarglikGGN, MarglikEF])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_subnet_predictive_and_samples(Backend, structure):
    model = two_layer()
    dl = loader("classification")
    mask = LargestMagnitudeSubnetMask(model, n_params_subnet=32)
    mask.select(dl)
    lap = subnet(model, "classification", mask.indices, structure, Backend)
    X = dl.dataset.tensors[0]
    for kw in (dict(link_approx="probit"), dict(link_approx="bridge"), dict(link_approx="mc", n_samples=30)):
        torch.testing.assert_close(lap(X, pred_type="glm", **kw).sum(-1), torch.ones(10, dtype=DT))
    g = torch.Generator().manual_seed(123)
    s1 = lap.sample(n_samples=20, generator=g)
    theta = parameters_to_vector(model.parameters()).detach()
    fixed = torch.ones(len(theta), dtype=torch.bool)
    fixed[mask.indices] = False
    assert (s1[:, fixed] == theta[fixed]).all()
    assert not (s1[:, ~fixed] == theta[~fixed]).all()
    assert torch.isfinite(lap.log_marginal_likelihood())


# ------------------------------------------------------------------ marglik_training


class _Tokens(nn.Module):
    """``(N, 4, 3) -> (N, 2)``: per-token layers, logits averaged over the tokens (expand != reduce)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Linear(3, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x))).mean(1)


def test_marglik_training_with_reduce_backend():
    """laplace-torch's ``marglik_training`` takes ``backend=MarglikGGNReduce`` (it passes no
    backend kwargs): the returned Laplace is reduce K-FAC, equal to ``MarglikGGN(approx="reduce")``
    refitted at the trained weights and prior, and unequal to the expand one."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 4, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (24,), generator=g)
    dl = DataLoader(TensorDataset(X, y), batch_size=8)
    model = _Tokens().to(DT)
    lap, model, margliks, losses = marglik_training(
        model, dl, "classification", hessian_structure="kron", backend=MarglikGGNReduce, n_epochs=4,
        n_hypersteps=5, marglik_frequency=2, optimizer_kwargs={"lr": 1e-2})
    assert isinstance(lap.backend, MarglikGGNReduce) and lap.backend.approx.value == "reduce"
    assert len(margliks) > 0 and all(torch.isfinite(torch.as_tensor(m)) for m in margliks)
    assert len(losses) == 4

    def refit(approx):
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                     backend=MarglikGGN, backend_kwargs={"approx": approx}, prior_precision=lap.prior_precision)
        la.fit(dl)
        return la

    reduce, expand = refit("reduce"), refit("expand")
    torch.testing.assert_close(lap.H.to_matrix(), reduce.H.to_matrix(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lap.log_marginal_likelihood(), reduce.log_marginal_likelihood())
    assert not torch.allclose(lap.H.to_matrix(), expand.H.to_matrix(), rtol=1e-3, atol=1e-6)
