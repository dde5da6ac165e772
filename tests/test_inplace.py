"""Module outputs modified in place later in the forward are recorded exactly, the model untouched.

Reference: the exact GGN (``torch.func``) on one example, where K-FAC is exact for a network of
Linear layers; the same network with out-of-place operations gives the same factors. Negative
control: the gradient w.r.t. the *tensor* after the in-place op (what a tensor hook registered
after the forward sees) differs, so recording must not take it.
"""

from __future__ import annotations

import pytest
import torch
from reference import exact_ggn
from torch import nn

import marglik


class Net(nn.Module):
    """Linear -> in-place ReLU -> Linear (+= residual, in place) -> in-place scale -> Linear."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        h = self.act(self.a(x))
        out = self.b(h)
        if self.inplace:
            out += h
            out.mul_(1.5)
        else:
            out = (out + h) * 1.5
        return self.c(out)


@pytest.mark.parametrize("batched", [False, True])
def test_inplace_equals_exact_ggn_and_out_of_place(batched, float64):
    torch.manual_seed(0)
    model = Net(inplace=True)
    twin = Net(inplace=False)
    twin.load_state_dict(model.state_dict())
    X, y = torch.randn(1, 4), torch.tensor([2])
    kron = marglik.KFAC(model, batched_backward=batched).fit((X, y))
    K = kron.to_dense()
    G = exact_ggn(model, "classification", X, y)
    mask = torch.zeros_like(G, dtype=torch.bool)
    for b in kron.blocks:
        idx = kron.block_indices(b)
        mask[idx[:, None], idx[None, :]] = True
    assert ((K - G * mask).norm() / (G * mask).norm()).item() < 1e-10
    K2 = marglik.KFAC(twin, batched_backward=batched).fit((X, y)).to_dense()
    assert ((K - K2).norm() / K2.norm()).item() < 1e-12


def test_gradient_wrt_modified_tensor_differs(float64):
    """Negative control: after ``out.mul_(1.5)`` the tensor's gradient is w.r.t. the new value."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x = torch.randn(1, 3)
    y = lin(x)
    from torch.autograd.graph import get_gradient_edge

    edge = get_gradient_edge(y)
    y.mul_(1.5)
    out = (y * torch.tensor([1.0, -2.0])).sum()
    (g_edge,) = torch.autograd.grad(out, [edge], retain_graph=True)
    (g_tensor,) = torch.autograd.grad(out, [y])
    torch.testing.assert_close(g_edge, 1.5 * g_tensor)
    assert not torch.allclose(g_edge, g_tensor)
