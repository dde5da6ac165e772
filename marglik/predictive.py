"""Link approximations of the linearised (GLM) Laplace predictive.

Given the Gaussian over the network outputs at an input, ``f ~ N(f_mu, f_var)`` (``f_mu (N, C)``,
``f_var (N, C, C)``: the MAP outputs and ``J P^{-1} J^T``), these functions approximate the
predictive class probabilities ``E[softmax(f)]`` (or ``E[sigmoid(f)]``). They follow laplace-torch's
``BaseLaplace`` (``laplace/baselaplace.py``) formula for formula, so that both libraries give the
same numbers on the same posterior (tested), and the Laplace bridge of Hobbhahn et al. (2022).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .curvature.options import StrOption

__all__ = [
    "LinkApprox",
    "gaussian_samples",
    "softmax_probit",
    "softmax_mc",
    "softmax_bridge",
    "sigmoid_probit",
    "sigmoid_mc",
]


class LinkApprox(StrOption):
    """How the predictive probabilities are computed from ``N(f_mu, f_var)``."""

    PROBIT = "probit"  #: probit approximation of the softmax / sigmoid (MacKay 1992)
    MC = "mc"  #: Monte-Carlo average over output samples
    BRIDGE = "bridge"  #: Laplace bridge to a Dirichlet (softmax only)
    BRIDGE_NORM = "bridge_norm"  #: Laplace bridge with the variance normalisation (softmax only)


def gaussian_samples(
    f_mu: Tensor, f_var: Tensor, n_samples: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Samples of ``N(f_mu[n], f_var[n])`` for every input ``n``, as laplace-torch draws them.

    One ``(C, n_samples)`` standard-normal draw is shared by all inputs (common random numbers:
    the marginal of every input is exact, the draws of different inputs are correlated).

    Args:
        f_mu: ``(N, C)`` means.
        f_var: ``(N, C, C)`` covariances or ``(N, C)`` variances.
        n_samples: number of samples.
        generator: random number generator (default: the global one).

    Returns:
        ``(n_samples, N, C)``.

    Raises:
        ValueError: the shapes do not fit together.
    """
    if f_mu.dim() != 2:
        raise ValueError(f"f_mu must have shape (N, C), got {tuple(f_mu.shape)}")
    eps = torch.randn((f_mu.shape[1], n_samples), device=f_mu.device, dtype=f_mu.dtype, generator=generator)
    if f_var.shape == f_mu.shape:
        scaled = f_var.sqrt().unsqueeze(-1) * eps.unsqueeze(0)
    elif f_var.shape == f_mu.shape + f_mu.shape[1:]:
        scaled = torch.matmul(torch.linalg.cholesky(f_var), eps.unsqueeze(0))
    else:
        raise ValueError(f"f_var of shape {tuple(f_var.shape)} does not fit f_mu of shape {tuple(f_mu.shape)}")
    return (f_mu.unsqueeze(-1) + scaled).permute((2, 0, 1))


def softmax_probit(f_mu: Tensor, f_var: Tensor) -> Tensor:
    """``softmax(f_mu / sqrt(1 + pi/8 diag(f_var)))``.

    Args:
        f_mu: ``(N, C)``.
        f_var: ``(N, C, C)``.

    Returns:
        ``(N, C)`` class probabilities.
    """
    kappa = 1 / torch.sqrt(1.0 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
    return torch.softmax(kappa * f_mu, dim=-1)


def softmax_mc(
    f_mu: Tensor,
    f_var: Tensor,
    n_samples: int,
    diagonal_output: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Average of ``softmax(f)`` over :func:`gaussian_samples`.

    Args:
        f_mu: ``(N, C)``.
        f_var: ``(N, C, C)``.
        n_samples: number of samples.
        diagonal_output: drop the output covariances (sample with ``diag(f_var)``).
        generator: random number generator.

    Returns:
        ``(N, C)`` class probabilities.
    """
    if diagonal_output:
        f_var = torch.diagonal(f_var, dim1=1, dim2=2)
    return torch.softmax(gaussian_samples(f_mu, f_var, n_samples, generator), dim=-1).mean(dim=0)


def softmax_bridge(f_mu: Tensor, f_var: Tensor, normalize: bool = False) -> Tensor:
    """The Laplace bridge: the mean of the Dirichlet matched to ``N(f_mu, f_var)``.

    The Gaussian is first conditioned on ``sum(f) = 0`` (zero-mean correction); with
    ``normalize`` its variances are rescaled to mean ``2 / C`` (laplace-torch's ``bridge_norm``).

    Args:
        f_mu: ``(N, C)``.
        f_var: ``(N, C, C)``.
        normalize: apply the variance normalisation.

    Returns:
        ``(N, C)`` class probabilities.
    """
    total = f_var.sum(dim=(1, 2))
    f_mu = f_mu - f_var.sum(-1) * f_mu.sum(-1).reshape(-1, 1) / total.reshape(-1, 1)
    f_var = f_var - torch.einsum("bi,bj->bij", f_var.sum(-1), f_var.sum(-2)) / total.reshape(-1, 1, 1)
    K = f_mu.size(-1)
    var = torch.diagonal(f_var, dim1=1, dim2=2)
    if normalize:
        var_mean = var.mean(dim=1) / torch.as_tensor([K / 2], device=f_mu.device, dtype=f_mu.dtype).sqrt()
        f_mu = f_mu / var_mean.sqrt().unsqueeze(-1)
        var = var / var_mean.unsqueeze(-1)
    sum_exp = torch.exp(-f_mu).sum(dim=1).unsqueeze(-1)
    alpha = (1 - 2 / K + f_mu.exp() / K**2 * sum_exp) / var
    return torch.nan_to_num(alpha / alpha.sum(dim=1).unsqueeze(-1), nan=1.0)


def sigmoid_probit(f_mu: Tensor, var: Tensor) -> Tensor:
    """``sigmoid(f_mu / sqrt(1 + pi/8 var))`` for ``f_mu``, ``var`` of shape ``(N, 1)``."""
    return torch.sigmoid(f_mu / torch.sqrt(1.0 + math.pi / 8 * var))


def sigmoid_mc(f_mu: Tensor, var: Tensor, n_samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Average of ``sigmoid(f)``, ``f ~ N(f_mu, var)`` drawn independently per input.

    Args:
        f_mu: ``(N, 1)``.
        var: ``(N, 1)``.
        n_samples: number of samples.
        generator: random number generator.

    Returns:
        ``(N, 1)`` probabilities of class 1.
    """
    eps = torch.randn((n_samples,) + f_mu.shape, dtype=f_mu.dtype, device=f_mu.device, generator=generator)
    return torch.sigmoid(f_mu + var.sqrt() * eps).mean(0)
