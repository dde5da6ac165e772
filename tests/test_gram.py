"""The symmetric blocked Gram product equals the plain one (and is exactly symmetric)."""

import pytest
import torch

from marglik.curvature.gram import sym_gram


@pytest.mark.parametrize("shape", [(1, 300, 50), (2, 517, 40), (3, 20, 7)])
def test_sym_gram_matches_matmul(shape, float64):
    X = torch.randn(shape)
    ref = X @ X.transpose(-1, -2)
    out = sym_gram(X)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(out, out.transpose(-1, -2))


def test_sym_gram_on_transposed_view(float64):
    X = torch.randn(40, 400)  # (M, d); the engine passes the (d, M) transposed view
    assert torch.allclose(sym_gram(X.T.unsqueeze(0))[0], X.T @ X, rtol=1e-12, atol=1e-12)
