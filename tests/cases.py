"""Exactness cases declared once and parametrised across the engine's tests.

Each case builds a tiny float64 model in which one K-FAC flavour is exact for the Gaussian
likelihood (deep linear networks whose weight-sharing axis is preserved through the layers):
``setting="expand"`` -- one loss term per shared position; ``setting="reduce"`` -- the shared
axis is averaged before the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Tuple

import torch
from reference import conv_expand, conv_reduce, deep_linear_expand, deep_linear_reduce
from torch import nn


@dataclass
class Case:
    id: str
    setting: str  # "expand" | "reduce"
    build: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]
    kwargs: dict = field(default_factory=dict)

    def data(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = self.build()
        X = torch.randn(self.input_shape, generator=g)
        with torch.no_grad():
            out = model(X)
        y = torch.randn(out.shape, generator=g)
        return model, X, y


_CONV_OPTS = {
    "plain": dict(),
    "stride_pad": dict(stride=2, padding=1),
    "dilation_same_reflect": dict(dilation=2, padding="same", padding_mode="reflect"),
    "circular_stride": dict(padding=2, padding_mode="circular", stride=2),
    "replicate_nobias": dict(padding=1, padding_mode="replicate", bias=False),
    "same_zeros_dilation": dict(padding="same", dilation=2),
}
_SPATIAL = {1: (9,), 2: (6, 7), 3: (5, 5, 4)}

CASES = [
    Case("linear_expand", "expand", lambda: deep_linear_expand(3, (5, 4), 2), (4, 3, 3)),
    Case("linear_expand_nobias", "expand", lambda: deep_linear_expand(3, (4,), 2, bias=False), (4, 5, 3)),
    Case("linear_expand_2axes", "expand", lambda: deep_linear_expand(3, (4,), 2), (3, 2, 3, 3)),
    Case("linear_reduce", "reduce", lambda: deep_linear_reduce(3, (5, 4), 2), (4, 3, 3)),
    Case("linear_reduce_nobias", "reduce", lambda: deep_linear_reduce(3, (4,), 2, bias=False), (4, 5, 3)),
]
for _dim, _sp in _SPATIAL.items():
    for _name, _kw in _CONV_OPTS.items():
        _k = 3 if "dilation" in _name or "stride" in _name else 2
        CASES.append(
            Case(f"conv{_dim}d_{_name}_expand", "expand",
                 (lambda d=_dim, kw=_kw, k=_k: conv_expand(d, kernel_size=k, **kw)), (3, 2, *_sp))
        )
        CASES.append(
            Case(f"conv{_dim}d_{_name}_reduce", "reduce",
                 (lambda d=_dim, kw=_kw, k=_k: conv_reduce(d, kernel_size=k, **kw)), (3, 2, *_sp))
        )
