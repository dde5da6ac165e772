"""Model inputs as the engine and the Laplace code accept them: a tensor ``X`` (``model(X)``), a
tuple/list (``model(*X)``) or a dict (``model(**X)``); data as one ``(X, y)`` batch or an iterable
of them."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Tuple

import torch
from torch import Tensor, nn

__all__ = ["as_batches", "call_args", "call_model", "to_device"]


def as_batches(data: Any) -> Iterable[Tuple[Any, Tensor]]:
    """The batches of ``data``.

    Args:
        data: a DataLoader / iterable of ``(X, y)`` batches, or a single ``(X, y)`` tuple or list
            (recognised by a tensor ``y`` second: a list of two batches has a tuple second).

    Returns:
        An iterable of ``(X, y)`` batches (``[(X, y)]`` for a single batch).
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[1]):
        return [tuple(data)]
    return data


def call_args(X: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """Positional and keyword arguments of the model call on input ``X``.

    Args:
        X: a tensor, a tuple/list of positional inputs or a dict of keyword inputs.

    Returns:
        ``(args, kwargs)`` such that ``model(*args, **kwargs)`` is the call.
    """
    if isinstance(X, (tuple, list)):
        return tuple(X), {}
    if isinstance(X, dict):
        return (), X
    return (X,), {}


def call_model(model: nn.Module, X: Any) -> Any:
    """``model(X)``, ``model(*X)`` or ``model(**X)`` by the type of ``X`` (see :func:`call_args`).

    Args:
        model: the network.
        X: its input.

    Returns:
        The model output.
    """
    args, kwargs = call_args(X)
    return model(*args, **kwargs)


def to_device(X: Any, device: torch.device) -> Any:
    """``X`` with every tensor in it (nested tuples, lists, dicts) moved to ``device``.

    Args:
        X: a tensor, or a tuple/list/dict of them (other values are kept).
        device: the target device.

    Returns:
        The same structure on ``device``.
    """
    if torch.is_tensor(X):
        return X.to(device)
    if isinstance(X, (tuple, list)):
        return type(X)(to_device(x, device) for x in X)
    if isinstance(X, dict):
        return {k: to_device(v, device) for k, v in X.items()}
    return X
