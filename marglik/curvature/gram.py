"""``X X^T`` for wide ``X`` exploiting symmetry: the largest cost of K-FAC-expand.

A K-FAC-expand factor is the Gram matrix of ``d`` features over ``M`` positions (``M`` is
``N * R``, e.g. 32k image patches). A plain GEMM computes all ``d^2`` entries; computing only
the row blocks on and above the diagonal (``nb`` blocks: ``(nb + 1) / (2 nb)`` of the work) and
mirroring saves close to half of it for large ``d`` (the K-FAC timings are in ``results/kfac_speed.md``).
"""

from __future__ import annotations

from torch import Tensor

_MIN_DIM = 256  # below this the plain GEMM is as fast
_BLOCKS = 8


def sym_gram(X: Tensor) -> Tensor:
    """``X @ X^T`` for ``X`` of shape ``(G, d, M)`` -> ``(G, d, d)``, exactly symmetric."""
    d = X.shape[-2]
    if d < _MIN_DIM or X.requires_grad:
        out = X @ X.transpose(-1, -2)
        return 0.5 * (out + out.transpose(-1, -2))
    out = X.new_empty(X.shape[:-2] + (d, d))
    edges = [round(i * d / _BLOCKS) for i in range(_BLOCKS + 1)]
    for a0, a1 in zip(edges[:-1], edges[1:]):
        blk = X[..., a0:a1, :] @ X[..., a0:, :].transpose(-1, -2)  # (G, a1 - a0, d - a0)
        diag = blk[..., :, : a1 - a0]
        blk[..., :, : a1 - a0] = 0.5 * (diag + diag.transpose(-1, -2))
        out[..., a0:a1, a0:] = blk
        out[..., a0:, a0:a1] = blk.transpose(-1, -2)
    return out
