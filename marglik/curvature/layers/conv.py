"""``nn.Conv1d/2d/3d`` with stride, padding (ints, 'same', 'valid', any padding mode), dilation
and groups. Output spatial positions (times any extra rows per example) are the shared axis.

Groups: each of the ``G`` groups gets its own factor pair (``din = C_in / G * prod(kernel)``,
``dout = C_out / G``); couplings between groups are dropped -- an extra block-diagonal
approximation on top of K-FAC (the exact GGN has such couplings through the loss).

``expand`` skips the unfold for stride-1 zero-padded convolutions whenever the
shifted-correlation Gram of :mod:`.conv_gram` costs less than the unfolded one (3x3 kernels on
images down to 8x8 do, depthwise convolutions do not); other convolutions are unfolded.

``reduce`` never unfolds: the sum of the patches over all output positions is one product of the
input with the 0/1 tap indicator ``(prod(spatial), K)`` (the row-major Kronecker product of the
per-dimension ``M[h, k] = [h = o * stride + k * dilation - pad for some output o]``), so zero
padding costs no copy. Memory is that of the input; cost ``O(T C_in prod(spatial) K)``.
"""

from __future__ import annotations

import itertools
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gram import sym_gram
from .base import KroneckerRule
from .conv_gram import lag_gram_applies, lag_gram_cost, lag_patch_gram, unfold_gram_cost

_LAG_GRAM_MAX_COST = 0.8  # use the shifted-correlation Gram below this fraction of the unfolded cost

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _pad_spec(module: nn.Module) -> List[Tuple[int, int]]:
    d = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * d
        spec = []  # 'same': PyTorch puts the extra element on the right
        for k, dil in zip(module.kernel_size, module.dilation):
            total = dil * (k - 1)
            spec.append((total // 2, total - total // 2))
        return spec
    return [(p, p) for p in module.padding]


def padded_input(module: nn.Module, x: Tensor) -> Tensor:
    """The input padded exactly as the convolution pads it (any ``padding_mode``)."""
    spec = _pad_spec(module)
    if all(left == 0 and right == 0 for left, right in spec):
        return x
    flat = [v for lr in reversed(spec) for v in lr]
    if module.padding_mode == "zeros":
        return F.pad(x, flat)
    return F.pad(x, flat, mode=module.padding_mode)


def _out_sizes(module: nn.Module, padded_shape) -> List[int]:
    return [
        (n - dil * (k - 1) - 1) // s + 1
        for n, k, s, dil in zip(padded_shape, module.kernel_size, module.stride, module.dilation)
    ]


def zero_pad_geometry(module: nn.Module, spatial) -> Tuple[List[int], List[int]]:
    """Left padding and output sizes per spatial dimension, for the unpadded input sizes."""
    spec = _pad_spec(module)
    return [lo for lo, _ in spec], _out_sizes(module, [n + lo + hi for n, (lo, hi) in zip(spatial, spec)])


def unfold(module: nn.Module, x: Tensor) -> Tensor:
    """Patches ``(T, C_in * prod(kernel), L)`` in the order of ``weight.flatten(1)``."""
    xp = padded_input(module, x)
    d = len(module.kernel_size)
    if d in (1, 2):
        xp2 = xp.unsqueeze(2) if d == 1 else xp
        k = (1,) * (2 - d) + tuple(module.kernel_size)
        dil = (1,) * (2 - d) + tuple(module.dilation)
        st = (1,) * (2 - d) + tuple(module.stride)
        return F.unfold(xp2, k, dilation=dil, stride=st)
    outs = _out_sizes(module, xp.shape[2:])
    slices = []
    for offs in itertools.product(*[range(k) for k in module.kernel_size]):
        idx = (slice(None), slice(None)) + tuple(
            slice(o * dil, o * dil + s * (n - 1) + 1, s)
            for o, dil, s, n in zip(offs, module.dilation, module.stride, outs)
        )
        slices.append(xp[idx])
    patches = torch.stack(slices, dim=2)  # (T, C, K, *out)
    return patches.reshape(x.shape[0], -1, math.prod(outs))


def _tap_indicator(module: nn.Module, spatial, pad_left, outs, dtype, device) -> Tensor:
    """``(prod(spatial), K)``: 1 where input position ``h`` is read by tap ``k`` of some output."""
    ind = None
    for n, k, s, dil, pl, o in zip(spatial, module.kernel_size, module.stride, module.dilation, pad_left, outs):
        pos = torch.arange(o, device=device) * s - pl  # tap 0's input position of each output
        hits = (pos.view(1, -1) + torch.arange(k, device=device).view(-1, 1) * dil)  # (k, o)
        d = torch.zeros(k, n + 1, dtype=dtype, device=device)  # column n collects the padding
        d.scatter_(1, torch.where((hits >= 0) & (hits < n), hits, n), 1.0)
        d = d[:, :n].T  # (n, k)
        ind = d if ind is None else _kron_cols(ind, d)
    return ind


def _kron_cols(a: Tensor, b: Tensor) -> Tensor:
    """Row-major product of two indicators: ``(n1, k1), (n2, k2) -> (n1 n2, k1 k2)``."""
    return (a.view(a.shape[0], 1, a.shape[1], 1) * b.view(1, b.shape[0], 1, b.shape[1])).reshape(
        a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def patch_sums(module: nn.Module, x: Tensor) -> Tuple[Tensor, int]:
    """Sum of the patches over output positions, ``(T, C_in * prod(kernel))``, and ``L``.

    One product of the input with the 0/1 tap indicator ``(prod(spatial), K)``; zero padding is
    folded into the indicator (no padded copy), other padding modes pad first. A channels-last
    input is read in its own layout.
    """
    if module.padding_mode == "zeros":
        xs = x
        pad_left, outs = zero_pad_geometry(module, x.shape[2:])
    else:
        xs = padded_input(module, x)
        pad_left = [0] * (x.dim() - 2)
        outs = _out_sizes(module, xs.shape[2:])
    T, C = xs.shape[:2]
    ind = _tap_indicator(module, xs.shape[2:], pad_left, outs, x.dtype, x.device)  # (S, K)
    if xs.dim() == 4 and not xs.is_contiguous() and xs.is_contiguous(memory_format=torch.channels_last):
        sums = (ind.T @ xs.permute(0, 2, 3, 1).reshape(T, -1, C)).transpose(1, 2)  # (T, C, K)
    else:
        sums = xs.reshape(T, C, -1) @ ind
    return sums.reshape(T, -1), math.prod(outs)


class ConvRule(KroneckerRule):
    module_types = _CONV
    rows_capable = True

    def input_rows_count(self, module: nn.Module, x: Tensor) -> Optional[int]:
        self._check(module, x)
        if lag_gram_applies(module):
            # the shifted-correlation Gram beats unfolded patches; rows would be multiplied out as soon
            # as a later batch passes the bound (K-FAC-expand convolutions have N R rows: rarely few)
            return None
        spec = _pad_spec(module)
        return x.shape[0] * math.prod(_out_sizes(module, [n + lo + hi for n, (lo, hi) in zip(x.shape[2:], spec)]))

    def groups(self, module: nn.Module) -> int:
        return module.groups

    def _check(self, module: nn.Module, x: Tensor) -> None:
        if x.dim() != len(module.kernel_size) + 2:
            raise ValueError(
                f"{type(module).__name__} expects batched input of dim {len(module.kernel_size) + 2}, "
                f"got shape {tuple(x.shape)} (unbatched convolution inputs are not supported)"
            )

    def expand_inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        self._check(module, x)
        G = module.groups
        P = unfold(module, x)  # (T, G*din, L)
        T, _, L = P.shape
        return P.view(T, G, -1, L).permute(1, 2, 0, 3).reshape(G, -1, T * L)

    def expand_input_stats(self, module: nn.Module, x: Tensor, gram: bool = True):
        self._check(module, x)
        if gram and lag_gram_applies(module):
            pad_left, outs = zero_pad_geometry(module, x.shape[2:])
            if lag_gram_cost(module, x.shape[2:], pad_left, outs) < _LAG_GRAM_MAX_COST * unfold_gram_cost(module, outs):
                sums, L = patch_sums(module, x)
                xsum = sums.sum(0).view(module.groups, -1)
                return lag_patch_gram(module, x, pad_left, outs), xsum, x.shape[0] * L
        return super().expand_input_stats(module, x, gram)

    def reduce_inputs(self, module: nn.Module, x: Tensor) -> Tuple[Tensor, int]:
        self._check(module, x)
        sums, L = patch_sums(module, x)
        return sums.view(x.shape[0], module.groups, -1), L

    def expand_grads(self, module: nn.Module, g: Tensor) -> Tensor:
        K, T, C = g.shape[:3]
        G = module.groups
        g = g.reshape(K, T, G, C // G, -1)  # (K, T, G, dout, L)
        return g.permute(2, 3, 0, 1, 4).reshape(G, C // G, -1)

    def expand_grad_gram(self, module: nn.Module, g: Tensor) -> Tensor:
        rows = g.movedim(2, -1)  # (K, T, *spatial, C)
        if module.groups == 1 and rows.is_contiguous():  # channels-last gradients: no transpose copy
            return sym_gram(rows.reshape(-1, g.shape[2]).T.unsqueeze(0))
        return super().expand_grad_gram(module, g)

    def reduce_grads(self, module: nn.Module, g: Tensor) -> Tensor:
        K, T, C = g.shape[:3]
        return g.reshape(K, T, C, -1).sum(-1).view(K, T, module.groups, -1)
