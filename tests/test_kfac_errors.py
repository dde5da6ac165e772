"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import marglik


def test_unsupported_layer_named():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(marglik.UnsupportedModuleError, match=r"'0'.*Embedding"):
        marglik.KFAC(model)


@pytest.mark.parametrize("spec", ["0", nn.Embedding])
def test_ignore_modules_leaves_parameters_out(spec):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    kfac = marglik.KFAC(model, ignore_modules=[spec])
    X, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 2, (5, 3))
    kron = kfac.fit((X, y))
    assert [b.name for b in kron.blocks] == ["1"]
    assert kron.to_dense().shape == (10, 10)
    assert kron.params == [model[1].weight, model[1].bias]


def test_unknown_options():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="likelihood"):
        marglik.KFAC(model, likelihood="poisson")
    with pytest.raises(ValueError, match="approximation"):
        marglik.KFAC(model, approx="diag")
    with pytest.raises(ValueError, match="fisher_type"):
        marglik.KFAC(model, fisher_type="exact")
    with pytest.raises(ValueError, match="mc_samples"):
        marglik.KFAC(model, fisher_type="mc", mc_samples=0)


@pytest.mark.parametrize(
    "likelihood,y,match",
    [
        ("classification", torch.zeros(4, 3), "integer"),
        ("classification", torch.zeros(4, 2, dtype=torch.long), "do not match"),
        ("classification", torch.full((4,), 7), r"\[0, 3\)"),
        ("regression", torch.zeros(4, 2), "do not match"),
        ("regression", torch.zeros(5, 3), "batch size"),
        ("binary", torch.zeros(4, 3), "do not match"),
    ],
)
def test_target_shape_mismatch(likelihood, y, match):
    C = 1 if likelihood == "binary" else 3
    model = nn.Linear(2, C)
    with pytest.raises(ValueError, match=match):
        marglik.KFAC(model, likelihood).fit((torch.randn(4, 2), y))


def test_non_finite_loss():
    model = nn.Linear(2, 3)
    X = torch.randn(4, 2)
    X[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        marglik.KFAC(model).fit((X, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(FloatingPointError, match="targets"):
        marglik.KFAC(model, "regression").fit((torch.randn(4, 2), torch.full((4, 3), float("inf"))))


def test_empty_data():
    model = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="empty"):
        marglik.KFAC(model).fit([])


def test_input_modified_in_place_after_its_module_ran():
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            out = self.b(h)
            h.mul_(2)  # b's input changes after b ran: its input statistics would be wrong
            return out + h.sum(1, keepdim=True)

    with pytest.raises(RuntimeError, match="input of module 'b' was modified in place"):
        marglik.KFAC(Late()).fit((torch.randn(4, 2), torch.zeros(4, dtype=torch.long)))


def test_layer_norm_subclass_with_own_forward_has_no_rule():
    class Odd(nn.LayerNorm):  # normalises axes the trailing-norm rule cannot know
        def forward(self, x):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)

    with pytest.raises(marglik.UnsupportedModuleError, match="'0' of type Odd"):
        marglik.KFAC(nn.Sequential(Odd(3), nn.Flatten(), nn.Linear(6, 2)))


def test_rows_not_mappable_to_examples():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x.reshape(-1, 2))[:2]  # 6 rows for 2 examples, then cut to 2

    with pytest.raises(ValueError):
        marglik.KFAC(Bad(), "regression", approx="reduce").fit((torch.randn(3, 2), torch.randn(2, 2)))


def test_tying_across_different_modules_rejected():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.weight = a.weight
    with pytest.raises(marglik.UnsupportedModuleError, match="shared between modules"):
        marglik.KFAC(nn.Sequential(a, b))


def test_no_trainable_parameters():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        marglik.KFAC(model)


def test_num_data_must_be_positive():
    model = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="num_data"):
        marglik.KFAC(model).fit((torch.randn(4, 2), torch.zeros(4, dtype=torch.long)), num_data=0)
