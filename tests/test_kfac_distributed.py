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


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_all_reduce_equals_single_process(approx, tmp_path):
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
