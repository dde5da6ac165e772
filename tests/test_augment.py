"""Learnable affine augmentation: identity at zero, differentiability, ranges."""

from __future__ import annotations

import math

import pytest
import torch

from marglik.augment import ALL_GENERATORS, AffineAugmentation
from marglik.models import SmallCNN


def test_identity_at_zero():
    aug = AffineAugmentation(n_samples=3)
    assert aug.eta.shape == (6,) and torch.all(aug.eta == 0)
    x = torch.rand(4, 2, 9, 7)
    out = aug(x)
    assert out.shape == (4, 3, 2, 9, 7)
    torch.testing.assert_close(out, x.unsqueeze(1).expand_as(out), atol=1e-6, rtol=0)


def test_reproducible_with_generator_and_random_otherwise():
    aug = AffineAugmentation(n_samples=2)
    with torch.no_grad():
        aug.eta.fill_(0.5)
    x = torch.rand(3, 1, 8, 8)
    a = aug(x, generator=torch.Generator().manual_seed(1))
    b = aug(x, generator=torch.Generator().manual_seed(1))
    c = aug(x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[:, 0], a[:, 1])  # copies differ
    fixed = AffineAugmentation(2, generator=torch.Generator().manual_seed(1))
    fixed.load_state_dict(aug.state_dict())
    torch.testing.assert_close(fixed(x), a)


def test_rotation_by_90_degrees():
    aug = AffineAugmentation(1, generators=("rotation",))
    with torch.no_grad():
        aug.eta.fill_(math.pi / 2)
    x = torch.rand(1, 1, 6, 6)
    out = aug(x, eps=torch.ones(1, 1, 1))[:, 0]
    # a quarter turn of a square image is a pixel permutation
    assert torch.allclose(out, torch.rot90(x, 1, (2, 3)), atol=1e-5) or torch.allclose(
        out, torch.rot90(x, -1, (2, 3)), atol=1e-5
    )
    assert aug.ranges() == pytest.approx({"rotation": 90.0})


def test_gradcheck_eta():
    aug = AffineAugmentation(n_samples=2).double()
    torch.manual_seed(0)
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64)
    eps = 2 * torch.rand(2, 2, 6, dtype=torch.float64) - 1
    eta0 = torch.tensor([0.1, -0.2, 0.3, 0.15, -0.1, 0.05], dtype=torch.float64, requires_grad=True)

    def f(eta):
        return torch.func.functional_call(aug, {"eta": eta}, (x,), {"eps": eps})

    assert torch.autograd.gradcheck(f, (eta0,), eps=1e-6, atol=1e-5)


def test_gradient_reaches_eta_through_model():
    torch.manual_seed(0)
    aug = AffineAugmentation(n_samples=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        aug.eta.fill_(0.2)
    model = SmallCNN(1, 3, width=4, hidden=8)
    loss = model(aug(torch.rand(5, 1, 8, 8))).logsumexp(1).sum()
    loss.backward()
    assert aug.eta.grad is not None and torch.all(aug.eta.grad != 0)


def test_ranges_units_and_subset():
    aug = AffineAugmentation(generators=ALL_GENERATORS)
    with torch.no_grad():
        aug.eta.copy_(torch.tensor([0.5, -0.25, math.pi / 4, 0.1, 0.2, -0.3]))
    r = aug.ranges()
    assert list(r) == list(ALL_GENERATORS)
    assert r["rotation"] == pytest.approx(45.0) and r["translation_y"] == pytest.approx(0.25)
    assert r["shear"] == pytest.approx(0.3)
    assert aug.ranges(image_size=32)["translation_x"] == pytest.approx(8.0)
    sub = AffineAugmentation(generators=("rotation", "translation_x"))
    assert sub.eta.shape == (2,)
    with pytest.raises(ValueError):
        AffineAugmentation(generators=("zoom",))
