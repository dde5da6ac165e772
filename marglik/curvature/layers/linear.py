"""``nn.Linear`` on inputs ``(T, *R, D_in)``: every axis between rows and features is shared."""

from __future__ import annotations

from typing import Tuple

from torch import Tensor, nn

from .base import KroneckerRule


class LinearRule(KroneckerRule):
    module_types = (nn.Linear,)
    rows_capable = True

    def input_rows_count(self, module: nn.Linear, x: Tensor) -> int:
        return x.numel() // x.shape[-1]  # the rows are a reshape of x

    def expand_inputs(self, module: nn.Linear, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)

    def reduce_inputs(self, module: nn.Linear, x: Tensor) -> Tuple[Tensor, int]:
        T, D = x.shape[0], x.shape[-1]
        x = x.reshape(T, -1, D)
        return x.sum(1).unsqueeze(1), x.shape[1]

    def expand_grads(self, module: nn.Linear, g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1]).T.unsqueeze(0)

    def reduce_grads(self, module: nn.Linear, g: Tensor) -> Tensor:
        K, T, D = g.shape[0], g.shape[1], g.shape[-1]
        return g.reshape(K, T, -1, D).sum(2).unsqueeze(2)
