"""laplace-torch's ``subset_of_weights="last_layer"`` / ``"subnetwork"`` with marglik's backends.

References: laplace-torch's own backends on the same quantity (CurvlinopsGGN/EF, AsdlGGN/EF), and
the exact last-layer GGN / EF from ``torch.func`` in float64. Compared: the curvature laplace-torch
accumulates (``H``), the loss, the log marginal likelihood and its gradient in the prior precision.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", category=FutureWarning)
laplace = pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402
from laplace.curvature import AsdlEF, AsdlGGN, CurvlinopsEF, CurvlinopsGGN  # noqa: E402
from laplace.utils import FeatureExtractor  # noqa: E402
from test_laplace_torch import DT, loader  # noqa: E402

from marglik import MarglikEF, MarglikEFReduce, MarglikGGN, MarglikGGNReduce  # noqa: E402

OURS = (MarglikGGN, MarglikEF, MarglikGGNReduce, MarglikEFReduce)


def mlp(C: int) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)


class TokenNet(nn.Module):
    """``(N, T, 3) -> (N, C)``: a per-token MLP whose head is applied at every token, logits averaged."""

    def __init__(self, C: int) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Linear(3, 4)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x))).mean(1)


def data(model, likelihood, shape=(3,), N=10, bs=4, seed=0):
    return loader(model, likelihood, N=N, bs=bs, seed=seed, shape=shape)


def fit(model, likelihood, backend, dl, subset="last_layer", structure="kron", approx=None, **kw):
    backend_kwargs = {"approx": approx} if approx is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(model, likelihood, subset_of_weights=subset, hessian_structure=structure, backend=backend,
                     backend_kwargs=backend_kwargs, **kw)
        la.fit(dl)
    return la


def H_of(la):
    """The accumulated curvature as a dense matrix (Kron: its factors' Kronecker products), or its diagonal."""
    H = la.H_facs if getattr(la, "H_facs", None) is not None else la.H
    return H.to_matrix() if hasattr(H, "to_matrix") else H


def lml_and_grad(la, prior):
    p = prior.clone().requires_grad_(True)
    lml = la.log_marginal_likelihood(prior_precision=p)
    (g,) = torch.autograd.grad(lml, p)
    return lml.detach(), g


def assert_same(ours, ref, prior, curv_scale=1.0, rtol=1e-10, atol=1e-11):
    """``H``, loss, log marglik and its prior gradient agree (``curv_scale`` * ours = ref for the H)."""
    torch.testing.assert_close(curv_scale * H_of(ours), H_of(ref), rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.as_tensor(ours.loss), torch.as_tensor(ref.loss), rtol=rtol, atol=atol)
    if curv_scale == 1.0:
        for a, b in zip(lml_and_grad(ours, prior), lml_and_grad(ref, prior)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ last layer, Kronecker


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_last_layer_kron_equals_peers_on_mlp(likelihood, kind):
    """Plain MLP: the head sees one position per example, so expand = reduce = the peers' K-FAC."""
    C = 3 if likelihood == "classification" else 2
    model = mlp(C)
    dl = data(model, likelihood)
    kw = dict(prior_precision=0.7, temperature=0.9,
              sigma_noise=0.8 if likelihood == "regression" else 1.0)
    prior = torch.tensor([1.6], dtype=DT)
    Ours, Refs = {"ggn": (MarglikGGN, (CurvlinopsGGN, AsdlGGN)), "ef": (MarglikEF, (CurvlinopsEF, AsdlEF))}[kind]
    expand = fit(model, likelihood, Ours, dl, approx="expand", **kw)
    reduce = fit(model, likelihood, Ours, dl, approx="reduce", **kw)
    assert_same(reduce, expand, prior)
    for Ref in Refs:
        ref = fit(model, likelihood, Ref, dl, **kw)
        # marglik's EF is that of 0.5 ||y - f||^2; laplace-torch's EF backends square MSELoss's gradients
        scale = 2.0 if (kind == "ef" and likelihood == "regression") else 1.0
        assert_same(expand, ref, prior, curv_scale=scale)
    assert H_of(expand).abs().max() > 1e-3  # not the all-zero curvature


def exact_curvature(model, params, X, y, likelihood, kind):
    """The exact GGN (``kind="ggn"``) or EF of marglik's summed NLL over ``params`` (in
    ``model.parameters()`` order, flattened and concatenated), by ``torch.func`` in float64."""
    inside = {id(p) for p in params}
    named = {n: p.detach() for n, p in model.named_parameters() if id(p) in inside}

    def f(pr, x):
        return torch.func.functional_call(model, pr, (x[None],))[0]

    J = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(named, X)
    J = torch.cat([J[n].flatten(2) for n in named], dim=-1)  # (N, C, P)
    with torch.no_grad():
        out = model(X)
    if kind == "ef":
        r = (out.softmax(-1) - nn.functional.one_hot(y, out.shape[-1])) if likelihood == "classification" else out - y
        G = torch.einsum("nc,ncp->np", r, J)
        return G.T @ G
    if likelihood == "classification":
        p = out.softmax(-1)
        L = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return torch.einsum("ncp,nck,nkq->pq", J, L, J)
    return torch.einsum("ncp,ncq->pq", J, J)


def drop_weight_bias_coupling(H, n_weight):
    H = H.clone()
    H[:n_weight, n_weight:] = 0
    H[n_weight:, :n_weight] = 0
    return H


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_last_layer_tokens_expand_and_reduce(likelihood, kind):
    """A head applied at T=5 tokens, logits averaged: expand = laplace-torch's Curvlinops backend
    (K-FAC over the whole network), reduce = its ASDL backend on the averaged features
    (``feature_reduction="average"``) = curvlinops' ``kfac_approx="reduce"``; the two differ."""
    C = 3 if likelihood == "classification" else 2
    model = TokenNet(C).to(DT)
    dl = data(model, likelihood, shape=(5, 3))
    kw = dict(prior_precision=0.7, last_layer_name="head",
              sigma_noise=0.8 if likelihood == "regression" else 1.0)
    prior = torch.tensor([1.6], dtype=DT)
    Expand, Reduce, Curvlinops, Asdl = {
        "ggn": (MarglikGGN, MarglikGGNReduce, CurvlinopsGGN, AsdlGGN),
        "ef": (MarglikEF, MarglikEFReduce, CurvlinopsEF, AsdlEF),
    }[kind]
    scale = 2.0 if (kind == "ef" and likelihood == "regression") else 1.0  # see the MLP test
    expand = fit(model, likelihood, Expand, dl, approx="expand", **kw)
    reduce = fit(model, likelihood, Reduce, dl, **kw)
    assert_same(expand, fit(model, likelihood, Curvlinops, dl, **kw), prior, curv_scale=scale)
    assert_same(reduce, fit(model, likelihood, Asdl, dl, feature_reduction="average", **kw), prior,
                curv_scale=scale)
    # curvlinops' own reduce, through laplace-torch's backend (LLLaplace has no kwargs path for it)
    X, y = dl.dataset.tensors
    be = Curvlinops(FeatureExtractor(model, last_layer_name="head"), likelihood, last_layer=True)
    _, kron = be.kron(X, y, N=len(X), kfac_approx="reduce")
    torch.testing.assert_close(scale * H_of(reduce), kron.to_matrix(), rtol=1e-10, atol=1e-11)
    # negative control: the flavours differ on this model
    assert (H_of(expand) - H_of(reduce)).abs().max() > 1e-3 * H_of(reduce).abs().max()
    if likelihood == "regression" and kind == "ggn":
        # last layer linear in its parameters, constant loss Hessian: reduce is the exact GGN
        # (laplace-torch's Kron drops the weight-bias coupling); expand is not
        exact = drop_weight_bias_coupling(exact_curvature(model, list(model.head.parameters()), X, y, likelihood, "ggn"), 4 * C)
        torch.testing.assert_close(H_of(reduce), exact, rtol=1e-10, atol=1e-11)
        assert (H_of(expand) - exact).abs().max() > 1e-2 * exact.abs().max()


# ------------------------------------------------------------------ last layer, full and diag


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_last_layer_full_and_diag_exact(likelihood, kind, structure):
    """``full`` / ``diag`` on the last layer equal the exact GGN / EF (laplace-torch's ``torch.func``
    path; the EF's parameter names are re-keyed for the ``FeatureExtractor``)."""
    C = 3 if likelihood == "classification" else 2
    model = TokenNet(C).to(DT)
    dl = data(model, likelihood, shape=(5, 3))
    Ours = MarglikGGN if kind == "ggn" else MarglikEF
    la = fit(model, likelihood, Ours, dl, structure=structure, last_layer_name="head",
             feature_reduction="average", prior_precision=0.7)
    X, y = dl.dataset.tensors
    exact = exact_curvature(model, list(model.head.parameters()), X, y, likelihood, kind)
    if kind == "ef" and likelihood == "regression":
        exact = 2 * exact  # laplace-torch's EF interface: 0.5 * (gradients of MSELoss)^2
    ref = exact if structure == "full" else exact.diagonal()
    torch.testing.assert_close(la.H, ref, rtol=1e-10, atol=1e-11)
    assert la.H.abs().max() > 1e-3
    if structure == "diag":  # AsdlGGN / AsdlEF compute diag themselves
        peer = fit(model, likelihood, AsdlGGN if kind == "ggn" else AsdlEF, dl, structure="diag",
                   last_layer_name="head", feature_reduction="average",
                   prior_precision=0.7)
        assert_same(la, peer, torch.tensor([1.6], dtype=DT))


# ------------------------------------------------------------------ subnetwork


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_subnetwork_equals_peers(likelihood, kind, structure):
    C = 3 if likelihood == "classification" else 2
    model = mlp(C)
    dl = data(model, likelihood)
    idx = torch.LongTensor([0, 4, 11, 16, 21, 27, 31])
    prior = torch.tensor([1.6], dtype=DT)
    kw = dict(subnetwork_indices=idx, prior_precision=0.8,
              sigma_noise=0.7 if likelihood == "regression" else 1.0)
    Ours, Refs = {"ggn": (MarglikGGN, (CurvlinopsGGN, AsdlGGN)), "ef": (MarglikEF, (CurvlinopsEF, AsdlEF))}[kind]
    ours = fit(model, likelihood, Ours, dl, subset="subnetwork", structure=structure, **kw)
    for Ref in Refs:
        assert_same(ours, fit(model, likelihood, Ref, dl, subset="subnetwork", structure=structure, **kw), prior)
    # and the exact full-network curvature's sub-block / diagonal
    X, y = dl.dataset.tensors
    exact = exact_curvature(model, list(model.parameters()), X, y, likelihood, kind)
    if kind == "ef" and likelihood == "regression":
        exact = 2 * exact  # laplace-torch's EF interface: 0.5 * (gradients of MSELoss)^2
    sub = exact[idx[:, None], idx[None, :]]
    assert sub.abs().max() > 1e-3
    torch.testing.assert_close(ours.H, sub if structure == "full" else sub.diagonal(), rtol=1e-10, atol=1e-11)


def test_subnetwork_kron_is_refused():
    model = mlp(3)
    be = MarglikGGN(model, "classification", subnetwork_indices=torch.LongTensor([0, 1]))
    with pytest.raises(NotImplementedError, match="SubnetLaplace"):
        be.kron(torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 2, 0]), N=4)
    with pytest.raises(ValueError, match="full or diagonal"):  # laplace-torch's own refusal, before ours
        Laplace(model, "classification", subset_of_weights="subnetwork", hessian_structure="kron",
                subnetwork_indices=torch.LongTensor([0, 1]), backend=MarglikGGN)


# ------------------------------------------------------------------ laplace-torch's default call


@pytest.mark.parametrize("Backend", OURS)
def test_default_call(Backend):
    """``Laplace(model, "classification")`` is last-layer Kron: it runs with every marglik backend."""
    model = mlp(3)
    dl = data(model, "classification")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(model, "classification", backend=Backend)
        la.fit(dl)
        la.optimize_prior_precision(n_steps=5)
    assert torch.isfinite(la.log_marginal_likelihood())
    probs = la(dl.dataset.tensors[0][:4])
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=DT))


def test_subnet_positions():
    """Indices map into the concatenation of the tensors they touch, in the indices' order."""
    from marglik.laplace_torch_subnet import subnet_positions

    touched, pos = subnet_positions([6, 2, 10, 2], torch.tensor([17, 9, 7]))
    assert touched == [1, 2]  # tensors 0 and 3 are not differentiated
    assert pos.tolist() == [11, 3, 1]
    with pytest.raises(ValueError, match="must lie in"):
        subnet_positions([6, 2], torch.tensor([8]))


def test_last_layer_head_without_bias_after_batchnorm():
    """Other modules with parameters (BatchNorm) are left out; a bias-free head is one Kronecker block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 4, bias=False)).to(DT).eval()
    dl = data(model, "classification")
    ours = fit(model, "classification", MarglikGGN, dl)
    assert len(ours.H_facs.kfacs) == 1 and len(ours.H_facs.kfacs[0]) == 2
    for Ref in (CurvlinopsGGN, AsdlGGN):
        assert_same(ours, fit(model, "classification", Ref, dl), torch.tensor([1.6], dtype=DT))


def test_last_layer_torchvision_resnet18():
    """laplace-torch's default call on torchvision's ResNet-18 as shipped (in-place ReLUs and residual
    adds before the head do not matter: only the head is recorded); equal to CurvlinopsGGN in float32."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5).eval()
    X, y = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))
    dl = DataLoader(TensorDataset(X, y), batch_size=3)
    ours = fit(net, "classification", MarglikGGN, dl)
    ref = fit(net, "classification", CurvlinopsGGN, dl)
    Ho, Hr = H_of(ours), H_of(ref)
    assert (Ho - Hr).abs().max() <= 1e-5 * Hr.abs().max()
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-5, atol=1e-4)
