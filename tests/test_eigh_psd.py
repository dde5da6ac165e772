"""eigh_psd never returns NaN for a rank-deficient float32 K-FAC factor.

``tests/data/rank_deficient_factor.pt`` is a real 64x64 B factor (37 zero rows from dead ReLU
units) on which float32 ``torch.linalg.eigh`` returned NaN without raising here (MKL).
"""

from pathlib import Path

import torch

from marglik.curvature import eigh_psd

DATA = Path(__file__).parent / "data" / "rank_deficient_factor.pt"


def test_rank_deficient_float32_factor():
    B = torch.load(DATA, weights_only=True)
    assert B.dtype == torch.float32
    lam, V = eigh_psd(B)
    assert torch.isfinite(lam).all() and torch.isfinite(V).all()
    assert (lam >= 0).all()
    rec = V @ torch.diag(lam) @ V.T
    assert ((rec - B).norm() / B.norm()).item() < 1e-5
    assert lam.dtype == torch.float32
