"""Differentiable affine data augmentation with learnable ranges (Augerino-style, Benton et al.
2020; used for invariance learning with the Laplace marginal likelihood, Immer et al. 2022).

Each of ``S`` augmented copies of an image is warped by ``A = expm(sum_k eps_k * eta_k * G_k)``,
``eps ~ U[-1, 1]^K`` drawn independently per image and copy, with ``G_k`` generators of the
affine Lie algebra acting on normalised coordinates (``[-1, 1]`` across the image, the
``F.affine_grid`` convention). ``eta_k`` is the learnable half-width of the range of generator
``k``; ``eta = 0`` is the identity. The warp is applied with ``F.affine_grid`` +
``F.grid_sample`` (bilinear, ``align_corners=False``, zero padding), which is differentiable
with respect to ``eta`` (reparameterisation trick).

Usage (outside the model; every image model takes the 5-d output)::

    aug = AffineAugmentation(n_samples=10)
    logits = model(aug(X))          # (N, C, H, W) -> (N, S, C, H, W) -> (N, K)

``eta`` is a hyperparameter: the MAP / training step of the network weights must not update it
(keep ``aug.parameters()`` out of the weight optimiser); it is optimised on the marginal
likelihood instead.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The 3x3 generator matrices (homogeneous coordinates ``(x, y, 1)``).
GENERATORS: Dict[str, Sequence[Sequence[float]]] = {
    "translation_x": [[0, 0, 1], [0, 0, 0], [0, 0, 0]],
    "translation_y": [[0, 0, 0], [0, 0, 1], [0, 0, 0]],
    "rotation": [[0, -1, 0], [1, 0, 0], [0, 0, 0]],
    "scale_x": [[1, 0, 0], [0, 0, 0], [0, 0, 0]],
    "scale_y": [[0, 0, 0], [0, 1, 0], [0, 0, 0]],
    "shear": [[0, 1, 0], [1, 0, 0], [0, 0, 0]],
}
ALL_GENERATORS = tuple(GENERATORS)


class AffineAugmentation(nn.Module):
    """Random affine warps with learnable ranges ``eta`` (initialised to zero = no augmentation).

    Args:
        n_samples: augmented copies ``S`` per image.
        generators: names (from :data:`GENERATORS`) of the active generators; ``eta`` has one
            entry per name in this order (shape ``(6,)`` by default).
        generator: optional ``torch.Generator`` for the noise ``eps`` (reproducibility); may be
            overridden per call.

    ``forward(x (N, C, H, W)) -> (N, S, C, H, W)``.
    """

    def __init__(
        self,
        n_samples: int = 1,
        generators: Sequence[str] = ALL_GENERATORS,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        unknown = [g for g in generators if g not in GENERATORS]
        if unknown:
            raise ValueError(f"unknown generators {unknown}; choose from {ALL_GENERATORS}")
        self.n_samples = int(n_samples)
        self.generators = tuple(generators)
        self.generator = generator
        self.eta = nn.Parameter(torch.zeros(len(self.generators)))
        self.register_buffer(
            "basis", torch.tensor([GENERATORS[g] for g in self.generators], dtype=torch.float32), persistent=False
        )

    def sample_eps(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Noise ``eps`` of shape ``(n, S, K)``, uniform in ``[-1, 1]``."""
        gen = generator if generator is not None else self.generator
        shape = (n, self.n_samples, len(self.generators))
        dev = gen.device if gen is not None else self.eta.device
        eps = torch.rand(shape, generator=gen, device=dev, dtype=self.eta.dtype)
        return (2 * eps - 1).to(self.eta.device)

    def matrices(self, eps: Tensor) -> Tensor:
        """Affine matrices ``(..., 3, 3) = expm(sum_k eps[..., k] eta_k G_k)`` for ``eps (..., K)``."""
        lie = torch.einsum("...k,k,kij->...ij", eps, self.eta, self.basis.to(self.eta.dtype))
        return torch.linalg.matrix_exp(lie)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None, eps: Optional[Tensor] = None) -> Tensor:
        """Warp ``x (N, C, H, W)`` into ``(N, S, C, H, W)``; ``eps (N, S, K)`` may be given."""
        if x.dim() != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        s = self.n_samples
        if eps is None:
            eps = self.sample_eps(n, generator)
        theta = self.matrices(eps.to(self.eta.dtype))[..., :2, :].reshape(n * s, 2, 3).to(x.dtype)
        xs = x.unsqueeze(1).expand(n, s, c, h, w).reshape(n * s, c, h, w)  # example-major copies
        grid = F.affine_grid(theta, [n * s, c, h, w], align_corners=False)
        out = F.grid_sample(xs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.reshape(n, s, c, h, w)

    def ranges(self, image_size: Optional[int] = None) -> Dict[str, float]:
        """Current half-widths ``|eta_k|`` in human units.

        * rotation: degrees (``|eta| * 180 / pi``);
        * translations: normalised units (1 = half the image side), or pixels
          (``|eta| * image_size / 2``) if ``image_size`` is given;
        * scales: log-scale factor (the image is scaled by ``exp(u)``, ``|u| <= |eta|``);
        * shear: the dimensionless shear parameter.

        The warp samples input coordinates ``A @ (x, y, 1)``, i.e. applies the inverse of ``A``
        to the image; ranges are symmetric, so this does not matter.
        """
        out: Dict[str, float] = {}
        for name, value in zip(self.generators, self.eta.detach().abs().tolist()):
            if name == "rotation":
                value = value * 180.0 / math.pi
            elif name.startswith("translation") and image_size is not None:
                value = value * image_size / 2.0
            out[name] = value
        return out
