"""How a part tells the driver that a value went non-finite (the driver then rolls the run back)."""

from __future__ import annotations

from typing import Any


class NonFiniteValue(Exception):
    """A part met a non-finite value; the driver rolls back to the end of the previous epoch.

    Args:
        kind: ``"loss"`` (the MAP step: the MAP learning rate is lowered) or ``"marglik"`` (the
            hypersteps or the selection value: the hyper learning rates are lowered).
        value: the offending value, or a description of it.
        where: where in the epoch, e.g. ``"hyperstep 2/2"``.
    """

    def __init__(self, kind: str, value: Any, where: str) -> None:
        super().__init__(f"non-finite {kind} ({value}) in {where}")
        self.kind, self.value, self.where = kind, value, where
