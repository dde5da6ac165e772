"""How a layer's leading dimension maps to the examples of a batch.

The engine needs, for every recorded layer call, which rows of the layer's input belong to
which example ``n`` of the batch (``N`` = first dimension of the model output). Rules, in order:

1. Inside ``with example_index(index):`` (``index`` a ``(T,)`` long tensor with values in
   ``[0, N)``), a layer input whose leading dimension is ``T`` has its rows assigned by
   ``index``. Graph networks use this: nodes of all graphs are stacked in one ``(T, D)`` tensor
   and ``index`` is the usual ``batch`` vector. Rows of one example are its weight-sharing
   positions (nodes).
2. Leading dimension ``N``: row ``n`` is example ``n``; every axis between the batch axis and the
   feature (Linear) / channel (Conv) axis, plus the spatial output positions of a convolution,
   is a weight-sharing axis.
3. Leading dimension ``m * N``: rows are example-major, ``(N, m)``; the ``m`` axis is an extra
   weight-sharing axis (augmented copies flattened into the batch, ``x.view(N * S, ...)``).

Anything else is an error naming the layer.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

from torch import Tensor

_EXAMPLE_INDEX: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar(
    "marglik_example_index", default=None
)


@contextlib.contextmanager
def example_index(index: Tensor) -> Iterator[None]:
    """Declare that rows of layer inputs with ``len(index)`` rows belong to examples ``index``."""
    if index.dim() != 1:
        raise ValueError(f"example_index expects a 1-d index tensor, got shape {tuple(index.shape)}")
    token = _EXAMPLE_INDEX.set(index)
    try:
        yield
    finally:
        _EXAMPLE_INDEX.reset(token)


def current_example_index() -> Optional[Tensor]:
    """The index set by the innermost active :func:`example_index`, or ``None``."""
    return _EXAMPLE_INDEX.get()
