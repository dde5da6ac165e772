"""The posterior side of :class:`marglik.laplace.KronLaplace`: parameter samples and the linearised
(GLM) predictive, as a base class it inherits.

:class:`GLMPredictive` turns a fitted posterior ``N(theta_MAP, P^{-1})`` into predictions: the
Jacobians ``J (N, C, P)`` of the outputs w.r.t. the covered parameters, the functional variance
``J P^{-1} J^T (N, C, C)`` and the predictive probabilities through the link approximations of
:mod:`marglik.predictive` (laplace-torch's conventions). Fitting, the prior and the marginal
likelihood stay in :mod:`marglik.laplace`.

What a subclass provides (``KronLaplace`` does): ``model``, ``params`` (the covered parameters),
``n_params`` (``P``), ``likelihood`` (:class:`~marglik.curvature.options.Likelihood`), ``mean``
(``(P,)``), ``posterior`` (:class:`marglik.DecomposedKron`), ``prior_precision``, ``_H_factor``
(``1 / (sigma^2 T)``) and ``_check_fitted()``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from .curvature.model_inputs import call_args
from .curvature.options import Likelihood
from .predictive import LinkApprox, sigmoid_mc, sigmoid_probit, softmax_bridge, softmax_mc, softmax_probit

__all__ = ["GLMPredictive"]


class GLMPredictive:
    """Posterior samples and the GLM predictive of a fitted Laplace approximation (a base class;
    the attributes it reads are listed in the module docstring)."""

    def sample(self, n_samples: int = 100, generator: Optional[torch.Generator] = None) -> Tensor:
        """Parameter samples from the posterior ``N(theta_MAP, P^{-1})``.

        Args:
            n_samples: number of samples.
            generator: random number generator.

        Returns:
            ``(n_samples, P)`` in ``params`` order.

        Raises:
            RuntimeError: not fitted.
            ValueError: ``n_samples < 1``.
        """
        self._check_fitted()
        eps = self.posterior.sample(n_samples, self.prior_precision, self._H_factor, generator=generator)
        return self.mean.detach().unsqueeze(0) + eps

    def functional_variance(self, Js: Tensor) -> Tensor:
        """``J P^{-1} J^T``, the covariance of the linearised outputs.

        Args:
            Js: ``(N, C, P)`` Jacobians w.r.t. ``params``.

        Returns:
            ``(N, C, C)``.

        Raises:
            RuntimeError: not fitted.
            ValueError: ``Js`` has the wrong shape.
        """
        self._check_fitted()
        if Js.dim() != 3 or Js.shape[-1] != self.n_params:
            raise ValueError(f"Jacobians must have shape (N, C, {self.n_params}), got {tuple(Js.shape)}")
        return self.posterior.inv_quad(Js, self.prior_precision.detach(), self._H_factor.detach())

    def jacobians(self, x: Any) -> Tuple[Tensor, Tensor]:
        """Jacobians of the model outputs w.r.t. the covered parameters (``torch.func.jacrev``).

        Args:
            x: a tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``).

        Returns:
            ``(J, f)``: Jacobians ``(N, C, P)`` and outputs ``(N, C)``, detached. A 1-d output
            (binary) is treated as ``(N, 1)``.

        Raises:
            ValueError: the outputs are not ``(N, C)``.
        """
        names = {id(p): n for n, p in self.model.named_parameters()}
        keys = [names[id(p)] for p in self.params]
        values = {k: p.detach() for k, p in zip(keys, self.params)}

        def f(pdict):
            out = torch.func.functional_call(self.model, pdict, *call_args(x))
            if out.dim() == 1:
                out = out.unsqueeze(-1)
            return out, out

        jac, out = torch.func.jacrev(f, has_aux=True)(values)
        if out.dim() != 2:
            raise ValueError(f"the predictive needs model outputs of shape (N, C), got {tuple(out.shape)}")
        J = torch.cat([jac[k].flatten(start_dim=2) for k in keys], dim=-1)
        return J.detach(), out.detach()

    def glm_predictive_distribution(self, x: Any) -> Tuple[Tensor, Tensor]:
        """Mean and covariance of the linearised network outputs ``f(x)`` under the posterior.

        Args:
            x: inputs (see :meth:`jacobians`).

        Returns:
            ``(f_mu, f_var)``: the outputs at the MAP ``(N, C)`` and ``J P^{-1} J^T`` ``(N, C, C)``.

        Raises:
            RuntimeError: not fitted.
            ValueError: the model's outputs are not ``(N, C)``.
        """
        self._check_fitted()
        Js, f_mu = self.jacobians(x)
        return f_mu, self.functional_variance(Js)

    def __call__(
        self,
        x: Any,
        link_approx: Union[str, LinkApprox] = "probit",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Linearised (GLM) predictive, with laplace-torch's link approximations and conventions.

        Args:
            x: inputs (see :meth:`jacobians`).
            link_approx: ``"probit"``, ``"mc"``, ``"bridge"`` or ``"bridge_norm"``
                (:mod:`marglik.predictive`); the bridge exists for the softmax only. Not used for
                regression.
            n_samples: samples for ``"mc"``.
            diagonal_output: regression: return the output variances ``(N, C)``; ``"mc"`` for
                classification: sample without the output covariances.
            generator: random number generator for ``"mc"`` (default: the global one).

        Returns:
            Classification: class probabilities ``(N, C)``. Binary: probabilities of class 1,
            ``(N, 1)``. Regression: ``(f_mu (N, C), f_var (N, C, C))`` -- the functional variance,
            without the observation noise (laplace-torch's convention).

        Raises:
            RuntimeError: not fitted.
            ValueError: unknown ``link_approx``, or the bridge for the binary likelihood.
        """
        self._check_fitted()
        link = LinkApprox.parse(link_approx, "link_approx")
        f_mu, f_var = self.glm_predictive_distribution(x)
        if self.likelihood is Likelihood.REGRESSION:
            return f_mu, torch.diagonal(f_var, dim1=-2, dim2=-1) if diagonal_output else f_var
        if self.likelihood is Likelihood.BINARY:
            var = f_var[:, :1, 0]
            if link is LinkApprox.PROBIT:
                return sigmoid_probit(f_mu, var)
            if link is LinkApprox.MC:
                return sigmoid_mc(f_mu, var, n_samples, generator)
            raise ValueError("the bridge approximation is only defined for the softmax (classification)")
        if link is LinkApprox.PROBIT:
            return softmax_probit(f_mu, f_var)
        if link is LinkApprox.MC:
            return softmax_mc(f_mu, f_var, n_samples, diagonal_output, generator)
        return softmax_bridge(f_mu, f_var, normalize=link is LinkApprox.BRIDGE_NORM)

    predictive = __call__
