"""``copies_approx``: augmented copies (``m N`` example-major rows) as their own K-FAC axis.

Exactness against the exact GGN in float64 for deep linear networks (Gaussian likelihood), in the
three settings of issue 9, each with a negative control:

(i) copies averaged before a per-position loss: expand (positions) + reduce (copies) exact;
(ii) copies averaged and positions pooled: reduce / reduce exact;
(iii) copies feeding separate outputs: expand on copies exact (with either flavour on positions).
"""

from __future__ import annotations

import pytest
import torch
from reference import block_diagonal_mask, conv_expand, conv_reduce, deep_linear_expand, deep_linear_reduce, exact_ggn
from torch import nn

import marglik
from marglik import KFAC, KronLaplace
from marglik.augment import AffineAugmentation

RTOL = 1e-10
N, M = 3, 4  # examples, copies per example


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


class _OnCopies(nn.Module):
    """``x (N, m, ...)`` -> ``inner`` on the ``N m`` example-major rows; subclasses combine the copies."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        n, m = x.shape[:2]
        return self.combine(self.inner(x.reshape(n * m, *x.shape[2:])), n, m)


class CopiesAveraged(_OnCopies):
    """Mean over the copies (of every output position): ``(N, *inner_out)``."""

    @staticmethod
    def combine(out, n, m):
        return out.reshape(n, m, *out.shape[1:]).mean(1)


class CopiesSeparate(_OnCopies):
    """Every copy's outputs are their own loss positions: ``(N, m * R, C)`` (``R = 1`` for an
    ``(N m, C)`` inner output)."""

    @staticmethod
    def combine(out, n, m):
        return out.reshape(n, -1, out.shape[-1])


def error(model, X, approx, copies_approx, **kw):
    y = torch.randn_like(model(X))
    G = exact_ggn(model, "regression", X, y)
    kron = KFAC(model, "regression", approx=approx, copies_approx=copies_approx, **kw).fit((X, y))
    return rel_err(kron.to_dense(), G * block_diagonal_mask(kron))


def per_position_models():
    torch.manual_seed(0)
    yield "linear", CopiesAveraged(deep_linear_expand(3, (4, 5), 2)), torch.randn(N, M, 6, 3)
    yield "conv", CopiesAveraged(conv_expand(2, in_channels=2, hidden=(3,), C=2, kernel_size=2, padding=1)), \
        torch.randn(N, M, 2, 4, 4)


# (i) --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "conv"])
def test_copies_averaged_per_position_loss(name, float64):
    _, model, X = next(c for c in per_position_models() if c[0] == name)
    assert error(model, X, "expand", "reduce") < RTOL
    assert error(model, X, "expand", "expand") > 1e-3  # negative control: expand on copies
    assert error(model, X, "expand", None) > 1e-3  # None = today's behaviour = expand on copies
    assert error(model, X, "reduce", "reduce") > 1e-3  # positions are not pooled


def test_copies_averaged_per_position_loss_channels_last(float64):
    """The copy reduction works on channels-last layer inputs and gradients as well."""
    torch.manual_seed(1)
    model = CopiesAveraged(conv_expand(2, in_channels=2, hidden=(3, 4), C=2, kernel_size=3, padding=1))
    X = torch.randn(N, M, 2, 5, 5)
    y = torch.randn_like(model(X))
    G = exact_ggn(model, "regression", X.reshape(N, M, 2, 5, 5), y)
    for cl in (True, False):
        kron = KFAC(model, "regression", approx="expand", copies_approx="reduce", channels_last=cl).fit((X, y))
        assert rel_err(kron.to_dense(), G * block_diagonal_mask(kron)) < RTOL


# (ii) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "conv"])
def test_copies_averaged_positions_pooled(name, float64):
    torch.manual_seed(2)
    if name == "linear":
        model, X = CopiesAveraged(deep_linear_reduce(3, (4,), 2)), torch.randn(N, M, 5, 3)
    else:
        model, X = CopiesAveraged(conv_reduce(2, in_channels=2, hidden=3, kernel_size=2)), torch.randn(N, M, 2, 4, 4)
    assert error(model, X, "reduce", "reduce") < RTOL
    assert error(model, X, "reduce", None) < RTOL
    assert error(model, X, "expand", "reduce") > 1e-3  # negative control: positions expanded
    assert error(model, X, "reduce", "expand") > 1e-3  # negative control: copies expanded


# (iii) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_copies_feeding_separate_outputs(approx, float64):
    """No positions inside a copy: the flavour on positions is irrelevant, expand on copies exact."""
    torch.manual_seed(3)
    model, X = CopiesSeparate(deep_linear_expand(3, (4,), 2)), torch.randn(N, M, 3)
    assert error(model, X, approx, "expand") < RTOL
    assert error(model, X, approx, "reduce") > 1e-3  # negative control: reduce on copies


def test_copies_feeding_separate_outputs_positions_pooled(float64):
    """Positions pooled inside each copy, each copy its own output: reduce (positions) + expand
    (copies) exact; reduce on both is not."""
    torch.manual_seed(4)
    for model, X in [
        (CopiesSeparate(deep_linear_reduce(3, (4,), 2)), torch.randn(N, M, 5, 3)),
        (CopiesSeparate(conv_reduce(2, in_channels=2, hidden=3, kernel_size=2, padding=1)), torch.randn(N, M, 2, 4, 4)),
    ]:
        assert error(model, X, "reduce", "expand") < RTOL
        assert error(model, X, "reduce", "reduce") > 1e-3
        assert error(model, X, "expand", "expand") > 1e-3


def test_copies_feeding_separate_per_position_outputs(float64):
    """Every (copy, position) its own loss term: expand / expand exact, reducing copies is not."""
    torch.manual_seed(5)
    model, X = CopiesSeparate(deep_linear_expand(3, (4,), 2)), torch.randn(N, M, 5, 3)
    assert error(model, X, "expand", "expand") < RTOL
    assert error(model, X, "expand", "reduce") > 1e-3


# ------------------------------------------------------------------------------------------------
def test_without_copies_copies_approx_changes_nothing(float64):
    """``T = N`` rows (and ``example_index`` rows) hold no copies: the factors are identical."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4))
    X, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    for approx in ("expand", "reduce"):
        ref = KFAC(model, approx=approx).fit((X, y))
        other = KFAC(model, approx=approx, copies_approx={"expand": "reduce", "reduce": "expand"}[approx]).fit((X, y))
        for a, b in zip(ref.blocks, other.blocks):
            torch.testing.assert_close(a.A, b.A, rtol=0, atol=0)
            torch.testing.assert_close(a.B, b.B, rtol=0, atol=0)
        assert ref.meta["copies_approx"] == approx and other.meta["copies_approx"] != approx


def test_options_and_errors():
    model = nn.Linear(3, 2)
    assert KFAC(model, approx="expand").copies_approx is marglik.KFACApprox.EXPAND
    assert KFAC(model, approx="reduce").copies_approx is marglik.KFACApprox.REDUCE
    assert KFAC(model, approx="expand", copies_approx="reduce").copies_approx is marglik.KFACApprox.REDUCE
    with pytest.raises(ValueError, match="copies_approx"):
        KFAC(model, copies_approx="mean")


def test_tied_calls_with_different_copy_counts_error():
    """reduce + expand-on-copies needs the same copies in every call of a tied module."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):  # x (N, 2, 3): one call on N*2 rows, one on N rows
            n = x.shape[0]
            a = self.lin(x.reshape(2 * n, 3)).reshape(n, 2, 3).mean(1)
            return self.lin(a)

    model = Tied()
    X, y = torch.randn(4, 2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="different numbers of augmented copies"):
        KFAC(model, "regression", approx="reduce", copies_approx="expand").fit((X, y))
    KFAC(model, "regression", approx="expand", copies_approx="reduce").fit((X, y))  # fine: per call


@pytest.mark.parametrize("approx,copies_approx", [("expand", "reduce"), ("reduce", "expand")])
def test_mixed_batches_sum_to_full_batch(approx, copies_approx, float64):
    torch.manual_seed(7)
    model = CopiesAveraged(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)))
    X, y = torch.randn(10, 3, 1, 6, 6), torch.randint(0, 4, (10,))
    kfac = KFAC(model, "classification", approx=approx, copies_approx=copies_approx)
    full = kfac.fit((X, y))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=3)
    batched = kfac.fit(loader)
    for a, b in zip(full.blocks, batched.blocks):
        assert rel_err(b.A, a.A) < RTOL and rel_err(b.B, a.B) < RTOL


class TinyInvariantCNN(nn.Module):
    """``(N, S, 1, 6, 6)`` -> conv -> tanh -> mean pool -> linear, logits averaged over copies."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        n, s = x.shape[:2]
        h = torch.tanh(self.conv(x.reshape(n * s, *x.shape[2:]))).mean((2, 3))
        return self.head(h).reshape(n, s, -1).mean(1)


def test_differentiable_augmentation_gradient_mixed_flavour(float64):
    """Learned augmentation through K-FAC-expand (positions) + reduce (copies): the log marginal
    likelihood's gradient w.r.t. ``eta`` matches finite differences (fixed noise) and is nonzero."""
    torch.manual_seed(8)
    model = TinyInvariantCNN()
    aug = AffineAugmentation(n_samples=3, generators=("rotation", "translation_x")).double()
    X, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    eps = aug.sample_eps(4)

    def lml(eta):
        Xa = torch.func.functional_call(aug, {"eta": eta}, (X,), {"eps": eps})
        la = KronLaplace(model, "classification", approx="expand", copies_approx="reduce",
                         prior_precision=0.5, differentiable=True)
        la.fit([(Xa[:2], y[:2]), (Xa[2:], y[2:])])
        assert la.kron.meta["copies_approx"] == "reduce"
        return la.log_marginal_likelihood()

    eta = torch.tensor([0.3, 0.2], requires_grad=True)
    g, = torch.autograd.grad(lml(eta), eta)
    assert g.abs().min() > 0
    assert torch.autograd.gradcheck(lml, (eta,))
