"""Rank-bounded Kronecker factors (factors kept as rows) against the dense path and laplace-torch.

Every quantity of the posterior is computed twice on the same data, once with factors built from few
rows kept as rows (``factor_form="auto"``, decomposed through a thin QR, the null-space complement in
closed form) and once dense (``factor_form="dense"``, the path every peer takes), in float64; they
must agree to 1e-10. Each test also asserts that the rows path was taken (a test in which every
factor came out dense could not fail). Negative controls break the complement terms on purpose and
show the comparison fails.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from marglik import KFAC, AffineAugmentation, DecomposedKron, KronLaplace
from marglik.curvature import eigen
from marglik.curvature.eigen import FactorEigen, KronEigen
from marglik.curvature.kron import KronBlock
from marglik.curvature.row_factor import ROWS_MAX_FRACTION, RowFactor, eigh_rows

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


class Net(nn.Module):
    """Conv2d(2, w1) (bias-free, so all-zero inputs give all-zero rows), Conv2d(w1, w2), Conv2d(w2, w3),
    pooling, Linear(w3, C). With the default widths (8, 32, 32) and two classes (one curvature
    column), on 12 images of 2 x 6 x 6 the input factors of the last three layers and the output
    factors of the two wide convolutions come from at most half their dimension in rows (kept as
    rows), the others do not (dense): one model with both forms. ``tiny`` widths (2, 4, 8) on 4 images
    (426 parameters, rows in every input factor) keep the dense ``P x P`` references cheap."""

    def __init__(self, C: int = 2, widths=(8, 32, 32)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.c1 = nn.Conv2d(2, w1, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(w1, w2, 3, padding=1)
        self.c3 = nn.Conv2d(w2, w3, 3)
        self.fc = nn.Linear(w3, C)

    def forward(self, x):
        if x.dim() == 5:  # augmented copies (N, S, C, H, W): average the logits over them
            N, S = x.shape[:2]
            return self.forward(x.flatten(0, 1)).view(N, S, -1).mean(1)
        h = torch.relu(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = torch.tanh(self.c3(h)).mean((2, 3))
        return self.fc(h)


def net(C: int = 2, tiny: bool = False) -> Net:
    torch.manual_seed(0)
    return Net(C, (2, 4, 8) if tiny else (8, 32, 32)).to(DT)


def data(n: int = 12, C: int = 2, zero_rows: int = 0):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 2, 6, 6, generator=g, dtype=DT)
    X[:zero_rows] = 0.0  # these examples give all-zero rows after the bias-free conv and the ReLU
    return X, torch.randint(0, C, (n,), generator=g)


def forms(kron) -> list:
    return [(type(b.A_factor).__name__, type(b.B_factor).__name__) for b in kron.blocks if isinstance(b, KronBlock)]


def n_row_factors(kron) -> int:
    return sum(isinstance(F, RowFactor) for b in kron.blocks if isinstance(b, KronBlock) for F in (b.A_factor, b.B_factor))


def priors(model):
    L = sum(1 for _ in model.parameters())
    P = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(2)
    return {
        "scalar": torch.tensor(0.7, dtype=DT),
        "layerwise": torch.rand(L, generator=g, dtype=DT) + 0.3,
        "diagonal": torch.rand(P, generator=g, dtype=DT) + 0.3,
    }


def lml_and_grads(model, X, y, approx, form, prior, separate_bias, **kw):
    la = KronLaplace(model, "classification", approx=approx, factor_form=form, separate_bias=separate_bias, **kw)
    la.fit((X, y))
    p = prior.clone().requires_grad_(True)
    lml = la.log_marginal_likelihood(p)
    (g,) = torch.autograd.grad(lml, [p])
    return la, lml.detach(), g


# ------------------------------------------------------------------------------------------------
# which factors become rows
# ------------------------------------------------------------------------------------------------


def test_forms_follow_rows_against_dimension():
    model = net()
    X, y = data()
    kron = KFAC(model, approx="reduce").fit((X, y))
    # A: 12 rows against 18 / 73 / 289 / 33; B: 12 x (C - 1) = 12 rows against 8 / 32 / 32 / 2
    assert forms(kron) == [("Tensor", "Tensor"), ("RowFactor", "RowFactor"), ("RowFactor", "RowFactor"),
                           ("RowFactor", "Tensor")]
    dense = KFAC(model, approx="reduce", factor_form="dense").fit((X, y))
    assert n_row_factors(dense) == 0
    for b, d in zip(kron.blocks, dense.blocks):  # .A / .B are the dense factors in either form
        torch.testing.assert_close(b.A, d.A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.B, d.B, rtol=1e-12, atol=1e-12)
    assert ROWS_MAX_FRACTION == 0.5


def test_multi_batch_accumulation_crosses_the_bound():
    """Rows accumulate over batches while they stay within the bound, then the sum turns dense."""
    model = net()
    X, y = data(40)
    batches = [(X[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    kfac = KFAC(model, approx="reduce")
    kron = kfac.fit(batches[:2])  # 16 rows: c2's A (73 -> 16 <= 36.5) and c3's A (289) stay rows
    assert forms(kron)[1][0] == "RowFactor" and forms(kron)[2][0] == "RowFactor"
    assert kron.blocks[2].A_factor.num_rows == 16
    kron = kfac.fit(batches)  # 40 rows: c2's A (40 > 36.5) turns dense, c3's (289) stays rows
    assert forms(kron)[1][0] == "Tensor" and forms(kron)[2][0] == "RowFactor"
    dense = KFAC(model, approx="reduce", factor_form="dense").fit(batches)
    for b, d in zip(kron.blocks, dense.blocks):
        torch.testing.assert_close(b.A, d.A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.B, d.B, rtol=1e-12, atol=1e-12)


def test_rows_at_and_above_the_dimension():
    """``eigh_rows`` is exact for m = d and m = d - 1; a RowFactor with m >= d is decomposed dense."""
    g = torch.Generator().manual_seed(0)
    for m, d in ((7, 7), (6, 7), (1, 7)):
        R = torch.randn(2, m, d, generator=g, dtype=DT)
        lam, V, RV = eigh_rows(R)
        torch.testing.assert_close(V.mT @ V, torch.eye(m, dtype=DT).expand(2, m, m), **TOL)
        torch.testing.assert_close((V * lam.unsqueeze(-2)) @ V.mT, R.mT @ R, **TOL)
        torch.testing.assert_close(RV, R @ V, **TOL)
    R = torch.randn(1, 9, 7, generator=g, dtype=DT)
    fe = FactorEigen.of(RowFactor(R))
    assert fe.k == 7 and fe.complement == 0 and not fe.from_rows


def test_eigh_rows_orthonormal_for_rank_deficient_rows():
    """Duplicated and zero rows: the eigenvectors stay orthonormal (no division by zero eigenvalues)."""
    g = torch.Generator().manual_seed(0)
    R = torch.randn(1, 5, 20, generator=g, dtype=DT)
    R = torch.cat([R, R[:, :2], torch.zeros(1, 3, 20, dtype=DT)], dim=1)  # rank 5 of 10 rows
    lam, V, _ = eigh_rows(R)
    torch.testing.assert_close(V.mT @ V, torch.eye(10, dtype=DT).unsqueeze(0), **TOL)
    torch.testing.assert_close((V * lam.unsqueeze(-2)) @ V.mT, R.mT @ R, **TOL)
    assert int((lam > 1e-10 * lam.max()).sum()) == 5


def _naive_q0(V):
    """The one-pass ``e_perp / |e_perp|`` (the negative control for the test below)."""
    e_perp = -V @ V[:, -1, :].unsqueeze(-1)
    e_perp = e_perp.squeeze(-1)
    e_perp[:, -1] += 1.0
    return e_perp / e_perp.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(V.dtype).tiny)


def test_bias_direction_on_the_complement_is_orthogonal_or_absent():
    """The bias coordinate ``e`` inside the rows' span (rows with a bias column whose weight parts are
    linearly dependent, e.g. all-zero inputs): the complement direction ``q0`` must not be normalised
    round-off, which would put an O(1) vector
    inside ``span(V)`` (it did on some CPUs with duplicated rows: log det off by 0.19). Outside the
    span, ``q0`` is the unit ``e_perp``."""
    from marglik.curvature.eigen import _bias_complement_direction

    naive_bad = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        R = torch.randn(1, 8, 30, generator=g, dtype=DT)
        R[..., -1] = 1.0  # a bias column: e is in the row space ...
        R[:, :4, :-1] = 0.0  # ... and is a row itself, four times (dead inputs)
        _, V, _ = eigh_rows(R)
        q0 = _bias_complement_direction(V)
        inside = (V.mT @ q0.unsqueeze(-1)).abs().max()
        assert q0.norm() == 0 or (inside < 1e-12 and abs(q0.norm() - 1) < 1e-12), seed
        naive_bad += int((V.mT @ _naive_q0(V).unsqueeze(-1)).abs().max() > 1e-6)
        Rw = R.clone()
        Rw[..., -1] = 0.0  # e orthogonal to the rows: q0 = e
        _, Vw, _ = eigh_rows(Rw)
        q0w = _bias_complement_direction(Vw)
        torch.testing.assert_close(q0w.norm(), torch.tensor(1.0, dtype=DT), **TOL)
        torch.testing.assert_close(q0w[0, -1], torch.tensor(1.0, dtype=DT), **TOL)  # e itself
    assert naive_bad > 0, "control: the one-pass normalisation should have failed on some seed"


# ------------------------------------------------------------------------------------------------
# log marginal likelihood and its gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("approx", ["reduce", "expand"])
@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise", "diagonal"])
@pytest.mark.parametrize("separate_bias", [False, True])
def test_log_marglik_and_prior_gradient_equal_dense(approx, prior_kind, separate_bias):
    model = net()
    X, y = data()
    prior = priors(model)[prior_kind]
    la, l1, g1 = lml_and_grads(model, X, y, approx, "auto", prior, separate_bias)
    _, l2, g2 = lml_and_grads(model, X, y, approx, "dense", prior, separate_bias)
    assert n_row_factors(la.kron) >= (3 if approx == "reduce" else 1)
    torch.testing.assert_close(l1, l2, **TOL)
    torch.testing.assert_close(g1, g2, **TOL)


@pytest.mark.parametrize("approx", ["reduce", "expand"])
def test_equal_to_laplace_torch(approx):
    """Rows or dense, marglik's log marglik and prior gradient equal laplace-torch's (curvlinops backend,
    separate weight and bias blocks)."""
    from laplace import KronLaplace as LTKronLaplace
    from laplace.curvature import CurvlinopsGGN
    from torch.utils.data import DataLoader, TensorDataset

    model = net()
    X, y = data()
    prior = priors(model)["layerwise"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lt = LTKronLaplace(model, "classification", backend=CurvlinopsGGN,
                           asdl_fisher_kwargs={"kfac_approx": approx}, prior_precision=prior)
        lt.fit(DataLoader(TensorDataset(X, y), batch_size=12))
    p = prior.clone().requires_grad_(True)
    lt_lml = lt.log_marginal_likelihood(p)
    (lt_g,) = torch.autograd.grad(lt_lml, [p])
    la, lml, g = lml_and_grads(model, X, y, approx, "auto", prior, separate_bias=True)
    assert n_row_factors(la.kron) >= 1
    torch.testing.assert_close(lml, lt_lml.detach(), **TOL)
    torch.testing.assert_close(g, lt_g, **TOL)


@pytest.mark.parametrize("approx,copies_approx", [("reduce", "reduce"), ("expand", "reduce")])
@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise", "diagonal"])
def test_augmentation_gradient_equal_dense(approx, copies_approx, prior_kind):
    """The gradient w.r.t. learned augmentation ranges reaches the rows in closed form (no autograd
    through an eigendecomposition) and equals the dense path's."""
    model = net()
    X, y = data()
    prior = priors(model)[prior_kind]
    out = []
    for form in ("auto", "dense"):
        aug = AffineAugmentation(n_samples=2).to(DT)
        with torch.no_grad():
            aug.eta.fill_(0.2)
        Xa = aug(X, generator=torch.Generator().manual_seed(5))
        la = KronLaplace(model, "classification", approx=approx, copies_approx=copies_approx, factor_form=form,
                         differentiable=True)
        la.fit((Xa, y))
        p = prior.clone().requires_grad_(True)
        lml = la.log_marginal_likelihood(p)
        out.append((la, lml.detach(), *torch.autograd.grad(lml, [aug.eta, p])))
    (la, l1, e1, p1), (_, l2, e2, p2) = out
    assert n_row_factors(la.kron) >= 1 and any(isinstance(b, KronBlock) and b.requires_grad for b in la.kron.blocks)
    assert e1.abs().max() > 1e-3  # the augmentation gradient is not trivially zero
    torch.testing.assert_close(l1, l2, **TOL)
    torch.testing.assert_close(e1, e2, **TOL)
    torch.testing.assert_close(p1, p2, **TOL)


@pytest.mark.parametrize("n,zero_rows", [(1, 0), (12, 4)])
def test_edge_cases_one_example_and_zero_rows(n, zero_rows):
    model = net()
    X, y = data(n, zero_rows=zero_rows)
    las = [KronLaplace(model, "classification", factor_form=f).fit((X, y)) for f in ("auto", "dense")]
    assert n_row_factors(las[0].kron) >= 3
    for prior in priors(model).values():
        out = []
        for la in las:
            p = prior.clone().requires_grad_(True)
            lml = la.log_marginal_likelihood(p)
            out.append((lml.detach(), *torch.autograd.grad(lml, [p])))
        (l1, g1), (l2, g2) = out
        torch.testing.assert_close(l1, l2, **TOL)
        torch.testing.assert_close(g1, g2, **TOL)


# ------------------------------------------------------------------------------------------------
# solves, samples, predictive
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise", "diagonal"])
@pytest.mark.parametrize("separate_bias", [False, True])
def test_solve_and_predictive_equal_dense(prior_kind, separate_bias):
    model = net()
    X, y = data()
    prior = priors(model)[prior_kind]
    las = [KronLaplace(model, "classification", factor_form=f, separate_bias=separate_bias,
                       prior_precision=prior).fit((X, y)) for f in ("auto", "dense")]
    assert n_row_factors(las[0].kron) >= 3
    V = torch.randn(3, las[0].n_params, generator=torch.Generator().manual_seed(3), dtype=DT)
    s = las[0]._H_factor
    x1, x2 = (la.posterior.solve(V, prior, s) for la in las)
    torch.testing.assert_close(x1, x2, **TOL)
    Xs = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(4), dtype=DT)
    for link in ("probit", "bridge"):
        torch.testing.assert_close(las[0](Xs, link_approx=link), las[1](Xs, link_approx=link), **TOL)


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise", "diagonal"])
def test_samples_have_the_posterior_covariance(prior_kind):
    """Draws of the rows path have the (dense) posterior covariance: whitened by the posterior
    precision's Cholesky factor their covariance is the identity within a 6-sigma bound."""
    X, y = data(4)
    model = net(tiny=True)
    prior = priors(model)[prior_kind]
    la = KronLaplace(model, "classification", prior_precision=prior).fit((X, y))
    assert n_row_factors(la.kron) >= 5
    if prior_kind == "diagonal":  # the K-FAC approximation: compare with its own dense operator
        P = la.n_params
        Pm = torch.linalg.inv(la.posterior.solve(torch.eye(P, dtype=DT), prior, la._H_factor))
        Pm = 0.5 * (Pm + Pm.T)
    else:
        Pm = la.posterior_precision
    n = 20000
    E = la.sample(n, generator=torch.Generator().manual_seed(0)) - la.mean
    W = E @ torch.linalg.cholesky(Pm)
    cov = W.T @ W / n
    assert (cov - torch.eye(la.n_params, dtype=DT)).abs().max() < 6 * math.sqrt(2 / n) * 2
    assert abs(cov.trace() / la.n_params - 1) < 0.02


@pytest.mark.parametrize("separate_bias", [False, True])
def test_posterior_precision_and_exact_solve(separate_bias):
    """``to_dense`` and the solves of the rows path equal the dense posterior precision and its inverse."""
    model = net(tiny=True)
    X, y = data(4)
    for kind, prior in priors(model).items():
        a, b = (KronLaplace(model, "classification", factor_form=f, prior_precision=prior,
                            separate_bias=separate_bias).fit((X, y)) for f in ("auto", "dense"))
        assert n_row_factors(a.kron) >= 5
        torch.testing.assert_close(a.posterior_precision, b.posterior_precision, **TOL)
        if kind != "diagonal":  # exact posteriors: the solve is the dense inverse
            V = torch.randn(3, a.n_params, generator=torch.Generator().manual_seed(3), dtype=DT)
            exact = torch.linalg.solve(b.posterior_precision, V.T).T
            torch.testing.assert_close(a.posterior.solve(V, prior, a._H_factor), exact, **TOL)


# ------------------------------------------------------------------------------------------------
# negative controls: a wrong complement term fails the equality
# ------------------------------------------------------------------------------------------------


def test_negative_control_bias_direction_dropped(monkeypatch):
    """Without the bias direction q0 on A's complement the joint weight+bias log det is wrong."""
    model = net()
    X, y = data()
    prior = priors(model)["layerwise"]
    _, l2, _ = lml_and_grads(model, X, y, "reduce", "dense", prior, False)

    def without_q0(self):
        u2 = self.a.V[:, -1, :].square()
        return self.a.evals, self.a.V, u2 / u2.sum(-1, keepdim=True), self.a.rows_V

    monkeypatch.setattr(KronEigen, "bias_spectrum", without_q0)
    _, l1, _ = lml_and_grads(model, X, y, "reduce", "auto", prior, False)
    assert abs(float(l1 - l2)) > 1e-3


def test_negative_control_complement_eigenvalue(monkeypatch):
    """Solving with the complement's eigenvalue left out (``phi0 = 0``) is far from the dense solve."""
    model = net()
    X, y = data()
    las = [KronLaplace(model, "classification", factor_form=f).fit((X, y)) for f in ("auto", "dense")]
    V = torch.randn(2, las[0].n_params, generator=torch.Generator().manual_seed(3), dtype=DT)
    original = eigen.KronEigen.apply_spectral
    monkeypatch.setattr(eigen.KronEigen, "apply_spectral", lambda self, X, phi, phi0: original(self, X, phi, 0 * phi0))
    x1, x2 = (la.posterior.solve(V, 1.0, 1.0) for la in las)
    assert (x1 - x2).abs().max() > 1e-2


def test_negative_control_complement_multiplicity(monkeypatch):
    """The diagonal prior's complement counts ``d - m`` eigenvalues; counting it once is wrong."""
    model = net()
    X, y = data()
    prior = priors(model)["diagonal"]
    _, l2, _ = lml_and_grads(model, X, y, "reduce", "dense", prior, False)
    monkeypatch.setattr(eigen.KronEigen, "multiplicities", lambda self: torch.ones_like(self.extended_lam()))
    _, l1, _ = lml_and_grads(model, X, y, "reduce", "auto", prior, False)
    assert abs(float(l1 - l2)) > 1e-3


def test_decomposed_kron_batches_equal_sizes():
    """Equal-size factors of different blocks are decomposed in one call (and give the same result)."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).to(DT)
    X = torch.randn(30, 6, dtype=DT)
    y = torch.randint(0, 6, (30,))
    kron = KFAC(model, factor_form="dense").fit((X, y))
    calls = []
    original = eigen.eigh_psd

    def counting(M):
        calls.append(tuple(M.shape))
        return original(M)

    import marglik.curvature.eigen as eigmod

    eigmod.eigh_psd = counting
    try:
        dk = DecomposedKron(kron)
    finally:
        eigmod.eigh_psd = original
    assert sorted(calls) == [(3, 6, 6), (3, 7, 7)]  # three B's, three A's ([W, b] is 7 wide)
    for e, blk in zip(dk.kron_blocks, kron.blocks):
        ref = KronEigen.from_decompositions(*torch.linalg.eigh(blk.A), *torch.linalg.eigh(blk.B))
        torch.testing.assert_close(e.eig.lam, ref.lam.clamp_min(0), **TOL)


def test_tuning_run_with_dense_factors_matches(tmp_path):
    """``curvature.factor_form=dense`` runs the same tuning job to float32 round-off: the learned prior,
    augmentation range and reported log marglik of a tiny learned-augmentation job agree."""
    from marglik.tuning import Config, tune

    def cfg(form):
        return Config.from_dict(
            data={"name": "digits", "train_size": 32, "rotation": 30.0},
            model={"name": "cnn", "width": 4, "hidden": 16},
            curvature={"factor_form": form},
            hyper={"burn_in": 1, "frequency": 1, "steps": 2, "n_samples": 2, "marglik_batches": 1,
                   "marglik_batch_size": 16, "selection": "subset", "selection_size": 16},
            trainer={"epochs": 3, "batch_size": 16, "progress": False, "num_threads": 1, "eval_every": 0},
            logger={"mode": "disabled"},
        )

    a, b = tune(cfg("auto"), tmp_path / "auto"), tune(cfg("dense"), tmp_path / "dense")
    assert a["log_marglik"] == pytest.approx(b["log_marglik"], rel=1e-4)
    assert a["prior_precision"] == pytest.approx(b["prior_precision"], rel=1e-3)
    assert a["augmentation"]["rotation"] == pytest.approx(b["augmentation"]["rotation"], rel=1e-3, abs=1e-3)
