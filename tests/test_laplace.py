"""KronLaplace and the Kron posterior algebra against dense float64 references and laplace-torch.

References: the dense K-FAC posterior precision ``kron.to_dense() / (sigma^2 T) + diag(p)`` with
``torch.linalg.slogdet`` / ``solve``; the loss and Jacobians from ``tests/reference.py``
(``torch.func``, no marglik code); laplace-torch's ``KronLaplace`` with its ``CurvlinopsGGN`` backend.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from reference import jacobian, summed_loss
from torch import nn

from marglik import KFAC, Bias, DecomposedKron, KronLaplace, Scale, kron_logdet, kron_logdet_projected
from marglik.curvature.kron import DiagonalBlock, KronBlock

DT = torch.float64


# ------------------------------------------------------------------------------------------------
# models and data
# ------------------------------------------------------------------------------------------------


def mlp(C: int, D: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)


class Mixed(nn.Module):
    """Conv (bias) + GroupNorm + Scale/Bias + grouped conv + Linear (weight-only) + Linear."""

    def __init__(self, C: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.gconv = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.scale = Scale(1)
        self.bias = Bias(1)
        self.fc1 = nn.Linear(4, 3, bias=False)
        self.fc2 = nn.Linear(3, C)

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv(x)))
        h = torch.tanh(self.gconv(h)).mean((2, 3))
        h = self.bias(self.scale(torch.tanh(self.fc1(h))))
        return self.fc2(h)


def mixed(C: int) -> nn.Module:
    torch.manual_seed(3)
    m = Mixed(C).to(DT)
    with torch.no_grad():
        m.norm.weight.add_(0.3 * torch.randn(4, dtype=DT))
        m.norm.bias.add_(0.3 * torch.randn(4, dtype=DT))
        m.scale.weight.fill_(1.3)
    return m


def data(model: nn.Module, likelihood: str, N: int, in_shape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, *in_shape, generator=g, dtype=DT)
    with torch.no_grad():
        out = model(X)
    if likelihood == "classification":
        y = torch.randint(0, out.shape[-1], (N,), generator=g)
    elif likelihood == "regression":
        y = torch.randn(out.shape, generator=g, dtype=DT)
    else:
        y = torch.randint(0, 2, out.shape, generator=g).to(DT)
    return X, y


def batches(X, y, bs):
    return [(X[i : i + bs], y[i : i + bs]) for i in range(0, X.shape[0], bs)]


def expand_prior(prior: torch.Tensor, params) -> torch.Tensor:
    """Independent expansion of a scalar / layerwise / diagonal prior to the (P,) diagonal."""
    P = sum(p.numel() for p in params)
    if prior.numel() == 1:
        return prior.reshape(1).expand(P)
    if prior.numel() == len(params):
        return torch.cat([v.expand(p.numel()) for v, p in zip(prior.reshape(-1, 1), params)])
    assert prior.numel() == P
    return prior


def dense_log_marglik(la: KronLaplace, X, y, prior, sigma=1.0, T=1.0, prior_mean=0.0):
    """Laplace log marglik from the dense K-FAC posterior precision (slogdet) and reference loss."""
    params = la.kron.params
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    loss = summed_loss(la.model(X).detach(), y, la.likelihood.value)
    p = expand_prior(torch.as_tensor(prior, dtype=DT), params)
    s = 1.0 / (sigma**2 * T)
    Pm = s * la.kron.to_dense().detach() + torch.diag(p)
    logdet_post = torch.linalg.slogdet(Pm)[1]
    ll = -s * loss
    if la.likelihood.value == "regression":
        ll = ll - y.numel() * math.log(sigma * math.sqrt(2 * math.pi))
    d = theta - prior_mean
    return ll - 0.5 * (logdet_post - p.log().sum()) - 0.5 * (d * p) @ d


# ------------------------------------------------------------------------------------------------
# log marginal likelihood vs dense
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise"])
def test_log_marglik_matches_dense(likelihood, approx, prior_kind):
    C = {"classification": 3, "regression": 2, "binary": 1}[likelihood]
    model = mixed(C)
    X, y = data(model, likelihood, 9, (2, 5, 5))
    L = sum(1 for p in model.parameters())
    prior = torch.tensor(0.8, dtype=DT) if prior_kind == "scalar" else torch.rand(L, dtype=DT) + 0.3
    sigma, T = (0.6, 0.7) if likelihood == "regression" else (1.0, 1.3)
    mean = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT) * 0.1
    la = KronLaplace(model, likelihood, approx=approx, prior_precision=prior, sigma_noise=sigma,
                     temperature=T, prior_mean=mean)
    la.fit(batches(X, y, 4))
    assert la.posterior.exact(prior)
    ref = dense_log_marglik(la, X, y, prior, sigma, T, mean)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref, rtol=1e-10, atol=1e-9)
    # the pieces, too
    assert la.n_data == 9 and la.mean.shape == (la.n_params,)
    torch.testing.assert_close(la.loss, summed_loss(model(X).detach(), y, likelihood))


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise"])
def test_packed_log_det_ratio_all_regimes(scale, prior_kind):
    """All blocks in one padded call: curvature tiny (closed-form tail), mixed, dominant (dense)."""
    model = mixed(3)
    X, y = data(model, "classification", 9, (2, 5, 5))
    dk = DecomposedKron(KFAC(model, "classification", approx="expand").fit((X, y)))
    prior = torch.tensor(0.7, dtype=DT) if prior_kind == "scalar" else torch.rand(dk.n_layers, dtype=DT) + 0.5
    p = expand_prior(prior, dk.params)
    ref = torch.linalg.slogdet(scale * dk.kron.to_dense() + torch.diag(p))[1] - p.log().sum()
    torch.testing.assert_close(dk.logdet_ratio(prior, scale), ref, rtol=1e-10, atol=1e-10)


def test_log_marglik_joint_blocks_differ_from_split():
    """Joint weight-bias blocks keep the cross terms; split_bias drops exactly those."""
    model = mlp(3)
    X, y = data(model, "classification", 8, (4,))
    la = KronLaplace(model, "classification", prior_precision=torch.rand(4, dtype=DT) + 0.5).fit((X, y))
    split = la.kron.split_bias()
    D, Ds = la.kron.to_dense(), split.to_dense()
    mask = torch.zeros_like(D, dtype=torch.bool)
    for blk in split.blocks:
        idx = split.block_indices(blk)
        mask[idx[:, None], idx[None, :]] = True
    torch.testing.assert_close(Ds, torch.where(mask, D, torch.zeros_like(D)))
    assert (D[~mask].abs() > 0).any()
    la2 = KronLaplace(model, "classification", prior_precision=la.prior_precision, separate_bias=True).fit((X, y))
    assert not torch.isclose(la.log_marginal_likelihood(), la2.log_marginal_likelihood())


def test_posterior_block_classes_per_prior_structure():
    """Each block becomes the documented case; ``exact`` follows from the classes."""
    from marglik.curvature.posterior_blocks import (
        ChannelPosterior,
        ConstantPriorKron,
        DenseKron,
        ProjectedPriorKron,
        WeightBiasPriorKron,
    )

    model = mixed(1)  # fc2 has a single output: nB == 1
    X, y = data(model, "regression", 6, (2, 5, 5))
    dk = DecomposedKron(KFAC(model, "regression", approx="expand").fit((X, y)))
    names = [e.block.name for e in dk.kron_blocks] + [d.block.name for d in dk.diag_blocks]
    expected = {
        "scalar": [ConstantPriorKron] * 4 + [ChannelPosterior] * 3,
        "layerwise": [WeightBiasPriorKron, WeightBiasPriorKron, ConstantPriorKron, WeightBiasPriorKron]
        + [ChannelPosterior] * 3,
        "diagonal": [ProjectedPriorKron, ProjectedPriorKron, ProjectedPriorKron, DenseKron] + [ChannelPosterior] * 3,
    }
    assert names == ["conv", "gconv", "fc1", "fc2", "norm", "scale", "bias"]
    for structure, classes in expected.items():
        n = {"scalar": 1, "layerwise": dk.n_layers, "diagonal": dk.n_params}[structure]
        prior = torch.rand(n, dtype=DT) + 0.5
        assert [type(b) for b in dk.posterior_blocks(prior, dk.structure(prior))] == classes
        assert dk.structure(prior) == structure and dk.exact(prior) == (structure != "diagonal")


class DiagExact(nn.Module):
    """Every Kron block has a 1-sized factor (db = 1 or bias-only): a diagonal prior is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.fc1.weight.requires_grad_(False)  # bias-only block (da = 1)
        self.ln = nn.LayerNorm(3)
        self.scale = Scale(3, dim=-1)
        self.fc2 = nn.Linear(3, 1)  # db = 1

    def forward(self, x):
        return self.fc2(self.scale(torch.tanh(self.ln(torch.tanh(self.fc1(x))))))


@pytest.mark.parametrize("likelihood", ["regression", "binary"])
def test_diagonal_prior_exact_where_claimed(likelihood):
    torch.manual_seed(0)
    model = DiagExact().to(DT)
    with torch.no_grad():
        model.ln.weight.add_(0.2 * torch.randn(3, dtype=DT))
    X, y = data(model, likelihood, 7, (4,))
    la = KronLaplace(model, likelihood, approx="expand").fit((X, y))
    prior = torch.rand(la.n_params, dtype=DT) + 0.2
    la.prior_precision = prior
    assert la.prior_structure == "diagonal" and la.posterior.exact(prior)
    kinds = {type(b) for b in la.kron.blocks}
    assert kinds == {KronBlock, DiagonalBlock}
    torch.testing.assert_close(la.log_marginal_likelihood(), dense_log_marglik(la, X, y, prior), rtol=1e-10, atol=1e-9)


def test_diagonal_prior_projection_is_documented_bound():
    """General blocks: the EK-FAC-style projection; >= exact log det, exact for a constant prior."""
    model = mixed(3)
    X, y = data(model, "classification", 9, (2, 5, 5))
    la = KronLaplace(model, "classification").fit((X, y))
    P = la.n_params
    prior = torch.rand(P, dtype=DT) + 0.2
    assert not la.posterior.exact(prior)
    approx = la.posterior.logdet(prior, 1.0)
    exact = torch.linalg.slogdet(la.kron.to_dense() + torch.diag(prior))[1]
    assert approx >= exact - 1e-10
    # explicit reference on factors with distinct eigenvalues: diag of V^T D V in the Kronecker eigenbasis
    torch.manual_seed(0)
    XA, XB = torch.randn(4, 6, dtype=DT), torch.randn(3, 5, dtype=DT)
    A, B = XA @ XA.T, XB @ XB.T
    lA, VA = torch.linalg.eigh(A)
    lB, VB = torch.linalg.eigh(B)
    Delta = torch.rand(3, 4, dtype=DT) + 0.5
    V = torch.kron(VB, VA)
    dt = torch.diagonal(V.T @ torch.diag(Delta.reshape(-1)) @ V)
    ref = torch.log(torch.kron(lB, lA) * 1.7 + dt).sum()
    torch.testing.assert_close(kron_logdet_projected(A, B, 1.7, Delta), ref)
    # degenerate factors: the projection is averaged over each eigenspace (basis-independent)
    QA, _ = torch.linalg.qr(torch.randn(4, 4, dtype=DT))
    QB, _ = torch.linalg.qr(torch.randn(3, 3, dtype=DT))
    la_, lb_ = torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=DT), torch.tensor([1.0, 3.0, 3.0], dtype=DT)
    A, B = QA @ torch.diag(la_) @ QA.T, QB @ torch.diag(lb_) @ QB.T
    ref = 0.0
    for ca in ([0, 1], [2, 3]):
        for cb in ([0], [1, 2]):
            PA, PB = QA[:, ca] @ QA[:, ca].T, QB[:, cb] @ QB[:, cb].T
            mean = (PB.diagonal()[:, None] * Delta * PA.diagonal()[None, :]).sum() / (len(ca) * len(cb))
            ref = ref + len(ca) * len(cb) * torch.log(1.7 * la_[ca[0]] * lb_[cb[0]] + mean)
    torch.testing.assert_close(kron_logdet_projected(A, B, 1.7, Delta), ref)
    assert kron_logdet_projected(A, B, 1.7, Delta) >= torch.linalg.slogdet(
        1.7 * torch.kron(B, A) + torch.diag(Delta.reshape(-1)))[1]
    # constant diagonal prior == scalar prior (exact)
    const = torch.full((P,), 0.9, dtype=DT)
    torch.testing.assert_close(la.posterior.logdet(const, 1.0), la.posterior.logdet(torch.tensor(0.9, dtype=DT), 1.0))
    torch.testing.assert_close(
        la.posterior.logdet(torch.tensor(0.9, dtype=DT), 1.0),
        torch.linalg.slogdet(la.kron.to_dense() + 0.9 * torch.eye(P, dtype=DT))[1],
    )


# ------------------------------------------------------------------------------------------------
# against laplace-torch
# ------------------------------------------------------------------------------------------------


def cnn(C: int) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3, stride=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C),
    ).to(DT)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_matches_laplace_torch_kron(likelihood, approx):
    from laplace import KronLaplace as LTKronLaplace
    from laplace.curvature import CurvlinopsGGN
    from torch.utils.data import DataLoader, TensorDataset

    C = 3 if likelihood == "classification" else 2
    model = cnn(C)
    X, y = data(model, likelihood, 10, (2, 4, 4))
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    L = sum(1 for _ in model.parameters())
    prior = torch.rand(L, dtype=DT) + 0.5
    sigma = 0.7 if likelihood == "regression" else 1.0
    kw = dict(sigma_noise=sigma, prior_precision=prior, temperature=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lt = LTKronLaplace(model, likelihood, backend=CurvlinopsGGN, asdl_fisher_kwargs={"kfac_approx": approx}, **kw)
        lt.fit(loader)
    ours = KronLaplace(model, likelihood, approx=approx, separate_bias=True, **kw).fit(loader)
    torch.testing.assert_close(ours.log_marginal_likelihood(), lt.log_marginal_likelihood(), rtol=1e-12, atol=1e-10)
    for p in (torch.tensor(2.3, dtype=DT), prior * 0.3):
        torch.testing.assert_close(ours.log_marginal_likelihood(p), lt.log_marginal_likelihood(p), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ours.posterior_precision, lt.posterior_precision.to_matrix(), rtol=1e-12, atol=1e-12)
    Xs = torch.randn(5, 2, 4, 4, dtype=DT)
    if likelihood == "classification":
        for link in ("probit", "bridge", "bridge_norm"):
            torch.testing.assert_close(ours(Xs, link_approx=link), lt(Xs, link_approx=link), rtol=1e-10, atol=1e-12)
    else:
        m1, v1 = ours(Xs)
        m2, v2 = lt(Xs)
        torch.testing.assert_close(m1, m2)
        torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_glm_predictive_matches_laplace_torch_public_call(likelihood):
    """marglik's own link approximations give laplace-torch's public predictive on the same posterior.

    ``mc`` draws from the global generator in both libraries (laplace-torch ignores ``generator`` on
    this path): the same seed gives the same draws. A different seed gives different MC numbers
    (negative control: the comparison can fail).
    """
    from laplace import KronLaplace as LTKronLaplace
    from laplace.curvature import CurvlinopsGGN
    from torch.utils.data import DataLoader, TensorDataset

    C = 3 if likelihood == "classification" else 2
    model = cnn(C)
    X, y = data(model, likelihood, 10, (2, 4, 4))
    prior = torch.rand(sum(1 for _ in model.parameters()), dtype=DT) + 0.5
    kw = dict(prior_precision=prior, sigma_noise=0.7 if likelihood == "regression" else 1.0)
    loader = DataLoader(TensorDataset(X, y), batch_size=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lt = LTKronLaplace(model, likelihood, backend=CurvlinopsGGN, **kw)
        lt.fit(loader)
    ours = KronLaplace(model, likelihood, approx="expand", separate_bias=True, **kw).fit(loader)
    Xs = torch.randn(6, 2, 4, 4, dtype=DT)

    def call(la, seed, **kwargs):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return la(Xs, **kwargs)

    if likelihood == "regression":  # (f_mu, f_var) whatever the link
        for link in ("probit", "mc"):
            for diagonal_output in (False, True):
                kwargs = dict(link_approx=link, diagonal_output=diagonal_output)
                for a, b in zip(call(ours, 0, **kwargs), call(lt, 0, **kwargs), strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        return
    for link in ("probit", "mc", "bridge", "bridge_norm"):
        for diagonal_output in (False, True):
            kwargs = dict(link_approx=link, n_samples=30, diagonal_output=diagonal_output)
            torch.testing.assert_close(call(ours, 1, **kwargs), call(lt, 1, **kwargs), rtol=1e-10, atol=1e-12)
    mc = dict(link_approx="mc", n_samples=30)
    assert (call(ours, 1, **mc) - call(lt, 2, **mc)).abs().max() > 1e-6


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise", "diagonal"])
def test_gradcheck_log_prior_and_sigma(prior_kind):
    model = mixed(2)
    X, y = data(model, "regression", 6, (2, 5, 5))
    la = KronLaplace(model, "regression", approx="reduce").fit((X, y))
    n = {"scalar": 1, "layerwise": la.n_layers, "diagonal": la.n_params}[prior_kind]
    log_prior = (0.3 * torch.randn(n, dtype=DT)).requires_grad_(True)
    log_sigma = torch.tensor(-0.2, dtype=DT, requires_grad=True)

    def f(lp, ls):
        return la.log_marginal_likelihood(prior_precision=lp.exp(), sigma_noise=ls.exp())

    assert torch.autograd.gradcheck(f, (log_prior, log_sigma))
    if prior_kind != "diagonal":  # exact: same gradient as autograd through the dense slogdet
        g = torch.autograd.grad(f(log_prior, log_sigma), (log_prior, log_sigma))

        def fd(lp, ls):
            p = expand_prior(lp.exp(), la.kron.params)
            s = torch.exp(-2 * ls)
            Pm = s * la.kron.to_dense() + torch.diag(p)
            d = la.mean
            ll = -s * la.loss - y.numel() * (ls + 0.5 * math.log(2 * math.pi))
            return ll - 0.5 * (torch.linalg.slogdet(Pm)[1] - p.log().sum()) - 0.5 * (d * p) @ d

        gd = torch.autograd.grad(fd(log_prior, log_sigma), (log_prior, log_sigma))
        for a, b in zip(g, gd):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("joint", [False, True])
def test_gradcheck_kron_logdet_factors(joint):
    torch.manual_seed(0)
    G, da, db = 2, 4, 3
    XA = torch.randn(G, da, 6, dtype=DT, requires_grad=True)
    XB = torch.randn(G, db, 2, dtype=DT, requires_grad=True)  # rank-deficient B
    s = torch.tensor(1.3, dtype=DT, requires_grad=True)
    dw = torch.tensor(0.5, dtype=DT, requires_grad=True)
    dbias = torch.tensor(2.0, dtype=DT, requires_grad=True)

    def f(XA, XB, s, dw, dbias):
        A, B = XA @ XA.transpose(-1, -2), XB @ XB.transpose(-1, -2)
        return kron_logdet(A, B, s, dw, dbias if joint else None)

    assert torch.autograd.gradcheck(f, (XA, XB, s, dw, dbias))

    def dense(XA, XB, s, dw, dbias):
        A, B = XA @ XA.transpose(-1, -2), XB @ XB.transpose(-1, -2)
        d = dw * torch.ones(db, da, dtype=DT)
        if joint:
            d = torch.cat([d[:, :-1], dbias.expand(db, 1)], 1)
        return sum(torch.linalg.slogdet(s * torch.kron(B[g], A[g]) + torch.diag(d.reshape(-1)))[1] for g in range(G))

    torch.testing.assert_close(f(XA, XB, s, dw, dbias), dense(XA, XB, s, dw, dbias))


@pytest.mark.parametrize("joint", [False, True])
def test_gradcheck_kron_log_det_ratio(joint):
    torch.manual_seed(1)
    XA = torch.randn(1, 5, 3, dtype=DT, requires_grad=True)
    XB = torch.randn(1, 4, 6, dtype=DT, requires_grad=True)
    s = torch.tensor(0.7, dtype=DT, requires_grad=True)
    dw = torch.tensor(1.5, dtype=DT, requires_grad=True)
    dbias = torch.tensor(0.2, dtype=DT, requires_grad=True)

    def f(XA, XB, s, dw, dbias):
        A, B = XA @ XA.transpose(-1, -2), XB @ XB.transpose(-1, -2)
        return kron_logdet(A, B, s, dw, dbias if joint else None, log_ratio=True)

    assert torch.autograd.gradcheck(f, (XA, XB, s, dw, dbias))
    full = kron_logdet(XA @ XA.mT, XB @ XB.mT, s, dw, dbias if joint else None)
    prior = 4 * (4 * dw.log() + dbias.log()) if joint else 20 * dw.log()
    torch.testing.assert_close(f(XA, XB, s, dw, dbias), full - prior)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("joint", [False, True])
def test_kron_logdet_tail_sums_match_full_array(dtype, joint):
    """Decaying spectra: most entries go through the closed-form Taylor tail; same value and
    gradients as the full-array path (forced by requiring a factor gradient) and as slogdet."""
    torch.manual_seed(0)
    G, da, db = 2, 60, 40
    QA = torch.linalg.qr(torch.randn(G, da, da, dtype=DT))[0]
    QB = torch.linalg.qr(torch.randn(G, db, db, dtype=DT))[0]
    lA, lB = 10 ** torch.linspace(-9, 1, da, dtype=DT), 10 ** torch.linspace(-6, 2, db, dtype=DT)
    x = torch.outer(lB, lA) * 0.8 / 3
    assert (x < torch.finfo(dtype).eps ** (1 / 3)).float().mean() > 0.5  # the tail path is taken
    A, B = ((QA * lA) @ QA.mT).to(dtype), ((QB * lB) @ QB.mT).to(dtype)
    vals, grads = [], []
    for need_factor_grad in (False, True):
        s, dw, dbias = (torch.tensor(v, dtype=dtype, requires_grad=True) for v in (0.8, 3.0, 0.05))
        A_ = A.clone().requires_grad_(need_factor_grad)
        v = kron_logdet(A_, B, s, dw, dbias if joint else None, log_ratio=True)
        vals.append(v.detach())
        grads.append(torch.stack(torch.autograd.grad(v, (s, dw, dbias), allow_unused=True, materialize_grads=True)))
    rtol = 1e-12 if dtype == DT else 2e-6
    torch.testing.assert_close(vals[0], vals[1], rtol=rtol, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=rtol, atol=0)
    D = torch.full((db, da), 3.0, dtype=DT)
    if joint:
        D[:, -1] = 0.05
    ref = sum(torch.linalg.slogdet(0.8 * torch.kron(B[g].double(), A[g].double()) + torch.diag(D.reshape(-1)))[1]
              - D.log().sum() for g in range(G))
    torch.testing.assert_close(vals[0].double(), ref, rtol=1e-10 if dtype == DT else 2e-6, atol=0)


def test_log_det_ratio_accurate_in_float32():
    """Large block, curvature tiny against the prior: float32 ratio and gradient match float64."""
    torch.manual_seed(0)
    XA, XB = torch.randn(300, 40, dtype=DT), torch.randn(100, 30, dtype=DT)
    A, B = (XA @ XA.T) * 1e-3, (XB @ XB.T) * 1e-3
    out = {}
    for dt in (torch.float32, torch.float64):
        lp = torch.tensor([0.5, 1.0], dtype=dt, requires_grad=True)
        val = kron_logdet(A.to(dt), B.to(dt), 1.0, lp[0].exp(), lp[1].exp(), log_ratio=True)
        out[dt] = (val.detach().double(), torch.autograd.grad(val, lp)[0].double())
    v32, g32 = out[torch.float32]
    v64, g64 = out[torch.float64]
    # (subtracting the two log determinants in float32 gives ~1e-5 / ~1e-4 relative errors here)
    assert abs(v32 - v64) / abs(v64) < 3e-6
    torch.testing.assert_close(g32, g64, rtol=3e-6, atol=0)


def test_kron_logdet_gradient_with_repeated_eigenvalues():
    """A = I, B = I: eigh's own backward is undefined; the closed form matches the dense gradient."""
    A = torch.eye(4, dtype=DT).repeat(1, 1, 1).requires_grad_(True)
    B = torch.eye(3, dtype=DT).repeat(1, 1, 1).requires_grad_(True)
    out = kron_logdet(A, B, 1.5, 0.5, 2.0)
    gA, gB = torch.autograd.grad(out, (A, B))
    d = torch.full((3, 4), 0.5, dtype=DT)
    d[:, -1] = 2.0
    ref = torch.linalg.slogdet(1.5 * torch.kron(B[0], A[0]) + torch.diag(d.reshape(-1)))[1]
    rA, rB = torch.autograd.grad(torch.linalg.slogdet(1.5 * torch.kron(B[0], A[0]) + torch.diag(d.reshape(-1)))[1], (A, B))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gA, rA)
    torch.testing.assert_close(gB, rB)
    assert torch.isfinite(gA).all() and torch.isfinite(gB).all()


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_differentiable_factors_gradient(approx):
    """differentiable=True: d log marglik / d (input scale) through the factors == dense autograd."""
    model = mixed(2)
    X0, y = data(model, "regression", 6, (2, 5, 5))
    prior = torch.rand(sum(1 for _ in model.parameters()), dtype=DT) + 0.5

    def lml(theta, dense: bool):
        X = X0 * theta
        la = KronLaplace(model, "regression", approx=approx, prior_precision=prior, sigma_noise=0.8,
                         differentiable=True)
        la.fit([(X[:3], y[:3]), (X[3:], y[3:])])
        if not dense:
            return la.log_marginal_likelihood()
        p = expand_prior(prior, la.kron.params)
        s = 1 / 0.64
        Pm = s * la.kron.to_dense() + torch.diag(p)
        ll = la.log_likelihood
        return ll - 0.5 * (torch.linalg.slogdet(Pm)[1] - p.log().sum()) - 0.5 * la.scatter

    theta = torch.tensor(1.1, dtype=DT, requires_grad=True)
    ours = lml(theta, False)
    ref = lml(theta, True)
    torch.testing.assert_close(ours, ref)
    g, = torch.autograd.grad(ours, theta)
    gr, = torch.autograd.grad(ref, theta)
    torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lambda t: lml(t, False), (theta,))


# ------------------------------------------------------------------------------------------------
# predictive, solves and samples
# ------------------------------------------------------------------------------------------------


def test_functional_variance_and_probabilities():
    model = mixed(3)
    X, y = data(model, "classification", 9, (2, 5, 5))
    prior = torch.rand(sum(1 for _ in model.parameters()), dtype=DT) + 0.5
    la = KronLaplace(model, "classification", prior_precision=prior, temperature=0.9).fit(batches(X, y, 5))
    Xs = torch.randn(4, 2, 5, 5, dtype=DT)
    J, f = jacobian(model, Xs, la.params)  # (4, 3, P) reference Jacobian
    Pm = la.posterior_precision
    ref_var = J @ torch.linalg.solve(Pm, J.transpose(1, 2))
    torch.testing.assert_close(la.functional_variance(J), ref_var, rtol=1e-10, atol=1e-12)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(ref_var, dim1=1, dim2=2))
    torch.testing.assert_close(la(Xs, link_approx="probit"), torch.softmax(kappa * f, -1))
    for link in ("probit", "mc", "bridge", "bridge_norm"):
        probs = la(Xs, link_approx=link, n_samples=50, generator=torch.Generator().manual_seed(0))
        assert probs.shape == (4, 3) and (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=DT))


def test_predictive_regression_and_binary():
    model = mlp(2)
    X, y = data(model, "regression", 8, (4,))
    la = KronLaplace(model, "regression", sigma_noise=0.5).fit((X, y))
    mean, var = la(X[:3])
    assert mean.shape == (3, 2) and var.shape == (3, 2, 2)
    J, f = jacobian(model, X[:3], la.params)
    torch.testing.assert_close(var, J @ torch.linalg.solve(la.posterior_precision, J.transpose(1, 2)))
    torch.testing.assert_close(mean, f)

    modelb = mlp(1)
    Xb, yb = data(modelb, "binary", 8, (4,))
    lb = KronLaplace(modelb, "binary").fit((Xb, yb))
    p = lb(Xb[:3])
    J, f = jacobian(modelb, Xb[:3], lb.params)
    v = (J @ torch.linalg.solve(lb.posterior_precision, J.transpose(1, 2)))[:, :, 0]
    torch.testing.assert_close(p, torch.sigmoid(f / torch.sqrt(1 + math.pi / 8 * v)))
    pm = lb(Xb[:3], link_approx="mc", n_samples=20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pm, p, atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="bridge"):
        lb(Xb[:3], link_approx="bridge")


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise", "diagonal"])
def test_solve_matches_dense(prior_kind):
    model = mixed(3)
    X, y = data(model, "classification", 9, (2, 5, 5))
    dk = DecomposedKron(KFAC(model, "classification", approx="reduce").fit((X, y)))
    n = {"scalar": 1, "layerwise": dk.n_layers, "diagonal": dk.n_params}[prior_kind]
    prior = torch.rand(n, dtype=DT) + 0.3
    V = torch.randn(3, dk.n_params, dtype=DT)
    sol = dk.solve(V, prior, 0.7)
    if prior_kind == "diagonal":  # same (projected) operator as the log det: P~ sol = V
        assert not dk.exact(prior)
        return
    ref = torch.linalg.solve(dk.to_dense(prior, 0.7), V.T).T
    torch.testing.assert_close(sol, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise"])
def test_samples_have_posterior_covariance(prior_kind):
    model = mixed(2)
    X, y = data(model, "classification", 9, (2, 5, 5))
    L = sum(1 for _ in model.parameters())
    prior = torch.tensor(2.0, dtype=DT) if prior_kind == "scalar" else torch.rand(L, dtype=DT) + 1.0
    la = KronLaplace(model, "classification", prior_precision=prior).fit((X, y))
    n = 40000
    S = la.sample(n, generator=torch.Generator().manual_seed(0))
    assert S.shape == (n, la.n_params)
    torch.testing.assert_close(la.sample(3, generator=torch.Generator().manual_seed(1)),
                               la.sample(3, generator=torch.Generator().manual_seed(1)))
    E = S - la.mean
    Pm = la.posterior_precision
    # whitened samples: x^T P x ~ chi^2_P and the covariance of L^T x is the identity
    Lc = torch.linalg.cholesky(Pm)
    W = E @ Lc
    cov = W.T @ W / n
    P = la.n_params
    assert (cov - torch.eye(P, dtype=DT)).abs().max() < 6 * math.sqrt(2 / n) * 2
    assert abs(cov.trace() / P - 1) < 0.02
    assert E.mean(0).abs().max() < 6 * torch.linalg.inv(Pm).diagonal().sqrt().max() / math.sqrt(n)


# ------------------------------------------------------------------------------------------------
# prior optimisation
# ------------------------------------------------------------------------------------------------


def test_optimize_prior_precision_reaches_stationary_point():
    model = mlp(3)
    X, y = data(model, "classification", 20, (4,))
    la = KronLaplace(model, "classification", prior_precision=1.0).fit((X, y))
    before = la.log_marginal_likelihood().item()
    p = la.optimize_prior_precision(n_steps=200, lr=0.1, prior_structure="layerwise")
    assert p.shape == (la.n_layers,) and (p > 0).all()
    lp = p.log().requires_grad_(True)
    lml = la.log_marginal_likelihood(lp.exp())
    g, = torch.autograd.grad(lml, lp)
    assert lml.item() > before
    assert g.abs().max() < 1e-2


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_errors():
    model = mlp(3)
    X, y = data(model, "classification", 6, (4,))
    with pytest.raises(ValueError, match="prior precision of length"):
        KronLaplace(model, prior_precision=torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="1-d"):
        KronLaplace(model, prior_precision=torch.ones(2, 2, dtype=DT))
    with pytest.raises(ValueError, match="positive"):
        KronLaplace(model, prior_precision=0.0)
    with pytest.raises(ValueError, match="positive"):
        KronLaplace(model, prior_precision=torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=DT))
    with pytest.raises(ValueError, match="sigma_noise"):
        KronLaplace(model, "regression", sigma_noise=-1.0)
    with pytest.raises(ValueError, match="regression"):
        KronLaplace(model, "classification", sigma_noise=2.0)
    with pytest.raises(ValueError, match="temperature"):
        KronLaplace(model, temperature=0.0)
    with pytest.raises(ValueError, match="prior mean"):
        KronLaplace(model, prior_mean=torch.zeros(5, dtype=DT))
    with pytest.raises(ValueError, match="likelihood"):
        KronLaplace(model, "poisson")
    la = KronLaplace(model)
    for call in (la.log_marginal_likelihood, lambda: la(X), lambda: la.sample(2), la.optimize_prior_precision):
        with pytest.raises(RuntimeError, match="fit"):
            call()
    la.fit((X, y))
    with pytest.raises(ValueError, match="positive"):
        la.log_marginal_likelihood(prior_precision=torch.tensor(-1.0, dtype=DT))
    with pytest.raises(ValueError, match="regression"):
        la.log_marginal_likelihood(sigma_noise=torch.tensor(0.5, dtype=DT))
    with pytest.raises(ValueError, match="link_approx"):
        la(X, link_approx="nope")
    with pytest.raises(ValueError, match="method"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match="n_samples"):
        la.sample(0)
    with pytest.raises(ValueError, match="empty"):
        KronLaplace(model).fit([])
