"""Relative-position bias tables of torchvision's MaxViT and Swin (v1) attention: exact dense blocks.

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

Swin (v1). ``ShiftedWindowAttention`` builds the same ``(1, H, L, L)`` bias from its table
(``get_relative_position_bias``) and adds it to the logits ``(B nW, H, L, L)`` of its ``nW`` windows
(example-major). The per-example view ``E = bias.expand(B, H, L, L)`` is recorded and repeated over
the windows (``(B nW, H, L, L)``, the same logits); the gradient sums over the windows by itself. Its
``qkv`` / ``proj`` are ``nn.Linear`` modules whose *weights* the attention passes to
``torchvision.models.swin_transformer.shifted_window_attention``, never calling the modules: while
recording, a ``TorchFunctionMode`` active only inside the attention's forward turns
``F.linear(x, qkv.weight, qkv.bias)`` (and ``proj``'s) into ``qkv(x)`` -- the same values -- so the
linear rule records them. Their inputs ``(B nW, L, C)`` hold ``nW`` example-major windows per
example: the engine treats the windows like augmented copies (``copies_approx`` applies to them).
``ShiftedWindowAttentionV2`` (a continuous position MLP and ``logit_scale``) has no rule.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .base import Binding, Rule, UnsupportedModuleError
from .leaf import LEAF_DENSE_MAX, LeafDenseRule, LeafDiagonalRule

_TABLE = "relative_position_bias_table"


def _table_grads(module: nn.Module, g: Tensor) -> Tensor:
    """``(K, T, [1,] H, P, P)`` bias gradients -> ``(K, T, table.numel())`` table gradients (``table.flatten()`` order)."""
    table = getattr(module, _TABLE)
    K, T, H = g.shape[0], g.shape[1], table.shape[1]
    index = module.relative_position_index.reshape(-1).to(g.device)
    out = g.new_zeros(K, T, H, table.shape[0])
    out = out.index_add(3, index, g.reshape(K, T, H, -1))
    return out.transpose(2, 3).reshape(K, T, -1)


class _Swin:
    """What differs for Swin: the method, the per-example view, and the functional projections."""

    method = "get_relative_position_bias"

    @staticmethod
    def views(bias: Tensor, x: Tensor, module: nn.Module) -> Tuple[Tensor, Tensor]:
        """``(E, used)``: the recorded per-example bias ``(B, H, L, L)`` and what the attention adds
        to its ``(B nW, H, L, L)`` logits (``E`` repeated over the ``nW`` windows, example-major)."""
        B, Hi, Wi = x.shape[:3]
        ws = module.window_size
        n_windows = -(-Hi // ws[0]) * -(-Wi // ws[1])
        E = bias.expand(B, *bias.shape[1:])
        return E, E.unsqueeze(1).expand(B, n_windows, *E.shape[1:]).reshape(B * n_windows, *E.shape[1:])


class _MaxViT:
    method = "get_relative_positional_bias"

    @staticmethod
    def views(bias: Tensor, x: Tensor, module: nn.Module) -> Tuple[Tensor, Tensor]:
        """``(E, E)``: ``(B, 1, H, P, P)``, broadcast over the grid axis of the ``(B, G, H, P, P)`` logits."""
        E = bias.unsqueeze(0).expand(x.shape[0], *bias.shape)
        return E, E


_CLASSES = {
    ("torchvision.models.maxvit", "RelativePositionalMultiHeadAttention"): _MaxViT,
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"): _Swin,
}


def _kind(module: nn.Module):
    cls = type(module)
    return _CLASSES.get((cls.__module__, cls.__name__))


class _ProjectionsAsModules(TorchFunctionMode):
    """Inside Swin's attention: ``F.linear(x, qkv.weight, qkv.bias)`` (and ``proj``) become calls of
    the ``nn.Linear`` modules themselves -- the same values -- so that their own recording sees them."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.by_weight = {id(m.weight): m for m in (module.qkv, module.proj)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and id(args[1]) in self.by_weight:
            lin = self.by_weight[id(args[1])]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is lin.bias:
                return lin(args[0])
        return func(*args, **kwargs)


def attach_functional_projections(module: nn.Module) -> List[Any]:
    """While recording: Swin's attention calls its ``qkv`` / ``proj`` as modules (removable handles).

    Args:
        module: a torchvision ``ShiftedWindowAttention``.

    Returns:
        Handles whose ``remove()`` undoes it.
    """
    modes: List[TorchFunctionMode] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        mode = _ProjectionsAsModules(mod)
        mode.__enter__()
        modes.append(mode)

    def post(mod: nn.Module, args: tuple, output: Any) -> None:
        if modes:
            modes.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]


class _Recording:
    def attach(self, module: nn.Module, states: Sequence[Any], recorder: Any) -> List[Any]:
        kind = _kind(module)
        inputs: List[Tensor] = []
        original = getattr(type(module), kind.method)

        def pre(mod: nn.Module, args: tuple) -> None:
            x = next((a for a in args if torch.is_tensor(a)), None)
            if x is None or x.dim() < 2:
                raise ValueError(f"module {states[0].name!r}: no batched positional tensor input")
            inputs[:] = [x]

        def per_example_bias() -> Tensor:
            bias = original(module)  # (1, H, L, L), with its graph to the table
            E, used = kind.views(bias, inputs[0], module)  # one copy per example
            for s in states:
                recorder.record(s, E, E)
            return used

        setattr(module, kind.method, per_example_bias)

        class _Undo:
            def remove(self) -> None:
                module.__dict__.pop(kind.method, None)
                inputs.clear()

        handles = [module.register_forward_pre_hook(pre), _Undo()]
        if kind is _Swin:
            handles += attach_functional_projections(module)
        return handles


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
    """Binds MaxViT's and Swin's attention's ``relative_position_bias_table`` (module docstring)."""

    def __init__(self) -> None:
        self.dense, self.diagonal = RelPosDenseRule(), RelPosDiagonalRule()

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is torchvision MaxViT's or Swin's (v1) attention."""
        return _kind(module) is not None

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
