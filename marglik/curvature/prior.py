"""The structure of a diagonal Gaussian prior precision over the covered parameters."""

from __future__ import annotations

from torch import Tensor

from .options import StrOption

__all__ = ["PriorStructure"]


class PriorStructure(StrOption):
    """How a prior precision tensor is laid out (``str``-valued: compares equal to its name).

    * ``SCALAR``: one value (0-d tensor or shape ``(1,)``);
    * ``LAYERWISE``: shape ``(L,)``, one value per parameter tensor in ``Kron.params`` order
      (laplace-torch's convention: a weight and its bias are two "layers");
    * ``DIAGONAL``: shape ``(P,)``, one value per parameter in ``Kron.to_dense`` order.
    """

    SCALAR = "scalar"
    LAYERWISE = "layerwise"
    DIAGONAL = "diagonal"

    @classmethod
    def of(cls, prior_precision: Tensor, n_layers: int, n_params: int) -> "PriorStructure":
        """The structure of a prior precision tensor.

        A length that matches both ``n_layers`` and ``n_params`` is read as layerwise (the same
        diagonal either way).

        Args:
            prior_precision: 0-d, ``(1,)``, ``(n_layers,)`` or ``(n_params,)`` tensor.
            n_layers: number of parameter tensors.
            n_params: number of parameters.

        Returns:
            The :class:`PriorStructure`.

        Raises:
            ValueError: the tensor is not 1-d or matches none of the lengths.
        """
        p = prior_precision
        if p.dim() == 0 or (p.dim() == 1 and p.numel() == 1):
            return cls.SCALAR
        if p.dim() != 1:
            raise ValueError(f"prior precision must be a scalar or a 1-d tensor, got shape {tuple(p.shape)}")
        if p.numel() == n_layers:
            return cls.LAYERWISE
        if p.numel() == n_params:
            return cls.DIAGONAL
        raise ValueError(
            f"prior precision of length {p.numel()} matches neither the number of parameter tensors "
            f"({n_layers}, layerwise) nor the number of parameters ({n_params}, diagonal); pass a scalar, "
            f"a ({n_layers},) or a ({n_params},) tensor"
        )

    def size(self, n_layers: int, n_params: int) -> int:
        """Number of entries of a prior precision of this structure."""
        return {PriorStructure.SCALAR: 1, PriorStructure.LAYERWISE: n_layers, PriorStructure.DIAGONAL: n_params}[self]
