"""Raw ``nn.Parameter`` leaves broadcast over the batch: class tokens, positional embeddings, layer scales.

Covered parameters, in two layouts:

* *leading singleton*: torchvision's ``VisionTransformer.class_token`` (``(1, 1, D)``) and
  ``Encoder.pos_embedding`` (``(1, S, D)``), and any parameter a module lists in its attribute
  ``marglik_broadcast_parameters`` (a tuple of names). Each has a leading singleton axis that the
  module broadcasts over the examples of its input (whose first axis is the batch), as
  ``x + pos_embedding`` and ``class_token.expand(N, -1, -1)`` do; the per-example view is
  ``P.expand(N, *P.shape[1:])``.
* *unbatched*: torchvision ConvNeXt's ``CNBlock.layer_scale`` (``(C, 1, 1)``, multiplying the
  block's ``(N, C, H, W)`` output), and any parameter listed in ``marglik_unbatched_parameters``:
  the module combines it elementwise with a batch-first tensor of more axes, so that broadcasting
  aligns it right and repeats it over the batch; the per-example view is
  ``P.unsqueeze(0).expand(N, *P.shape)``, which broadcasts to the same values.

Recording. A forward pre-hook replaces the parameter, for the duration of the module's call, by
its per-example view ``E`` (``N`` = the first axis of the module's
first tensor input); autograd then delivers ``g[k, n] = d<f, S_k> / dE[n]``, the gradient of
curvature column ``k`` w.r.t. example ``n``'s copy of the parameter, which is that example's
Jacobian-vector product ``J_n^T S_k`` for ``P``. The parameter is restored after the call.

Block. The GGN/Fisher block of ``P`` is ``sum_{n,k} vec(g[k, n]) vec(g[k, n])^T`` (``p x p``,
``p = P.numel()``): **exact**, no Kronecker approximation, so expand and reduce give the same
block whenever every example reaches the parameter once (rows ``== N``). It is returned as a
bias-only :class:`KronBlock` (``A = 1``, ``B`` the block), which every consumer (log determinant,
solves, samples, optimizer, laplace-torch conversion) already handles exactly. With example-major
augmented copies (rows ``= m N``) the copy axis is a shared axis like for every other layer:
reduce sums the copies' gradients before the outer product (exact for a model averaging over
copies), expand sums the copies' outer products. Parameters with more than
:data:`LEAF_DENSE_MAX` entries get the exact *diagonal* of that block instead (a
:class:`DiagonalBlock` with ``k = 1``; ``sum_{n,k} g[k, n]^2`` with rows summed per example).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .base import Binding, ElementwiseRule, KroneckerRule, Rule, UnsupportedModuleError

#: Largest parameter (number of entries) that gets a dense ``p x p`` block; larger ones: diagonal.
LEAF_DENSE_MAX = 4096

_TORCHVISION = {
    ("torchvision.models.vision_transformer", "VisionTransformer"): ("class_token",),
    ("torchvision.models.vision_transformer", "Encoder"): ("pos_embedding",),
}
_TORCHVISION_UNBATCHED = {
    ("torchvision.models.convnext", "CNBlock"): ("layer_scale",),
}


def _declared(module: nn.Module, attr: str, known: Dict[Tuple[str, str], Tuple[str, ...]]) -> Tuple[str, ...]:
    declared = getattr(module, attr, None)
    if declared is not None:
        return tuple(declared)
    cls = type(module)
    return known.get((cls.__module__, cls.__name__), ())


def unbatched_parameter_names(module: nn.Module) -> Tuple[str, ...]:
    """Names of ``module``'s own parameters covered as *unbatched* broadcast leaves (may be empty)."""
    return _declared(module, "marglik_unbatched_parameters", _TORCHVISION_UNBATCHED)


def broadcast_parameter_names(module: nn.Module) -> Tuple[str, ...]:
    """Names of ``module``'s own parameters covered as batch-broadcast leaves, both layouts (may be empty)."""
    return _declared(module, "marglik_broadcast_parameters", _TORCHVISION) + unbatched_parameter_names(module)


def per_example_view(p: Tensor, N: int, unbatched: bool) -> Tensor:
    """The view of ``p`` with one copy per example: ``(N, *p.shape)`` unbatched, else ``(N, *p.shape[1:])``."""
    return p.unsqueeze(0).expand(N, *p.shape) if unbatched else p.expand(N, *p.shape[1:])


class _Restore:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remove(self) -> None:
        self.fn()


class _LeafRecording:
    """The recording shared by the dense and the diagonal variant."""

    def attach(self, module: nn.Module, states: Sequence[Any], recorder: Any) -> List[Any]:
        names = {id(p): n for n, p in module._parameters.items() if p is not None}
        leaves = [(s, names[id(s.bias)], s.bias) for s in states]
        unbatched = set(unbatched_parameter_names(module))

        def restore() -> None:
            for _, name, p in leaves:
                module._parameters[name] = p

        def pre(mod: nn.Module, args: tuple) -> None:
            x = next((a for a in args if torch.is_tensor(a)), None)
            if x is None or x.dim() == 0:
                raise ValueError(f"module {states[0].name!r}: no batched positional tensor input to broadcast over")
            for s, name, p in leaves:
                E = per_example_view(p, x.shape[0], name in unbatched)  # per-example gradients
                module._parameters[name] = E
                recorder.record(s, E, E)

        def post(mod: nn.Module, args: tuple, output: Any) -> None:
            restore()

        return [
            module.register_forward_pre_hook(pre),
            module.register_forward_hook(post, always_call=True),
            _Restore(restore),
        ]


class LeafDenseRule(_LeafRecording, KroneckerRule):
    """Exact dense block of a broadcast parameter, as a bias-only Kronecker block (``A = 1``)."""

    def expand_input_stats(self, module: nn.Module, x: Tensor, gram: bool = True):
        return None, x.new_zeros(1, 1), x.shape[0]

    def reduce_inputs(self, module: nn.Module, x: Tensor):
        return x.new_zeros(x.shape[0], 1, 1), 1

    def expand_grads(self, module: nn.Module, g: Tensor) -> Tensor:
        K, T = g.shape[:2]
        return g.reshape(K * T, -1).T.unsqueeze(0)

    def reduce_grads(self, module: nn.Module, g: Tensor) -> Tensor:
        K, T = g.shape[:2]
        return g.reshape(K, T, 1, -1)


class LeafDiagonalRule(_LeafRecording, ElementwiseRule):
    """Exact diagonal of a (large) broadcast parameter's block: ``p`` channels, bias-only."""

    def num_channels(self, module: nn.Module) -> int:  # pragma: no cover - not used by the engine
        raise NotImplementedError

    def normalized(self, module: nn.Module, x: Tensor):
        return None

    def channel_sums(self, module: nn.Module, t: Tensor) -> Tensor:
        K, T = t.shape[:2]
        return t.reshape(K, T, -1)


class LeafParameterRule(Rule):
    """Finds the covered leaves of a module (see the module docstring) and binds one block each."""

    def __init__(self) -> None:
        self.dense, self.diagonal = LeafDenseRule(), LeafDiagonalRule()

    def matches(self, module: nn.Module) -> bool:
        return bool(broadcast_parameter_names(module))

    def bindings(self, name: str, module: nn.Module, own: Dict[str, nn.Parameter]) -> List[Binding]:
        names = broadcast_parameter_names(module)
        unbatched = set(unbatched_parameter_names(module))
        extra = set(own) - set(names)
        if extra:
            raise UnsupportedModuleError(
                f"module {name or '<root>'!r} ({type(module).__name__}) has trainable parameters {sorted(extra)} that no "
                f"K-FAC rule covers; pass ignore_modules=[{name!r}] to leave them out of the curvature"
            )
        out = []
        for pname in names:
            p = own.get(pname)
            if p is None:
                continue
            if pname not in unbatched and (p.dim() < 1 or p.shape[0] != 1):
                raise UnsupportedModuleError(
                    f"parameter {'.'.join(x for x in (name, pname) if x)!r} of shape {tuple(p.shape)}: a broadcast "
                    "parameter needs a leading singleton (batch) axis"
                )
            rule = self.dense if p.numel() <= LEAF_DENSE_MAX else self.diagonal
            out.append(Binding(pname, None, p, 1, rule))
        return out
