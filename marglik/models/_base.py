"""Shared input handling of the image models: plain batches and batches of augmented copies."""

from __future__ import annotations

from torch import Tensor, nn


class ImageClassifier(nn.Module):
    """Base class of the image models (MLP, SmallCNN, WideResNet, ViT).

    ``forward`` accepts

    * ``(N, C, H, W)`` -> logits ``(N, K)`` (subclasses may accept other non-5-d shapes), or
    * ``(N, S, C, H, W)``, ``S`` augmented copies of every example -> logits ``(N, K)``: the
      invariant model ``f(x) = mean_s f(T_s x)``. The copies are flattened **example-major**,
      ``x.reshape(N * S, C, H, W)`` (row ``n * S + s`` is copy ``s`` of example ``n``), which is
      the layout :mod:`marglik.curvature.sharing` (rule 3) relies on, the network is run once on
      the ``N * S`` images and its ``(N * S, K)`` output is reshaped to ``(N, S, K)`` and averaged
      over ``S``.

    Subclasses implement :meth:`forward_single` for one image per example.
    """

    def forward_single(self, x: Tensor) -> Tensor:
        """Logits ``(B, K)`` of a batch of ``B`` single images ``(B, C, H, W)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 5:
            n, s = x.shape[:2]
            out = self.forward_single(x.reshape(n * s, *x.shape[2:]))
            return out.reshape(n, s, -1).mean(dim=1)
        return self.forward_single(x)
