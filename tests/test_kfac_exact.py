"""K-FAC-expand / reduce equal the exact GGN where theory says they must (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch
from cases import CASES
from reference import block, block_diagonal_mask, conv_expand, conv_reduce, exact_empirical_fisher, exact_ggn
from torch import nn

import marglik

RTOL = 1e-10


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_exact_in_its_setting(case, float64):
    model, X, y = case.data()
    G = exact_ggn(model, "regression", X, y)
    kron = marglik.KFAC(model, "regression", approx=case.setting).fit((X, y))
    K = kron.to_dense()
    mask = block_diagonal_mask(kron)
    assert K.shape == G.shape
    assert (K[~mask] == 0).all()
    assert rel_err(K, G * mask) < RTOL


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("linear_expand", "conv2d_stride_pad_expand")],
                         ids=lambda c: c.id)
def test_reduce_is_not_exact_in_expand_setting(case, float64):
    """The two flavours genuinely differ: reduce is wrong where only expand is exact."""
    model, X, y = case.data()
    G = exact_ggn(model, "regression", X, y)
    kron = marglik.KFAC(model, "regression", approx="reduce").fit((X, y))
    assert rel_err(kron.to_dense(), G * block_diagonal_mask(kron)) > 1e-3


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("likelihood,C", [("classification", 4), ("regression", 3), ("binary", 1)])
def test_single_example_single_linear_exact(approx, likelihood, C, float64):
    torch.manual_seed(1)
    lin = nn.Linear(5, C)
    X = torch.randn(1, 5)
    y = {"classification": torch.tensor([2]), "regression": torch.randn(1, C),
         "binary": torch.ones(1, 1)}[likelihood]
    K = marglik.KFAC(lin, likelihood, approx=approx).fit((X, y)).to_dense()
    G = exact_ggn(lin, likelihood, X, y)
    assert rel_err(K, G) < RTOL


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_single_example_empirical_fisher_exact(approx, float64):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(1, 4), torch.tensor([1])
    kron = marglik.KFAC(model, "classification", approx=approx, fisher_type="empirical").fit((X, y))
    F = exact_empirical_fisher(model, "classification", X, y)
    assert rel_err(kron.to_dense(), F * block_diagonal_mask(kron)) < RTOL


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_grouped_conv_blocks_equal_exact_per_group_blocks(dim, float64):
    """A single grouped conv (expand setting): the exact GGN is itself block-diagonal over groups."""
    torch.manual_seed(3)
    spatial = {1: (7,), 2: (5, 6), 3: (4, 4, 3)}[dim]
    model = conv_expand(dim, in_channels=4, hidden=(), C=6, kernel_size=2, groups=2, padding=1)
    X = torch.randn(3, 4, *spatial)
    y = torch.randn_like(model(X))
    G = exact_ggn(model, "regression", X, y)
    kron = marglik.KFAC(model, "regression", approx="expand").fit((X, y))
    assert kron.blocks[0].A.shape[0] == 2
    assert rel_err(kron.to_dense(), G) < RTOL


def test_grouped_conv_reduce_per_group_blocks(float64):
    """Reduce setting: the exact GGN couples groups through the head; K-FAC keeps per-group blocks."""
    torch.manual_seed(4)
    model = conv_reduce(2, in_channels=4, hidden=6, kernel_size=3, groups=2, padding=1)
    X = torch.randn(3, 4, 5, 5)
    y = torch.randn_like(model(X))
    G = exact_ggn(model, "regression", X, y)
    kron = marglik.KFAC(model, "regression", approx="reduce").fit((X, y))
    conv = kron.blocks[0]
    E = block(G, kron, conv)
    D = conv.to_dense()
    group_mask = D != 0
    assert rel_err(D, E * group_mask) < RTOL
    assert E[~group_mask].abs().max() > 1e-6  # the dropped inter-group couplings are real


class _NormNet(nn.Module):
    """Conv -> BatchNorm/GroupNorm -> Scale/Bias -> pool -> Linear -> LayerNorm -> Linear."""

    def __init__(self, bn_kwargs=None):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4, **(bn_kwargs or {}))
        self.gn = nn.GroupNorm(2, 4)
        self.scale = marglik.Scale()
        self.bias = marglik.Bias()
        self.lin = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.bias(self.scale(torch.tanh(self.gn(torch.tanh(self.bn(self.conv(x)))))))
        return self.head(self.ln(torch.tanh(self.lin(h.flatten(2).mean(-1)))))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_norm_blocks_equal_exact_2x2_blocks(approx, mode, float64):
    torch.manual_seed(5)
    model = _NormNet(None if mode == "eval" else {"track_running_stats": False})
    for p in model.parameters():
        p.data.normal_()
    model.train(mode == "train")
    X, y = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
    G = exact_ggn(model, "classification", X, y)
    kron = marglik.KFAC(model, "classification", approx=approx).fit((X, y))
    diag = [b for b in kron.blocks if isinstance(b, marglik.DiagonalBlock)]
    assert {b.name for b in diag} == {"bn", "gn", "scale", "bias", "ln"}
    for b in diag:
        D = b.to_dense()
        E = block(G, kron, b)
        assert rel_err(D, E * (D != 0)) < RTOL, b.name


def test_frozen_weight_bias_only_block(float64):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    X, y = torch.randn(1, 3), torch.tensor([1])
    kron = marglik.KFAC(model, "classification").fit((X, y))
    assert kron.num_params == 4 + 8 + 2
    G = exact_ggn(model, "classification", X, y)
    assert rel_err(kron.to_dense(), G * block_diagonal_mask(kron)) < RTOL
