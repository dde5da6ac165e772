"""The batchwise gradient (``hyper.batchwise``, :mod:`marglik.curvature.batchwise`): two passes over the
fit batches, one batch's autograd graph at a time, must give the one-pass differentiable fit's log
marginal likelihood and gradients w.r.t. the prior precision and the augmentation ranges, in float64 to
1e-10, with factors kept as rows, dense, and crossing from rows to dense while the batches accumulate.
A second pass that sees the batches in another order is a negative control; the tuner with
``hyper.batchwise=true`` follows the same trajectory as without; the combinations it cannot serve are
config errors."""

from __future__ import annotations

import pytest
import torch
from test_row_factors import DT, TOL, Net, n_row_factors
from test_tuning import tiny

from marglik import AffineAugmentation, KronLaplace
from marglik.curvature.batchwise import batchwise_gradients, check_consumed, contract
from marglik.curvature.kron import KronBlock
from marglik.tuning import ConfigError, tune


def _setup(n_batches: int = 3, n: int = 4):
    torch.manual_seed(0)
    model = Net(2, (8, 32, 32)).to(DT)
    aug = AffineAugmentation(n_samples=2).to(DT)
    with torch.no_grad():
        aug.eta.fill_(0.2)
    g = torch.Generator().manual_seed(1)
    raw = [(torch.randn(n, 2, 6, 6, generator=g, dtype=DT), aug.sample_eps(n, torch.Generator().manual_seed(10 + b)),
            torch.randint(0, 2, (n,), generator=g)) for b in range(n_batches)]
    return model, aug, raw


def _one_pass(model, aug, raw, prior, **kw):
    la = KronLaplace(model, "classification", differentiable=True, **kw)
    la.fit([(aug(x, eps=e), y) for x, e, y in raw], num_data=100)
    p = prior.clone().requires_grad_(True)
    lml = la.log_marginal_likelihood(p)
    return (la, lml.detach(), *torch.autograd.grad(lml, [aug.eta, p]))


def _two_pass(model, aug, raw, prior, **kw):
    """:func:`batchwise_gradients`: ``(la, leaves, lml, eta grad, prior grad)``."""
    la = KronLaplace(model, "classification", differentiable=True, **kw)
    p = prior.clone().requires_grad_(True)
    lml, (gp,), (ge,) = batchwise_gradients(la, raw, lambda r: (aug(r[0], eps=r[1]), r[2]), 100,
                                            lambda fitted: fitted.log_marginal_likelihood(p), [p], [aug.eta])
    leaves = [leaf for b in la.kfac._sums for leaf in (b.A.rows, b.A.dense, b.grad.rows, b.grad.dense) if leaf is not None]
    return la, leaves, lml, ge, gp


def _second_pass_in_order(model, aug, raw, prior, order, **kw):
    """The two passes written out, the second one over the batches in ``order``."""
    la = KronLaplace(model, "classification", differentiable=True, **kw)
    with torch.no_grad():
        first = [(aug(x, eps=e), y) for x, e, y in raw]
    leaves = la.fit_leaves(first, num_data=100)
    lml = la.log_marginal_likelihood(prior)
    grads = torch.autograd.grad(lml, [leaf.tensor for leaf in leaves], allow_unused=True)
    eta_grad, offsets = torch.zeros_like(aug.eta), {}
    for b in order:
        x, e, y = raw[b]
        part = contract(leaves, list(grads), la.kfac.batch_sums(aug(x, eps=e), y), offsets)
        eta_grad = eta_grad + torch.autograd.grad(part, aug.eta)[0]
    check_consumed(leaves, offsets)
    return leaves, eta_grad


@pytest.mark.parametrize("approx,copies_approx", [("reduce", "reduce"), ("expand", "reduce"), ("expand", "expand")])
@pytest.mark.parametrize("form", ["auto", "dense"])
def test_two_passes_equal_the_one_pass_gradient(approx, copies_approx, form):
    model, aug, raw = _setup()
    prior = torch.rand(sum(1 for _ in model.parameters()), generator=torch.Generator().manual_seed(2), dtype=DT) + 0.3
    kw = dict(approx=approx, copies_approx=copies_approx, factor_form=form)
    la1, l1, e1, p1 = _one_pass(model, aug, raw, prior, **kw)
    la2, leaves, l2, e2, p2 = _two_pass(model, aug, raw, prior, **kw)
    if form == "auto" and approx == "reduce":  # the rows path is exercised (the totals kept rows)
        assert n_row_factors(la2.kron) >= 1 and any(b.A.rows is not None for b in la2.kfac._sums)
    assert e1.abs().max() > 1e-3  # a gradient that is not trivially zero
    torch.testing.assert_close(l2, l1, **TOL)
    torch.testing.assert_close(e2, e1, **TOL)
    torch.testing.assert_close(p2, p1, **TOL)


@pytest.mark.parametrize("fisher_type", ["mc-root", "mc"])
def test_monte_carlo_draws_are_replayed_in_the_second_pass(fisher_type):
    """A Monte-Carlo fit draws per batch: the second pass restores the random state the first pass
    started from, so both draw the same signs or labels and the gradient equals the one-pass gradient
    from the same seed; the global random state ends where one pass leaves it. Negative control: the
    second pass written out without the replay (fresh draws) does not reproduce it."""
    model, aug, raw = _setup()
    prior = torch.tensor(0.7, dtype=DT)
    kw = dict(approx="reduce", fisher_type=fisher_type)
    torch.manual_seed(3)
    _, l1, e1, p1 = _one_pass(model, aug, raw, prior, **kw)
    after_one = torch.get_rng_state()
    torch.manual_seed(3)
    _, _, l2, e2, p2 = _two_pass(model, aug, raw, prior, **kw)
    assert torch.equal(torch.get_rng_state(), after_one)
    torch.testing.assert_close(l2, l1, **TOL)
    torch.testing.assert_close(e2, e1, **TOL)
    torch.testing.assert_close(p2, p1, **TOL)
    torch.manual_seed(3)
    _, e3 = _second_pass_in_order(model, aug, raw, prior, [0, 1, 2], **kw)
    assert (e3 - e1).abs().max() > 1e-6 * e1.abs().max()


def test_rows_crossing_to_dense_while_accumulating():
    """Batches of 4 images: the reduce input factors of the wide layers hold rows for the first batches
    and turn dense once the rows pass half their dimension; the batches' rows are then contracted as
    dense sums, with the same gradient."""
    model, aug, raw = _setup(n_batches=6)
    prior = torch.tensor(0.7, dtype=DT)
    _, l1, e1, _ = _one_pass(model, aug, raw, prior, approx="reduce")
    la, leaves, l2, e2, _ = _two_pass(model, aug, raw, prior, approx="reduce")
    one_batch = KronLaplace(model, "classification", approx="reduce")
    one_batch.fit([(aug(raw[0][0], eps=raw[0][1]).detach(), raw[0][2])])
    crossed = [i for i, (b1, b) in enumerate(zip(one_batch.kron.blocks, la.kron.blocks)) if isinstance(b, KronBlock)
               and type(b1.A_factor).__name__ == "RowFactor" and type(b.A_factor).__name__ != "RowFactor"]
    assert crossed  # some factor was rows after one batch and dense after all of them
    torch.testing.assert_close(l2, l1, **TOL)
    torch.testing.assert_close(e2, e1, **TOL)


def test_negative_control_second_pass_in_another_order():
    """The rows of a rows-form total are matched by position: a second pass in another order pairs
    each batch with another batch's gradient rows and must not reproduce the gradient."""
    model, aug, raw = _setup()
    prior = torch.tensor(0.7, dtype=DT)
    _, _, e1, _ = _one_pass(model, aug, raw, prior, approx="reduce")
    leaves, e2 = _second_pass_in_order(model, aug, raw, prior, [2, 1, 0], approx="reduce")
    assert any(leaf.form == "rows" for leaf in leaves)
    _, e3 = _second_pass_in_order(model, aug, raw, prior, [0, 1, 2], approx="reduce")
    torch.testing.assert_close(e3, e1, **TOL)  # in order, the written-out passes do reproduce it
    assert (e2 - e1).abs().max() > 1e-6


@pytest.mark.parametrize("fisher_type", ["type-2", "mc-root"])
def test_tuner_batchwise_follows_the_same_trajectory(tmp_path, fisher_type):
    h = {"marglik_batches": 3, "marglik_batch_size": 16}
    c = {"fisher_type": fisher_type}
    a = tune(tiny(trainer={"epochs": 3}, hyper=h, curvature=c), tmp_path / "a")
    b = tune(tiny(trainer={"epochs": 3}, hyper={**h, "batchwise": True}, curvature=c), tmp_path / "b")
    assert b["n_laplace_fits"] == a["n_laplace_fits"] > 0
    for key in ("log_marglik", "test_nll"):
        assert b[key] == pytest.approx(a[key], rel=1e-4)
    assert b["prior_precision"] == pytest.approx(a["prior_precision"], rel=1e-4)
    assert b["augmentation"]["rotation"] == pytest.approx(a["augmentation"]["rotation"], rel=1e-4)
    assert a["augmentation"]["rotation"] > 0.1  # eta moved: the gradient compared is not zero


@pytest.mark.parametrize("section, problem", [
    ({"curvature": {"backend": "curvlinops"}}, "laplace-torch backend"),
])
def test_batchwise_combinations_it_cannot_serve_are_config_errors(section, problem):
    with pytest.raises(ConfigError, match="hyper.batchwise") as err:
        tiny(hyper={"batchwise": True}, **section)
    assert problem in str(err.value)


def test_sums_as_leaves_refuses_distributed_sums():
    """Under torch.distributed the summed factors are not the local batches' (one rank's second pass
    could not contract them): refused, not silently wrong."""
    from marglik import KFAC

    model, aug, raw = _setup(n_batches=1)
    k = KFAC(model, "classification", distributed=True)
    k.accumulate_batch(aug(raw[0][0], eps=raw[0][1]).detach(), raw[0][2])
    with pytest.raises(RuntimeError, match="torch.distributed"):
        k.sums_as_leaves()
