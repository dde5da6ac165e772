"""Factors are sums over data: two gloo ranks on disjoint shards equal one process on all data."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import marglik


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (10,), generator=g)


def _worker(rank, world, init_file, approx, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        X, y = _data()
        shard = slice(0, 6) if rank == 0 else slice(6, 10)  # unequal shards on purpose
        kfac = marglik.KFAC(_model(), "classification", approx=approx)
        kfac.fit((X[shard], y[shard]))
        kron = kfac.fit((X[shard], y[shard]))  # every fit all-reduces, not only the first
        if rank == 0:
            torch.save({"dense": kron.to_dense().detach(), "num_data": kron.num_data, "loss": kron.meta["loss"]},
                       out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("approx", ["expand", "reduce", "auto", {"0": "reduce", "*": "expand"}],
                         ids=["expand", "reduce", "auto", "per-layer"])
def test_all_reduce_equals_single_process(approx, tmp_path):
    """Per-layer flavours too (``auto``: the convolution's factors dense, the linear layer's rows)."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    init_file = str(tmp_path / "init")
    out_file = str(tmp_path / "out.pt")
    mp.spawn(_worker, args=(2, init_file, approx, out_file), nprocs=2, join=True)
    res = torch.load(out_file, weights_only=True)
    X, y = _data()
    ref = marglik.KFAC(_model(), "classification", approx=approx).fit((X, y))
    assert res["num_data"] == 10
    assert torch.allclose(res["dense"], ref.to_dense().detach(), rtol=1e-10, atol=1e-12)
    assert torch.allclose(res["loss"], ref.meta["loss"])


def _grad_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        X, y = _data()
        shard = slice(0, 6) if rank == 0 else slice(6, 10)
        scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)  # acts through the data only
        kron = marglik.KFAC(_model(), "classification", approx="reduce", differentiable=True).fit(
            (X[shard] * scale, y[shard]))
        f = kron.to_dense().square().sum() + kron.meta["loss"]  # nonlinear in the reduced sums
        with warnings.catch_warnings():  # not through torch's deprecated no-autograd-kernel fallback
            warnings.simplefilter("error", UserWarning)
            (g,) = torch.autograd.grad(f, scale)
        g = g.detach().clone()
        dist.all_reduce(g)  # each rank's gradient is its shard's share
        if rank == 0:
            torch.save({"f": f.detach(), "grad": g}, out_file)
    finally:
        dist.destroy_process_group()


def test_differentiable_all_reduce_gradient_sums_over_ranks(tmp_path):
    """With ``differentiable=True`` the reduced sums carry gradients to each rank's own shard:
    the gradients summed over ranks equal the single-process gradient of the same function."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    out_file = str(tmp_path / "out.pt")
    mp.spawn(_grad_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    res = torch.load(out_file, weights_only=True)
    X, y = _data()
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    kron = marglik.KFAC(_model(), "classification", approx="reduce", differentiable=True).fit((X * scale, y))
    f = kron.to_dense().square().sum() + kron.meta["loss"]
    (g,) = torch.autograd.grad(f, scale)
    assert torch.allclose(res["f"], f.detach(), rtol=1e-10)
    assert torch.allclose(res["grad"], g, rtol=1e-9), (res["grad"], g)


def _laplace(X, y, scale):
    la = marglik.KronLaplace(_model(), "classification", approx="reduce", differentiable=True)
    la.fit((X * scale, y), num_data=10)
    prior = torch.linspace(0.5, 2.0, 4, dtype=torch.float64, requires_grad=True)
    lml = la.log_marginal_likelihood(prior)
    return la, lml, prior


def _laplace_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        X, y = _data()
        shard = slice(0, 6) if rank == 0 else slice(6, 10)
        scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        la, lml, prior = _laplace(X[shard], y[shard], scale)
        g_scale, g_prior = torch.autograd.grad(lml, [scale, prior])
        g_scale = g_scale.detach().clone()
        dist.all_reduce(g_scale)  # each rank's data gradient is its shard's share
        forms = [type(b.A_factor).__name__ for b in la.kron.blocks]
        if rank == 0:
            torch.save({"lml": lml.detach(), "g_scale": g_scale, "g_prior": g_prior, "forms": forms}, out_file)
    finally:
        dist.destroy_process_group()


def test_rows_gathered_over_ranks_equal_one_process(tmp_path):
    """Factors kept as rows are all-gathered (not multiplied out): the Laplace log marglik, its prior
    gradient and the data gradient through the rows equal one process on all data; a factor whose
    rows pass the bound on one rank is dense on every rank."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    out_file = str(tmp_path / "out.pt")
    mp.spawn(_laplace_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    res = torch.load(out_file, weights_only=True)
    # conv A (10 wide): 6 rows on rank 0 pass half of it while rank 1's 4 do not: dense on both ranks
    # (one process: 10 rows, dense); linear A (49 wide): 6 + 4 rows gathered
    assert res["forms"] == ["Tensor", "RowFactor"]
    X, y = _data()
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    la, lml, prior = _laplace(X, y, scale)
    g_scale, g_prior = torch.autograd.grad(lml, [scale, prior])
    assert [type(b.A_factor).__name__ for b in la.kron.blocks] == ["Tensor", "RowFactor"]
    torch.testing.assert_close(res["lml"], lml.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res["g_prior"], g_prior, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res["g_scale"], g_scale, rtol=1e-9, atol=1e-10)
