"""The interface of a posterior block: :class:`PosteriorBlock`, one diagonal block
``P_b = s K_b + diag(p_b)`` of the K-FAC Laplace posterior precision, and its three operations
(log det ratio, solve, sample). The cases are in :mod:`.kron` and :mod:`.channel`; the table of
which case is exact is in :mod:`marglik.curvature.posterior_blocks`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

from torch import Tensor

#: ``randn(*shape)``: standard normal draws of the posterior's dtype and device
Randn = Callable[..., Tensor]


class PosteriorBlock(ABC):
    """One diagonal block ``P_b = s K_b + diag(p_b)`` of the posterior precision.

    Vectors are shaped like :attr:`index` with leading sample dimensions: ``(n, *index.shape)``.
    """

    #: whether :meth:`logdet_ratio`, :meth:`solve` and :meth:`sample` use ``P_b`` itself (else an
    #: approximation of it, the same for all three)
    exact: ClassVar[bool] = True
    index: Tensor

    @abstractmethod
    def logdet_ratio(self, s: Tensor) -> Tensor:
        """``log det P_b - log det diag(p_b)`` (0-d), differentiable w.r.t. ``s`` and the prior.

        Args:
            s: 0-d likelihood scale.
        """

    @abstractmethod
    def solve(self, X: Tensor, s: Tensor) -> Tensor:
        """``P_b^{-1} x`` for every ``x`` in ``X`` of shape ``(n, *index.shape)``; same shape."""

    @abstractmethod
    def sample(self, n: int, s: Tensor, randn: Randn) -> Tensor:
        """``(n, *index.shape)`` draws from ``N(0, P_b^{-1})`` from standard normals ``randn``."""
