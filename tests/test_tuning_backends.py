"""The tuning loop's peer backends (laplace-torch with curvlinops / ASDL / BackPACK), checked against
marglik's own :class:`KronLaplace` and against the exact GGN diagonal (torch.func, float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import exact_ggn
from torch import nn

from marglik.errors import UserError
from marglik.laplace import KronLaplace
from marglik.models import MLP
from marglik.tuning import Config, MarglikTuner
from marglik.tuning.backends import PeerLaplace, curvature_label, sequential_view
from marglik.tuning.wandb_logger import curvature_tags

N_TOTAL = 50  # the data set the 2 x 6 seen examples stand for (subset estimator)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP(12, 3, hidden=(5,), activation="tanh")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))


def _batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(12, 1, 3, 4, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    return [(X[:6], y[:6]), (X[6:], y[6:])]


def _prior(model: nn.Module) -> torch.Tensor:
    n = len([p for p in model.parameters() if p.requires_grad])
    return torch.linspace(0.5, 2.0, n)


def _lml_and_grad(la, prior):
    log_prior = prior.log().clone().requires_grad_(True)
    value = la.log_marginal_likelihood(prior_precision=log_prior.exp())
    (grad,) = torch.autograd.grad(value, log_prior)
    return value.detach(), grad


def _cnn_batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(12, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    return [(X[:6], y[:6]), (X[6:], y[6:])]


@pytest.mark.parametrize(
    "make, batches, backend, approx",
    [
        (_mlp, _batches, "curvlinops", "expand"),
        (_mlp, _batches, "curvlinops", "reduce"),
        (_mlp, _batches, "asdl", "expand"),
        (_mlp, _batches, "backpack", "expand"),  # through MLP.as_sequential()
        (_cnn, _cnn_batches, "curvlinops", "expand"),
        (_cnn, _cnn_batches, "curvlinops", "reduce"),
        (_cnn, _cnn_batches, "asdl", "expand"),
    ],
)
def test_peer_kron_equals_marglik_kron_with_separate_bias(float64, make, batches, backend, approx):
    """Same batches, same subset rescaling (num_data = 50 for 12 seen), same layerwise prior: the
    peer's log marglik and its gradient w.r.t. the log prior equal marglik's K-FAC (expand or
    reduce) with laplace-torch's block structure (weight and bias blocks separate)."""
    model = make()
    data, prior = batches(), _prior(model)
    ref = KronLaplace(copy.deepcopy(model), approx=approx, separate_bias=True, prior_precision=prior)
    ref.fit(data, num_data=N_TOTAL)
    want, want_grad = _lml_and_grad(ref, prior)
    peer = PeerLaplace(model, backend, "kron", approx=approx, prior_precision=prior).fit(data, num_data=N_TOTAL)
    got, got_grad = _lml_and_grad(peer, prior)
    assert peer.n_data == N_TOTAL
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-9)


def test_subset_rescaling_is_applied(float64):
    """Negative control: fitting the same batches as the whole data set (no num_data) gives a
    different value, equal to marglik's without rescaling."""
    model, data = _mlp(), _batches()
    prior = _prior(model)
    scaled = PeerLaplace(model, "curvlinops", "kron", prior_precision=prior).fit(data, num_data=N_TOTAL)
    plain = PeerLaplace(model, "curvlinops", "kron", prior_precision=prior).fit(data)
    ref = KronLaplace(copy.deepcopy(model), approx="expand", separate_bias=True, prior_precision=prior).fit(data)
    a, b = scaled.log_marginal_likelihood(), plain.log_marginal_likelihood()
    assert plain.n_data == 12 and abs(float(a - b)) > 1.0
    torch.testing.assert_close(b, ref.log_marginal_likelihood(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["curvlinops", "asdl", "backpack"])
def test_peer_diag_equals_exact_ggn_diagonal(float64, backend):
    """Diagonal peers: log p(D) ~= -(N/M) loss - 1/2 sum log(1 + (N/M) diag(GGN) / p0) - 1/2 scatter,
    with the diagonal of the exact GGN (torch.func Jacobians) of the seen batches."""
    model, data = _cnn(), _cnn_batches()
    prior = _prior(model)
    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])
    scale = N_TOTAL / len(y)
    params = [p for p in model.parameters()]
    d = exact_ggn(model, "classification", X, y).diagonal() * scale
    p0 = torch.cat([pr.expand(p.numel()) for pr, p in zip(prior, params)])
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    loss = nn.functional.cross_entropy(model(X), y, reduction="sum").detach() * scale
    want = -loss - 0.5 * torch.log1p(d / p0).sum() - 0.5 * (p0 * theta**2).sum()
    peer = PeerLaplace(model, backend, "diag", prior_precision=prior).fit(data, num_data=N_TOTAL)
    torch.testing.assert_close(peer.log_marginal_likelihood(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "curvature, hyper, match",
    [
        ({"backend": "curvlinops"}, {"augmentation": True}, "differentiable"),
        ({"backend": "marglik", "structure": "diag"}, {}, "structure=diag"),
        ({"backend": "asdl", "approx": "reduce"}, {"augmentation": False}, "ASDL implements only K-FAC-expand"),
        ({"backend": "backpack", "approx": "reduce"}, {"augmentation": False}, "backpack has no K-FAC-reduce"),
        ({"backend": "backpack", "approx": "expand", "fisher_type": "empirical"}, {"augmentation": False},
         "empirical"),
        ({"backend": "asdl", "approx": "expand", "fisher_type": "mc", "mc_samples": 4}, {"augmentation": False},
         "mc_samples"),
        ({"backend": "jax"}, {}, "curvature.backend=jax: not a valid choice; allowed: one of marglik, curvlinops, asdl, backpack"),
        ({"structure": "full"}, {}, "curvature.structure=full: not a valid choice; allowed: one of kron, diag"),
    ],
)
def test_config_rejects_what_a_backend_cannot_do(curvature, hyper, match):
    with pytest.raises(ValueError, match=match):
        Config.from_dict(curvature=curvature, hyper=hyper)


def test_config_accepts_peers_without_augmentation():
    for backend in ("curvlinops", "asdl", "backpack"):
        for structure in ("kron", "diag"):
            c = Config.from_dict(curvature={"backend": backend, "structure": structure, "approx": "expand"},
                                 hyper={"augmentation": False})
            assert c.curvature.backend == backend
    # diag ignores approx (no error for reduce), and curvlinops has reduce
    Config.from_dict(curvature={"backend": "asdl", "structure": "diag", "approx": "reduce"},
                     hyper={"augmentation": False})
    Config.from_dict(curvature={"backend": "curvlinops", "approx": "reduce"}, hyper={"augmentation": False})


def _tiny(model, curvature, epochs=2):
    return Config.from_dict(
        data={"name": "digits", "train_size": 48},
        model=model,
        curvature=curvature,
        hyper={"burn_in": 1, "frequency": 1, "steps": 2, "augmentation": False, "marglik_batches": 2,
               "marglik_batch_size": 16},
        trainer={"epochs": epochs, "batch_size": 16, "progress": False, "eval_batch_size": 512, "num_threads": 1},
        logger={"mode": "disabled"},
    )


def test_tuner_reports_a_peer_cannot_run_the_model_before_training(tmp_path):
    """BackPACK's KFLR has no AdaptiveAvgPool2d (SmallCNN) and no non-sequential models (WRN):
    both fail in the constructor, naming the backend and the reason."""
    cfg = _tiny({"name": "cnn", "width": 4, "hidden": 8}, {"backend": "backpack", "approx": "expand"})
    with pytest.raises(ValueError, match="backend=backpack.*AdaptiveAvgPool2d") as err:
        MarglikTuner(cfg, tmp_path / "a")
    assert isinstance(err.value, UserError)  # one line on the command line
    assert "model=mlp runs with backpack-kron-expand" in str(err.value)  # true: test_tuner_runs_a_peer_end_to_end
    cfg = _tiny({"name": "wrn16_4"}, {"backend": "backpack", "approx": "expand"})
    with pytest.raises(ValueError, match="needs an nn.Sequential model"):
        MarglikTuner(cfg, tmp_path / "b")
    assert not (tmp_path / "a" / "history.csv").exists()


def test_tuner_runs_a_peer_end_to_end(tmp_path):
    cfg = _tiny({"name": "mlp", "hidden": [16]}, {"backend": "curvlinops", "structure": "diag"})
    s = MarglikTuner(cfg, tmp_path).fit()
    assert s["backend"] == "curvlinops" and s["structure"] == "diag"
    assert math.isfinite(s["log_marglik"]) and s["n_laplace_fits"] == 1
    assert len(s["prior_precision"]) == 4 and s["prior_precision"] != [1.0] * 4  # layerwise, learned
    # the parameters of the run's model carry no BackPACK/ASDL leftovers and MAP training still works
    cfg = _tiny({"name": "mlp", "hidden": [16]}, {"backend": "backpack", "structure": "kron", "approx": "expand"},
                epochs=3)
    tuner = MarglikTuner(cfg, tmp_path / "bp")
    s = tuner.fit()
    assert math.isfinite(s["log_marglik"]) and s["n_laplace_fits"] == 2
    hooked = [m for m in tuner.model.modules() if m._forward_hooks or m._backward_hooks]
    assert not hooked, f"BackPACK hooks left on {hooked}"


def test_sequential_view_shares_the_parameters():
    model = _mlp()
    view = sequential_view(model)
    x = torch.randn(4, 1, 3, 4)
    torch.testing.assert_close(view(x), model(x))
    assert [id(p) for p in view.parameters()] == [id(p) for p in model.parameters()]


def test_wandb_labels_name_backend_and_structure():
    assert curvature_label({"approx": "reduce"}) == "marglik-reduce-reduce"
    assert curvature_label({"approx": "expand", "copies_approx": "reduce"}) == "marglik-expand-reduce"
    assert curvature_label({"backend": "curvlinops", "structure": "kron", "approx": "expand"}) == "curvlinops-kron-expand"
    assert curvature_label({"backend": "asdl", "structure": "diag", "approx": "reduce"}) == "asdl-diag"
    assert curvature_tags({"backend": "backpack", "structure": "diag", "approx": "expand"}) == [
        "backend:backpack", "structure:diag"]
    assert curvature_tags({"approx": "expand"}) == ["backend:marglik", "structure:kron", "approx:expand",
                                                   "bias:joint", "copies_approx:expand"]
    assert curvature_label({"approx": "reduce", "separate_bias": True}) == "marglik-reduce-reduce-sepbias"
    assert "bias:separate" in curvature_tags({"backend": "curvlinops", "approx": "expand"})  # the peers' own


def test_separate_bias_config():
    """null: marglik joint, peers separate; false with a peer is a one-line error naming the key."""
    from marglik.tuning import Config, ConfigError
    from marglik.tuning.backends import resolved_separate_bias

    assert not resolved_separate_bias(Config().curvature)
    assert resolved_separate_bias(Config.from_dict(curvature={"separate_bias": True}).curvature)
    peer = {"backend": "curvlinops", "approx": "expand"}
    assert resolved_separate_bias(Config.from_dict(curvature=peer, hyper={"augmentation": False}).curvature)
    with pytest.raises(ConfigError, match=r"^curvature.separate_bias=false: .*always keep weight and bias apart"):
        Config.from_dict(curvature={**peer, "separate_bias": False}, hyper={"augmentation": False})


@pytest.mark.parametrize("backend, structure", [("curvlinops", "kron"), ("curvlinops", "diag"), ("asdl", "kron"),
                                                ("asdl", "diag"), ("backpack", "kron"), ("backpack", "diag")])
def test_peer_mc_and_empirical_fishers_run(backend, structure):
    """MC Fisher and empirical Fisher through every peer that has them (BackPACK: no Kronecker EF)."""
    model, data = _mlp(), _batches()
    for fisher_type in ("mc", "empirical"):
        if backend == "backpack" and structure == "kron" and fisher_type == "empirical":
            continue
        la = PeerLaplace(copy.deepcopy(model), backend, structure, fisher_type=fisher_type,
                         prior_precision=_prior(model)).fit(data, num_data=N_TOTAL)
        assert torch.isfinite(la.log_marginal_likelihood())


def test_backpack_after_asdl_on_one_model_says_why():
    model, data = _mlp(), _batches()
    PeerLaplace(model, "asdl", "kron").fit(data)
    with pytest.raises(RuntimeError, match="BackPACK cannot hook a model on which ASDL has run"):
        PeerLaplace(model, "backpack", "kron").fit(data)
