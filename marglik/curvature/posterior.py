"""The K-FAC Laplace posterior precision ``P = s K + diag(p)``: log determinant, solves, samples.

``K`` is a :class:`~marglik.curvature.kron.Kron` (the K-FAC GGN/Fisher of the **summed** loss over
``num_data`` examples), ``s`` a positive scalar (the Laplace posterior uses ``s = 1 / (sigma^2 T)``)
and ``p`` the prior precision, scalar, layerwise or diagonal
(:class:`~marglik.curvature.prior.PriorStructure`).

:class:`DecomposedKron` eigendecomposes every Kronecker factor **once**; afterwards each call takes
the prior and the scale, turns every curvature block into a
:class:`~marglik.curvature.posterior_blocks.PosteriorBlock` (one class per case of the algebra, see
:mod:`marglik.curvature.posterior_blocks` for what is exact) and sums or concatenates the blocks'
results. The log determinant is evaluated as the ratio ``log det P - log det diag(p)`` block by
block, without cancellation, and costs at most ``O(P)`` -- usually far less: eigenvalue products
that are tiny against the prior are summed in closed form
(:class:`~marglik.curvature.logdet.KronLogdetRatio`), for all Kronecker blocks in one call.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .eigen import KronEigen, decompose_factors
from .kron import Kron, KronBlock
from .logdet import as_scalar
from .posterior_blocks import ChannelBlocksInfo, KronBlockEigen, PackedKronBlocks, PosteriorBlock
from .prior import PriorStructure

__all__ = ["DecomposedKron"]

Number = Union[float, Tensor]


class DecomposedKron:
    """A :class:`Kron` with its factors eigendecomposed once, for posterior computations.

    All methods take the prior precision ``prior`` (a float or a tensor of any
    :class:`PriorStructure`) and the likelihood scale ``scale`` (``s``) and work with the posterior
    precision ``P = s * kron + diag(prior)``. Vectors are in ``kron.to_dense()`` order (length ``P``).

    Args:
        kron: the curvature. Its factors may carry an autograd graph; the decomposition uses
            detached copies, :meth:`logdet` routes gradients to the factors in closed form.

    Raises:
        ValueError: ``kron`` has no blocks.

    Attributes:
        kron_blocks: one :class:`KronBlockEigen` per :class:`KronBlock`, in ``kron`` order.
        diag_blocks: one :class:`ChannelBlocksInfo` per :class:`DiagonalBlock`, in ``kron`` order.
        params: the covered parameters.
        n_params: their total size ``P``.
        n_layers: their number (parameter tensors).
    """

    def __init__(self, kron: Kron) -> None:
        if len(kron.blocks) == 0:
            raise ValueError("the Kron has no blocks")
        self.kron = kron
        self.params = list(kron.params)
        self.n_params = kron.num_params
        self.n_layers = len(self.params)
        layer = {id(p): i for i, p in enumerate(self.params)}
        self.kron_blocks: List[KronBlockEigen] = []
        self.diag_blocks: List[ChannelBlocksInfo] = []
        kron_of = [b for b in kron.blocks if isinstance(b, KronBlock)]
        eigs = iter(decompose_factors([F for b in kron_of for F in (b.A_factor, b.B_factor)]))
        for blk in kron.blocks:
            index = kron.block_indices(blk)
            if isinstance(blk, KronBlock):
                G, (nA, nB) = blk.groups, blk.dims
                self.kron_blocks.append(
                    KronBlockEigen(
                        blk,
                        index[blk.dense_index()].reshape(G, nB, nA),
                        KronEigen.from_factors(next(eigs), next(eigs)),
                        layer[id(blk.weight)] if blk.weight is not None else None,
                        layer[id(blk.bias)] if blk.bias is not None else None,
                    )
                )
            else:
                C, k, _ = blk.blocks.shape
                self.diag_blocks.append(
                    ChannelBlocksInfo(blk, index.reshape(k, C).T.contiguous(), [layer[id(p)] for p in blk.params])
                )
        ref = self.kron_blocks[0].lam if self.kron_blocks else self.diag_blocks[0].block.blocks
        self.dtype, self.device = ref.dtype, ref.device
        self._packs: Dict[Tuple, PackedKronBlocks] = {}
        self._layer_of = torch.cat(
            [torch.full((p.numel(),), i, dtype=torch.long) for i, p in enumerate(self.params)]
        ).to(self.device)

    # -------------------------------------------------------------------------- the prior
    def structure(self, prior: Tensor) -> PriorStructure:
        """The :class:`PriorStructure` of a prior precision tensor (ValueError if none fits)."""
        return PriorStructure.of(prior, self.n_layers, self.n_params)

    def prior_diagonal(self, prior: Number) -> Tensor:
        """The prior precision expanded to the ``(P,)`` diagonal."""
        prior = self._prior(prior)
        structure = self.structure(prior)
        if structure is PriorStructure.SCALAR:
            return prior.reshape(()).expand(self.n_params)
        if structure is PriorStructure.LAYERWISE:
            return prior[self._layer_of]
        return prior

    def _prior(self, prior: Number) -> Tensor:
        if not torch.is_tensor(prior):
            prior = torch.tensor(float(prior))
        return prior.to(dtype=self.dtype, device=self.device)

    def _check(self, prior: Number, scale: Number) -> Tuple[Tensor, PriorStructure, Tensor]:
        prior = self._prior(prior)
        return prior, self.structure(prior), as_scalar(scale, prior)

    def posterior_blocks(self, prior: Tensor, structure: PriorStructure) -> List[PosteriorBlock]:
        """Every block of ``P`` for the prior precision ``prior`` (Kronecker blocks first)."""
        return [e.posterior(prior, structure) for e in self.kron_blocks] + [
            d.posterior(prior, structure) for d in self.diag_blocks
        ]

    def exact(self, prior: Number) -> bool:
        """Whether :meth:`logdet` / :meth:`solve` / :meth:`sample` are exact for this prior."""
        structure = self.structure(self._prior(prior))
        return all(e.posterior_type(structure).exact for e in self.kron_blocks)

    # -------------------------------------------------------------------------- log determinant
    def logdet(self, prior: Number, scale: Number = 1.0) -> Tensor:
        """``log det(s K + diag(prior))``.

        Args:
            prior: prior precision (float or tensor, scalar / layerwise / diagonal).
            scale: likelihood scale ``s``.

        Returns:
            0-d tensor; exact except for the projected diagonal-prior blocks (see :meth:`exact`).
        """
        prior = self._prior(prior)
        return self.logdet_ratio(prior, scale) + self.prior_diagonal(prior).log().sum()

    def logdet_ratio(self, prior: Number, scale: Number = 1.0) -> Tensor:
        """``log det(s K + diag(prior)) - log det(diag(prior))``, computed blockwise as a ratio.

        Every block contributes ``log det(I + s D^{-1/2} K_b D^{-1/2})`` evaluated without forming
        the two (large, nearly cancelling) log determinants, so the value and its gradient w.r.t.
        the prior stay accurate in float32 when the curvature is small compared with the prior.
        Unless a factor needs a gradient, the Kronecker blocks with a constant or weight+bias prior
        are evaluated together in one call per block class.

        Args:
            prior: prior precision (float or tensor, scalar / layerwise / diagonal).
            scale: likelihood scale ``s``.

        Returns:
            0-d tensor, differentiable w.r.t. ``prior``, ``scale`` and the factors.
        """
        prior, structure, s = self._check(prior, scale)
        total = s.new_zeros(())
        factor_grad = any(e.block.requires_grad for e in self.kron_blocks)
        packed: Dict[type, List[KronBlockEigen]] = {}
        single: List[PosteriorBlock] = []
        for e in self.kron_blocks:
            cls = e.posterior_type(structure)
            if cls.packable and not factor_grad:
                packed.setdefault(cls, []).append(e)
            else:
                single.append(cls.from_prior(e, prior, structure))
        if packed:
            layer_prior = prior.reshape(()).expand(self.n_layers) if structure is PriorStructure.SCALAR else prior
            # a fixed order (constant-prior blocks first): the gradient's summation order does not
            # depend on which block comes first in the model
            for cls, members in sorted(packed.items(), key=lambda item: item[0].with_bias):
                total = total + self._pack(cls, members).logdet_ratio(s, layer_prior)
        for block in single + [d.posterior(prior, structure) for d in self.diag_blocks]:
            total = total + block.logdet_ratio(s)
        return total

    def _pack(self, cls: type, members: List[KronBlockEigen]) -> PackedKronBlocks:
        key = (cls, tuple(id(e) for e in members))
        if key not in self._packs:
            self._packs[key] = PackedKronBlocks(members, cls.with_bias)
        return self._packs[key]

    # -------------------------------------------------------------------------- solve
    def solve(self, V: Tensor, prior: Number, scale: Number = 1.0) -> Tensor:
        """``P^{-1} v`` for every row ``v`` of ``V``, with the same posterior as :meth:`logdet`.

        Not differentiated through the factors (the decomposition is constant).

        Args:
            V: ``(..., P)`` vectors.
            prior: prior precision (float or tensor, scalar / layerwise / diagonal).
            scale: likelihood scale ``s``.

        Returns:
            ``(..., P)``, differentiable w.r.t. ``V``, ``prior`` and ``scale``.

        Raises:
            ValueError: the last dimension of ``V`` is not ``P``.
        """
        prior, structure, s = self._check(prior, scale)
        if V.shape[-1] != self.n_params:
            raise ValueError(f"expected vectors of length {self.n_params}, got shape {tuple(V.shape)}")
        lead = V.shape[:-1]
        V2 = V.reshape(-1, self.n_params).to(self.dtype)
        out = torch.zeros_like(V2)
        for block in self.posterior_blocks(prior, structure):
            out[:, block.index] = block.solve(V2[:, block.index], s)
        return out.reshape(*lead, self.n_params)

    def inv_quad(self, J: Tensor, prior: Number, scale: Number = 1.0) -> Tensor:
        """``J P^{-1} J^T`` for Jacobians ``J`` of shape ``(N, K, P)``; returns ``(N, K, K)``."""
        S = self.solve(J, prior, scale)
        return J.to(S.dtype) @ S.transpose(-1, -2)

    # -------------------------------------------------------------------------- sampling
    def sample(
        self,
        n_samples: int,
        prior: Number,
        scale: Number = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Draws from ``N(0, P^{-1})`` (the same posterior as :meth:`logdet`).

        Args:
            n_samples: number of draws.
            prior: prior precision (float or tensor, scalar / layerwise / diagonal).
            scale: likelihood scale ``s``.
            generator: random number generator for the standard normals.

        Returns:
            ``(n_samples, P)`` (not differentiable).

        Raises:
            ValueError: ``n_samples < 1``.
        """
        prior, structure, s = self._check(prior, scale)
        prior, s = prior.detach(), s.detach()
        n = int(n_samples)
        if n < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        out = torch.zeros(n, self.n_params, dtype=self.dtype, device=self.device)

        def randn(*shape):
            return torch.randn(*shape, dtype=self.dtype, device=self.device, generator=generator)

        for block in self.posterior_blocks(prior, structure):
            out[:, block.index] = block.sample(n, s, randn)
        return out

    def to_dense(self, prior: Number, scale: Number = 1.0) -> Tensor:
        """Dense ``(P, P)`` posterior precision ``s K + diag(prior)`` (exact, for testing)."""
        prior, _, s = self._check(prior, scale)
        return s * self.kron.to_dense() + torch.diag(self.prior_diagonal(prior))
