"""``nn.Conv1d/2d/3d`` with stride, padding (ints, 'same', 'valid', any padding mode), dilation
and groups. Output spatial positions (times any extra rows per example) are the shared axis.

Groups: each of the ``G`` groups gets its own factor pair (``din = C_in / G * prod(kernel)``,
``dout = C_out / G``); couplings between groups are dropped -- an extra block-diagonal
approximation on top of K-FAC (the exact GGN has such couplings through the loss).

``reduce`` never unfolds: the sum of the patches over all output positions is a strided box sum
of the padded input, separable over spatial dimensions, computed as one small matrix product per
dimension with the 0/1 matrix ``M[k, h] = [h = o * stride + k * dilation for some output o]``.
Memory is that of the input; cost ``O(T C_in prod(spatial) * kernel)``.
"""

from __future__ import annotations

import itertools
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import KroneckerRule

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
    if all(l == 0 and r == 0 for l, r in spec):
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


def patch_sums(module: nn.Module, x: Tensor) -> Tuple[Tensor, int]:
    """Sum of the patches over output positions, ``(T, C_in * prod(kernel))``, and ``L``."""
    xp = padded_input(module, x)
    outs = _out_sizes(module, xp.shape[2:])
    t = xp
    for i, (n, k, s, dil, o) in enumerate(
        zip(xp.shape[2:], module.kernel_size, module.stride, module.dilation, outs)
    ):
        ind = torch.zeros(k, n, dtype=x.dtype, device=x.device)
        pos = torch.arange(o, device=x.device) * s
        for kk in range(k):
            ind[kk, pos + kk * dil] = 1
        t = torch.movedim(torch.movedim(t, 2 + i, -1) @ ind.T, -1, 2 + i)
    return t.reshape(x.shape[0], -1), math.prod(outs)


class ConvRule(KroneckerRule):
    module_types = _CONV

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

    def reduce_inputs(self, module: nn.Module, x: Tensor) -> Tuple[Tensor, int]:
        self._check(module, x)
        sums, L = patch_sums(module, x)
        return sums.view(x.shape[0], module.groups, -1), L

    def expand_grads(self, module: nn.Module, g: Tensor) -> Tensor:
        K, T, C = g.shape[:3]
        G = module.groups
        g = g.reshape(K, T, G, C // G, -1)  # (K, T, G, dout, L)
        return g.permute(2, 3, 0, 1, 4).reshape(G, C // G, -1)

    def reduce_grads(self, module: nn.Module, g: Tensor) -> Tensor:
        K, T, C = g.shape[:3]
        return g.reshape(K, T, C, -1).sum(-1).view(K, T, module.groups, -1)
