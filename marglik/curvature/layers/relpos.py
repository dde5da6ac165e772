"""Relative-position bias tables of torchvision's MaxViT attention: exact dense blocks.

``RelativePositionalMultiHeadAttention`` (torchvision MaxViT) holds a raw parameter
``relative_position_bias_table`` ``(T, H)`` (``T = (2 P' - 1)^2`` relative offsets, ``H`` heads)
and adds ``bias[0, h, i, j] = table[index[i, j], h]`` (``get_relative_positional_bias``, shape
``(1, H, P, P)``) to the attention logits ``(B, G, H, P, P)``, broadcast over the batch ``B`` and the
windows/grids ``G``. Its ``to_qkv`` / ``merge`` are ``nn.Linear`` modules called as modules and
covered by the linear rule.

Recording. While recording, the instance's ``get_relative_positional_bias`` returns the per-example
view ``E = bias.unsqueeze(0).expand(B, 1, H, P, P)`` (``B`` = the first axis of the module's input,
taken by a forward pre-hook), which broadcasts to the same logits; autograd delivers
``g[k, n] = d<f, S_k> / dE[n]``. The table's per-example gradient is its transpose gather,
``g_table[k, n, t, h] = sum_{(i, j): index[i, j] = t} g[k, n, 0, h, i, j]`` -- the Jacobian-vector
product ``J_n^T S_k`` for the table -- and the block is ``sum_{n,k} vec(g_table) vec(g_table)^T``:
**exact**, returned like a broadcast leaf (:mod:`.leaf`) as a bias-only Kronecker block (``A = 1``),
or its exact diagonal above :data:`~.leaf.LEAF_DENSE_MAX` entries. The instance attribute is
removed afterwards (the class's method is used again).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor, nn

from .base import Binding, Rule, UnsupportedModuleError
from .leaf import LEAF_DENSE_MAX, LeafDenseRule, LeafDiagonalRule

_CLASSES = {("torchvision.models.maxvit", "RelativePositionalMultiHeadAttention")}
_TABLE = "relative_position_bias_table"


def _table_grads(module: nn.Module, g: Tensor) -> Tensor:
    """``(K, T, 1, H, P, P)`` bias gradients -> ``(K, T, table.numel())`` table gradients (``table.flatten()`` order)."""
    K, T, _, H = g.shape[:4]
    table = getattr(module, _TABLE)
    index = module.relative_position_index.reshape(-1).to(g.device)
    out = g.new_zeros(K, T, H, table.shape[0])
    out = out.index_add(3, index, g.reshape(K, T, H, -1))
    return out.transpose(2, 3).reshape(K, T, -1)


class _Recording:
    def attach(self, module: nn.Module, states: Sequence[Any], recorder: Any) -> List[Any]:
        batch: List[int] = []
        original = type(module).get_relative_positional_bias

        def pre(mod: nn.Module, args: tuple) -> None:
            x = next((a for a in args if torch.is_tensor(a)), None)
            if x is None or x.dim() < 2:
                raise ValueError(f"module {states[0].name!r}: no batched positional tensor input")
            batch[:] = [x.shape[0]]

        def per_example_bias() -> Tensor:
            bias = original(module)  # (1, H, P, P), with its graph to the table
            E = bias.unsqueeze(0).expand(batch[0], *bias.shape)  # (B, 1, H, P, P): one copy per example
            for s in states:
                recorder.record(s, E, E)
            return E

        module.get_relative_positional_bias = per_example_bias  # type: ignore[method-assign]

        class _Undo:
            def remove(self) -> None:
                module.__dict__.pop("get_relative_positional_bias", None)

        return [module.register_forward_pre_hook(pre), _Undo()]


class RelPosDenseRule(_Recording, LeafDenseRule):
    """Exact dense block of a relative-position bias table (bias-only Kronecker block, ``A = 1``)."""

    def expand_grads(self, module: nn.Module, g: Tensor) -> Tensor:
        """The table's per-example gradients as columns ``(1, p, K T)``."""
        return super().expand_grads(module, _table_grads(module, g))

    def reduce_grads(self, module: nn.Module, g: Tensor) -> Tensor:
        """The table's per-example gradients ``(K, T, 1, p)``."""
        return super().reduce_grads(module, _table_grads(module, g))


class RelPosDiagonalRule(_Recording, LeafDiagonalRule):
    """Exact diagonal of a large relative-position bias table's block."""

    def channel_sums(self, module: nn.Module, t: Tensor) -> Tensor:
        """The table's per-example gradients ``(K, T, p)``: one channel per entry."""
        return _table_grads(module, t)


class RelativePositionBiasRule(Rule):
    """Binds MaxViT attention's ``relative_position_bias_table`` (module docstring)."""

    def __init__(self) -> None:
        self.dense, self.diagonal = RelPosDenseRule(), RelPosDiagonalRule()

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is torchvision MaxViT's attention."""
        cls = type(module)
        return (cls.__module__, cls.__name__) in _CLASSES

    def bindings(self, name: str, module: nn.Module, own: Dict[str, nn.Parameter]) -> List[Binding]:
        """One block for the table (dense, or its diagonal when large).

        Raises:
            UnsupportedModuleError: the module owns other trainable parameters.
        """
        extra = set(own) - {_TABLE}
        if extra:
            raise UnsupportedModuleError(
                f"module {name!r} ({type(module).__name__}) has trainable parameters {sorted(extra)} that no K-FAC "
                f"rule covers; pass ignore_modules=[{name!r}] to leave them out of the curvature"
            )
        p = own[_TABLE]
        rule = self.dense if p.numel() <= LEAF_DENSE_MAX else self.diagonal
        return [Binding(_TABLE, None, p, 1, rule)]
