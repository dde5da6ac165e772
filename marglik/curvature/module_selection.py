"""Which modules the curvature leaves out: ``ignore_modules`` specs and first-order markers.

Shared by :class:`marglik.KFAC` (modules whose parameters stay out of the curvature) and
:class:`marglik.optim.KFACOptimizer` (modules it updates first-order).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

from torch import nn

__all__ = [
    "IgnoreSpec", "FIRST_ORDER_TYPES", "matches_spec", "ignored_modules", "is_first_order", "uses_children_functionally",
]

#: A module name (as in ``model.named_modules()``), a module type, or a module instance.
IgnoreSpec = Union[str, type, nn.Module]

#: Module types that a second-order optimizer updates first-order without being told (no engine
#: rule covers them). Other modules opt in with the class attribute ``marglik_first_order = True``.
FIRST_ORDER_TYPES: Tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)


def matches_spec(spec: IgnoreSpec, name: str, module: nn.Module) -> bool:
    """Whether the ignore spec ``spec`` names the module ``module`` called ``name``.

    Args:
        spec: a module name, type or instance.
        name: the module's name in ``model.named_modules()``.
        module: the module.

    Returns:
        ``True`` for an equal name, an instance of the type, or the same instance.

    Raises:
        TypeError: ``spec`` is none of a string, a type or a module.
    """
    if isinstance(spec, str):
        return spec == name
    if isinstance(spec, type):
        return isinstance(module, spec)
    if isinstance(spec, nn.Module):
        return spec is module
    raise TypeError(f"ignore_modules entries must be module names, types or instances, got {spec!r}")


def ignored_modules(model: nn.Module, specs: Sequence[IgnoreSpec]) -> List[nn.Module]:
    """The modules of ``model`` that ``specs`` ignore, in ``named_modules()`` order.

    An ignored module that uses its submodules' weights without calling them
    (:func:`uses_children_functionally`: ``nn.MultiheadAttention``'s ``out_proj``, torchvision
    Swin's ``ShiftedWindowAttention`` with its ``qkv`` / ``proj``) takes its submodules with it:
    they cannot be recorded on their own.

    Args:
        model: the network.
        specs: module names, types or instances.

    Returns:
        The ignored modules, each once.

    Raises:
        TypeError: a spec is none of a string, a type or a module.
    """
    out: List[nn.Module] = []
    seen = set()
    for name, module in model.named_modules():
        if any(matches_spec(s, name, module) for s in specs):
            subs = module.modules() if uses_children_functionally(module) else [module]
            for m in subs:
                if id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
    return out


_FUNCTIONAL_PARENTS = {
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"),
    ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"),
}


def uses_children_functionally(module: nn.Module) -> bool:
    """Whether ``module`` uses its submodules' parameters without calling the submodules.

    Args:
        module: a module.

    Returns:
        ``True`` for ``nn.MultiheadAttention`` and torchvision's ``ShiftedWindowAttention(V2)``
        (which pass ``qkv.weight`` / ``proj.weight`` to a function).
    """
    cls = type(module)
    return isinstance(module, nn.MultiheadAttention) or (cls.__module__, cls.__name__) in _FUNCTIONAL_PARENTS


def is_first_order(module: nn.Module) -> bool:
    """Whether a module without an engine rule should be updated first-order automatically.

    Args:
        module: a module holding trainable parameters.

    Returns:
        ``True`` for the types in :data:`FIRST_ORDER_TYPES` and for modules whose class sets
        ``marglik_first_order = True``.
    """
    return isinstance(module, FIRST_ORDER_TYPES) or bool(getattr(module, "marglik_first_order", False))
