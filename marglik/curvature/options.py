"""String enums for the engine's options (they also accept plain strings)."""

from __future__ import annotations

from enum import Enum


class StrOption(str, Enum):
    """Base of every string option of the package: members compare equal to (and print as) their
    value; :meth:`parse` turns a string into a member with an error that lists the choices. The
    tuning config's :class:`marglik.tuning.choices.Choice` builds on it."""

    @classmethod
    def parse(cls, value: "str | StrOption", what: str):
        """The member for ``value``.

        Args:
            value: a member or its string value.
            what: the option's name, for the error message.

        Returns:
            The member.

        Raises:
            ValueError: ``value`` is not one of the choices.
        """
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}") from None

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


class Likelihood(StrOption):
    """Observation model; fixes the loss whose curvature is approximated (summed over data)."""

    CLASSIFICATION = "classification"  # cross-entropy, reduction="sum" over examples and positions
    REGRESSION = "regression"  # 0.5 * ||y - f||^2 summed (unit noise; sigma_noise applied by Laplace)
    BINARY = "binary"  # BCE-with-logits summed


class FisherType(StrOption):
    """Which curvature: the GGN with exact loss-Hessian square roots, or a Fisher estimate.

    * ``type-2``: the exact GGN (``C - 1`` or ``C`` backward columns);
    * ``mc``: gradients at labels sampled from the model (one column per sample), the MC Fisher of
      laplace-torch, curvlinops and ASDL;
    * ``mc-root``: the loss Hessian's square root times a random sign vector, ``sqrt(Lambda) z``
      with ``z`` Rademacher (one column per sample): unbiased for the GGN like ``mc`` at the same
      cost, and also unbiased for the GGN's *derivative* with respect to what the outputs depend
      on (augmentation ranges), which ``mc``'s sampled labels are not (see
      :mod:`marglik.curvature.likelihoods`);
    * ``empirical``: gradients at the true labels.
    """

    TYPE2 = "type-2"
    MC = "mc"
    MC_ROOT = "mc-root"
    EMPIRICAL = "empirical"


class KFACApprox(StrOption):
    """How weight-sharing positions enter the Kronecker factors (Eschenhagen et al. 2023)."""

    EXPAND = "expand"
    REDUCE = "reduce"


class BlockKind(StrOption):
    """What a curvature block holds: Kronecker factors ``B ⊗ A`` per group, or exact per-channel
    ``k x k`` blocks (norm layers, :class:`marglik.nn.Scale` / :class:`marglik.nn.Bias`)."""

    KRON = "kron"
    DIAG = "diag"
