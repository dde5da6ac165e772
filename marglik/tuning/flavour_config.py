"""``curvature.approx`` / ``curvature.approx_layers``: the K-FAC flavour of every layer, from the config.

``approx`` is ``expand``, ``reduce`` or ``auto`` (expand on convolutions, reduce elsewhere;
:mod:`marglik.curvature.flavours`), ``approx_layers`` maps module names (a name covers its
submodules) or type names (``Conv2d``) to one of them and overrides ``approx`` there, e.g.
``curvature.approx=reduce curvature.approx_layers={conv1:expand}``.
"""

from __future__ import annotations

from typing import Any, Dict, Union

from torch import nn

from ..curvature.flavours import DEFAULT_KEY, assign_flavours
from .config_parsing import ConfigError

__all__ = ["approx_spec", "check_flavours"]


def approx_spec(curvature: Any) -> Union[str, Dict[str, str]]:
    """The ``approx`` argument of :class:`marglik.KFAC` for a ``curvature`` section.

    Args:
        curvature: the section (``approx``, optional ``approx_layers``).

    Returns:
        ``approx``'s value, or ``{"*": approx, **approx_layers}`` when there are overrides.
    """
    layers = dict(getattr(curvature, "approx_layers", None) or {})
    base = str(getattr(curvature.approx, "value", curvature.approx))
    if not layers:
        return base
    return {DEFAULT_KEY: base, **{str(k): str(getattr(v, "value", v)) for k, v in layers.items()}}


def check_flavours(curvature: Any, model: nn.Module) -> None:
    """Check that every ``approx_layers`` key names a layer of ``model`` that K-FAC covers (before training).

    Args:
        curvature: the ``curvature`` section.
        model: the network.

    Raises:
        ConfigError: a key names no covered module or type (the message lists the covered layers).
    """
    spec = approx_spec(curvature)
    if not isinstance(spec, dict):
        return
    from ..curvature.kfac import KFAC

    blocks = KFAC(model, approx="reduce").covered
    try:
        assign_flavours(spec, blocks)
    except ValueError as err:
        names = ", ".join(b.name for b in blocks)
        raise ConfigError("curvature.approx_layers", dict(curvature.approx_layers), str(err).split(";")[0],
                          f"names or type names of covered layers ({names})") from None
