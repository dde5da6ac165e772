r"""The K-FAC-expand input factor of a stride-1, zero-padded convolution without unfolding.

The expand factor's weight part is the Gram matrix of the patches, ``sum_{t, o} u u^T`` over
input rows ``t`` and output positions ``o``, with ``u[(c, tap)] = x_pad[t, c, o + tap * dil]``.
Unfolding costs ``K^2 C^2 M`` multiply-adds for ``K`` taps (``prod(kernel)``) and ``M`` positions,
plus copying the ``K``-times larger patch matrix: for a 3x3 convolution the Gram costs 9x the
convolution itself, most of K-FAC-expand's time on a CNN.

For stride 1 the block of taps ``(i, j)`` depends on ``j - i`` up to the borders:

    A[i, j] = sum_{q in box_i} x[q] x[q + lag_ij]^T,    lag_ij = (tap_j - tap_i) * dil,

``q`` over the input positions that tap ``i`` reads (``box_i``, the output grid shifted by
``tap_i * dil - pad_left``), ``x`` zero outside the input. So

    A[i, j] = F(lag_ij) - sum_{q in input \\ box_i} x[q] x[q + lag_ij]^T,

with ``F(lag) = sum_q x[q] x[q + lag]^T`` over *all* input positions, shared by every pair with
that lag, and a correction over the thin strip of positions tap ``i`` never reads (at most
``pad`` / ``dil * (k - 1)`` rows per side). ``F`` comes from one matrix product of two offset
slices of a flat channels-last copy of the input with ``dil * (k - 1)`` zeros after each spatial
row (a flat shift then never pairs positions of different rows or images: the pairs it wraps
around land on those zeros). Cost: ``(#lags) C^2 T prod(n + frame)`` plus the strips, e.g. 2.7x
fewer multiply-adds than the unfolded Gram for 3x3 on 32x32 and 1.6x on 8x8, and no patch matrix.
:func:`lag_gram_cost` / :func:`unfold_gram_cost` let the rule pick the cheaper path (they count
copy passes too: for depthwise convolutions, one channel per group, the memory passes per lag
dominate and unfolding wins, e.g. for 7x7 depthwise convolutions). Timings of the two paths:
``results/kfac_speed.md``, row "unfolded / shifted-correlation conv input Gram". The subtraction
rounds differently from the unfolded sum: in float32 the WRN-16-4 factors agree with curvlinops'
to 3e-6 relative (4e-7 unfolded); float64 tests agree to 1e-13.

Shapes: ``x`` is ``(T, C_in, *spatial)``; the result is ``(G, din, din)`` with
``din = C_in / G * K`` in the order of ``weight.flatten(1)`` (channel-major, taps row-major).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn


def lag_gram_applies(module: nn.Module) -> bool:
    """Stride 1 and zero padding: the patch Gram is shift-structured."""
    return all(s == 1 for s in module.stride) and module.padding_mode == "zeros"


def _taps(kernel_size: Sequence[int]) -> List[Tuple[int, ...]]:
    """Kernel offsets in row-major order (the order of ``weight.flatten(1)``'s taps)."""
    return list(itertools.product(*[range(k) for k in kernel_size]))


def _geometry(module: nn.Module, spatial: Sequence[int], pad_left: Sequence[int], out: Sequence[int]):
    """Per tap, the input offsets (flat within one framed image) it never reads; and the frame."""
    return _cached_geometry(tuple(module.kernel_size), tuple(module.dilation), tuple(spatial), tuple(pad_left),
                            tuple(out))


@functools.lru_cache(maxsize=128)
def _cached_geometry(kernel_size, dil, spatial, pad_left, out):
    frame = [dl * (k - 1) for dl, k in zip(dil, kernel_size)]
    framed = [n + f for n, f in zip(spatial, frame)]
    strides = [math.prod(framed[i + 1 :]) for i in range(len(framed))]
    grids = torch.meshgrid(*[torch.arange(n) for n in spatial], indexing="ij")
    flat = sum(g * s for g, s in zip(grids, strides))
    missing = []
    for tap in _taps(kernel_size):
        inside = torch.ones(spatial, dtype=torch.bool)
        for g, t, dl, pl, o in zip(grids, tap, dil, pad_left, out):
            lo = t * dl - pl
            inside &= (g >= lo) & (g < lo + o)
        missing.append(flat[~inside])
    return frame, framed, strides, missing


def _lag_offset(a: Sequence[int], b: Sequence[int], dil: Sequence[int], strides: Sequence[int]) -> int:
    return sum((j - i) * dl * s for i, j, dl, s in zip(a, b, dil, strides))


# Work model, in multiply-adds per element: a copy pass (unfold, transposes, the batched-group
# einsum's operand permutes) and a GEMM reading strided operands in place. Calibrated on 2 CPU
# threads: 3x3 convs of 1..256 channels on 8x8..32x32 and a 7x7 depthwise conv pick the faster path.
_COPY_PASS = 32.0
_IN_PLACE_READ = 4.0


def lag_gram_cost(module: nn.Module, spatial: Sequence[int], pad_left: Sequence[int], out: Sequence[int]) -> float:
    """Estimated work per input row of :func:`lag_patch_gram` (multiply-adds plus copy passes)."""
    cg, G = module.in_channels // module.groups, module.groups
    frame, framed, strides, missing = _geometry(module, spatial, pad_left, out)
    taps = _taps(module.kernel_size)
    lags = {_lag_offset(taps[i], taps[j], module.dilation, strides) for i in range(len(taps)) for j in range(i, len(taps))}
    strips = sum(m.numel() * (len(taps) - i) for i, m in enumerate(missing))
    per_element = cg + (_IN_PLACE_READ if G == 1 else _COPY_PASS)
    return G * cg * (len(lags) * math.prod(framed) + strips) * per_element


def unfold_gram_cost(module: nn.Module, out: Sequence[int]) -> float:
    """Estimated work per input row of the unfolded patch matrix and its symmetric blocked Gram."""
    cg, G = module.in_channels // module.groups, module.groups
    K, L = math.prod(module.kernel_size), math.prod(out)
    return G * cg * K * L * (0.56 * K * cg + _COPY_PASS)


def lag_patch_gram(module: nn.Module, x: Tensor, pad_left: Sequence[int], out: Sequence[int]) -> Tensor:
    """``sum_{t, o} u u^T`` over all patches ``u`` of a stride-1 zero-padded conv: ``(G, din, din)``."""
    T, C = x.shape[:2]
    spatial = list(x.shape[2:])
    G = module.groups
    cg = C // G
    taps = _taps(module.kernel_size)
    K = len(taps)
    frame, framed, strides, missing = _geometry(module, spatial, pad_left, out)
    img = math.prod(framed)
    pad = sum(f * s for f, s in zip(frame, strides))  # the largest |flat lag|
    body = T * img
    Z = x.new_zeros(pad + body + pad, C)  # flat channels-last input with zero frames
    framed_view = Z[pad : pad + body].view(T, *framed, C)
    framed_view[(slice(None),) + tuple(slice(0, n) for n in spatial)] = x.movedim(1, -1)
    Zg = Z.view(-1, G, cg)

    def lag_product(s: int) -> Tensor:  # F(lag) over the whole flat input: (G, cg, cg)
        lo, hi = Zg[pad : pad + body], Zg[pad + s : pad + s + body]  # (body, G, cg)
        if G == 1:
            return (lo[:, 0].T @ hi[:, 0]).unsqueeze(0)
        return torch.einsum("lga,lgb->gab", lo, hi)

    base = (torch.arange(T, device=x.device) * img + pad).view(T, 1)
    A = x.new_empty(G, cg, K, cg, K)  # channel-major, taps row-major: weight.flatten(1) order
    full = {}
    for i in range(K):
        m = missing[i].to(x.device)
        idx = (base + m.view(1, -1)).reshape(-1)
        offs = [_lag_offset(taps[i], taps[j], module.dilation, strides) for j in range(i, K)]
        strips = None
        if idx.numel():  # (J, G, cg, cg): the products over the positions tap i never reads
            Xi = Z.index_select(0, idx).view(-1, G, cg)
            Yi = torch.stack([Z.index_select(0, idx + s) for s in offs], dim=1).view(-1, len(offs), G, cg)
            strips = torch.einsum("rga,rjgb->jgab", Xi, Yi)
        for jj, s in enumerate(offs):
            j = i + jj
            if s not in full:
                full[s] = lag_product(s)
            blk = full[s] if strips is None else full[s] - strips[jj]
            if j == i:
                blk = 0.5 * (blk + blk.transpose(-1, -2))
            A[:, :, i, :, j] = blk
            if j != i:
                A[:, :, j, :, i] = blk.transpose(-1, -2)
    return A.view(G, cg * K, cg * K)
