"""marglik's laplace-torch backends (MarglikGGN / MarglikEF) against laplace-torch's CurvlinopsGGN / EF."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", category=FutureWarning)
laplace = pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN  # noqa: E402

from marglik import KFAC, Scale  # noqa: E402
from marglik.curvature.kron import DiagonalBlock  # noqa: E402
from marglik.laplace_torch import MarglikEF, MarglikGGN, to_laplace_kron  # noqa: E402

DT = torch.float64


def cnn(C: int) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3, stride=2, bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C),
    ).to(DT)


def loader(model, likelihood, N=10, bs=4, seed=0, shape=(2, 4, 4)):
    """Random inputs of ``shape`` and targets drawn for the model's output (labels or values), in batches."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, *shape, generator=g, dtype=DT)
    with torch.no_grad():
        out = model(X)
    if likelihood == "classification":
        y = torch.randint(0, out.shape[-1], (N,), generator=g)
    else:
        y = torch.randn(out.shape, generator=g, dtype=DT)
    return DataLoader(TensorDataset(X, y), batch_size=bs)


def fit(model, likelihood, backend, approx, dl, **kw):
    kwargs = {"approx": approx} if backend in (MarglikGGN, MarglikEF) else {}
    fisher = {} if backend in (MarglikGGN, MarglikEF) else {"kfac_approx": approx}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="kron", backend=backend,
                     backend_kwargs=kwargs, asdl_fisher_kwargs=fisher, **kw)
        la.fit(dl)
    return la


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_marglik_ggn_equals_curvlinops_ggn(likelihood, approx):
    C = 3 if likelihood == "classification" else 2
    model = cnn(C)
    dl = loader(model, likelihood)
    L = sum(1 for _ in model.parameters())
    prior = torch.rand(L, dtype=DT) + 0.5
    kw = dict(prior_precision=prior, temperature=0.9, sigma_noise=0.8 if likelihood == "regression" else 1.0)
    ours = fit(model, likelihood, MarglikGGN, approx, dl, **kw)
    ref = fit(model, likelihood, CurvlinopsGGN, approx, dl, **kw)
    # the accumulated Kronecker products, the loss and every derived quantity agree
    torch.testing.assert_close(ours.H_facs.to_matrix(), ref.H_facs.to_matrix(), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(torch.as_tensor(ours.loss), torch.as_tensor(ref.loss))
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ours.log_marginal_likelihood(torch.tensor(3.0, dtype=DT)),
                               ref.log_marginal_likelihood(torch.tensor(3.0, dtype=DT)), rtol=1e-12, atol=1e-10)
    X = next(iter(dl))[0]
    if likelihood == "classification":
        for link in ("probit", "bridge"):
            torch.testing.assert_close(ours(X, link_approx=link), ref(X, link_approx=link))
    else:
        for a, b in zip(ours(X), ref(X)):
            torch.testing.assert_close(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.optimize_prior_precision(n_steps=20, prior_structure="layerwise")
        ref.optimize_prior_precision(n_steps=20, prior_structure="layerwise")
    torch.testing.assert_close(ours.prior_precision, ref.prior_precision, rtol=1e-8, atol=1e-10)


def test_batch_scaling_reproduces_full_batch_kfac():
    """Summing per-batch factors as laplace-torch does gives the full-data K-FAC factors."""
    model = cnn(3)
    dl = loader(model, "classification", N=11, bs=3)
    la = fit(model, "classification", MarglikGGN, "reduce", dl)
    X, y = dl.dataset.tensors
    full = KFAC(model, "classification", approx="reduce").fit((X, y))
    ref = to_laplace_kron(full, list(model.parameters()))
    for F1, F2 in zip(la.H_facs.kfacs, ref.kfacs):
        assert len(F1) == len(F2)
        for a, b in zip(F1, F2):
            torch.testing.assert_close(a, b)


class _CopiesCNN(nn.Module):
    """``(N, S, 2, 4, 4)``: the CNN on the ``N S`` example-major copies, logits averaged over ``S``."""

    def __init__(self, C: int) -> None:
        super().__init__()
        self.net = cnn(C)

    def forward(self, x):
        n, s = x.shape[:2]
        return self.net(x.reshape(n * s, *x.shape[2:])).reshape(n, s, -1).mean(1)


@pytest.mark.parametrize("backend", ["ggn", "ef"])
def test_copies_approx_backend_kwarg(backend):
    """``backend_kwargs={"copies_approx": ...}`` reaches the engine: batch-wise laplace-torch factors
    equal marglik's full-data K-FAC with the same flavours, and differ from the unmixed one."""
    model = _CopiesCNN(3)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(9, 3, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (9,), generator=g)
    dl = DataLoader(TensorDataset(X, y), batch_size=4)
    Backend, fisher = {"ggn": (MarglikGGN, "type-2"), "ef": (MarglikEF, "empirical")}[backend]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", backend=Backend,
                     backend_kwargs={"approx": "expand", "copies_approx": "reduce"})
        la.fit(dl)
    full = KFAC(model, "classification", approx="expand", copies_approx="reduce", fisher_type=fisher).fit((X, y))
    ref = to_laplace_kron(full, list(model.parameters()))
    torch.testing.assert_close(la.H_facs.to_matrix(), ref.to_matrix())
    plain = to_laplace_kron(KFAC(model, "classification", approx="expand", fisher_type=fisher).fit((X, y)),
                            list(model.parameters()))
    assert not torch.allclose(la.H_facs.to_matrix(), plain.to_matrix())


def test_ef_backend():
    model = cnn(3)
    dl = loader(model, "classification")
    ours = fit(model, "classification", MarglikEF, "expand", dl)
    ref = fit(model, "classification", CurvlinopsEF, "expand", dl)
    torch.testing.assert_close(ours.H_facs.to_matrix(), ref.H_facs.to_matrix(), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood())
    # regression: marglik's EF is that of 0.5 ||y - f||^2, laplace-torch's EF backends give twice it
    modelr = cnn(2)
    dlr = loader(modelr, "regression")
    ours = fit(modelr, "regression", MarglikEF, "expand", dlr)
    ref = fit(modelr, "regression", CurvlinopsEF, "expand", dlr)
    torch.testing.assert_close(2 * ours.H_facs.to_matrix(), ref.H_facs.to_matrix(), rtol=1e-11, atol=1e-12)


class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.scale = Scale(1, dim=-1)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.scale(torch.tanh(self.ln(self.fc1(x)))))


def test_norm_layers_and_dense_equivalence():
    """Models curvlinops cannot handle: laplace-torch's Kron equals marglik's K-FAC minus cross terms."""
    torch.manual_seed(0)
    model = NormNet().to(DT)
    X = torch.randn(12, 4, dtype=DT)
    y = torch.randint(0, 3, (12,))
    dl = DataLoader(TensorDataset(X, y), batch_size=5)
    la = fit(model, "classification", MarglikGGN, "expand", dl, prior_precision=0.5)
    kron = KFAC(model, "classification").fit((X, y)).split_bias()
    dense = kron.to_dense()
    for blk in kron.blocks:  # drop the per-channel weight-bias coupling of DiagonalBlocks
        if isinstance(blk, DiagonalBlock):
            idx = kron.block_indices(blk)
            C = blk.blocks.shape[0]
            w, b = idx[:C], idx[C:]
            dense[w[:, None], b[None, :]] = 0
            dense[b[:, None], w[None, :]] = 0
    torch.testing.assert_close(la.H_facs.to_matrix(), dense, rtol=1e-11, atol=1e-12)
    lml = la.log_marginal_likelihood()
    P = dense.shape[0]
    ref = -la.loss - 0.5 * (torch.linalg.slogdet(dense + 0.5 * torch.eye(P, dtype=DT))[1] - P * torch.log(
        torch.tensor(0.5, dtype=DT))) - 0.5 * 0.5 * la.mean @ la.mean
    torch.testing.assert_close(lml, ref)
    probs = la(X[:4])
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=DT))


def test_errors():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)).to(DT)
    X = torch.randn(5, 2, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (5,))
    be = MarglikGGN(model, "classification")
    with pytest.raises(NotImplementedError, match="grouped"):
        be.kron(X, y, N=5)
    be = MarglikGGN(cnn(3), "classification")
    with pytest.raises(TypeError, match="unexpected"):
        be.kron(torch.randn(5, 2, 4, 4, dtype=DT), y, N=5, foo=1)
    with pytest.raises(ValueError, match="approximation"):
        MarglikGGN(cnn(3), "classification", approx="nope")
