"""String enums for the engine's options (they also accept plain strings)."""

from __future__ import annotations

from enum import Enum


class _StrEnum(str, Enum):
    @classmethod
    def parse(cls, value: "str | _StrEnum", what: str):
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}") from None

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


class Likelihood(_StrEnum):
    """Observation model; fixes the loss whose curvature is approximated (summed over data)."""

    CLASSIFICATION = "classification"  # cross-entropy, reduction="sum" over examples and positions
    REGRESSION = "regression"  # 0.5 * ||y - f||^2 summed (unit noise; sigma_noise applied by Laplace)
    BINARY = "binary"  # BCE-with-logits summed


class FisherType(_StrEnum):
    """Which curvature: the GGN with exact loss-Hessian square roots, or a Fisher estimate."""

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"


class KFACApprox(_StrEnum):
    """How weight-sharing positions enter the Kronecker factors (Eschenhagen et al. 2023)."""

    EXPAND = "expand"
    REDUCE = "reduce"


class BlockKind(_StrEnum):
    """What a curvature block holds: Kronecker factors ``B ⊗ A`` per group, or exact per-channel
    ``k x k`` blocks (norm layers, :class:`marglik.nn.Scale` / :class:`marglik.nn.Bias`)."""

    KRON = "kron"
    DIAG = "diag"
