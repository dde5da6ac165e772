"""Kronecker-factored Laplace posterior and its log marginal likelihood on :class:`marglik.KFAC`.

:class:`KronLaplace` follows laplace-torch's ``KronLaplace`` (``laplace/baselaplace.py``) term by
term, so that users can switch between the two:

* log-likelihood at the MAP: ``-loss / (sigma^2 T)``, minus ``n_out log(sigma sqrt(2 pi))`` for
  regression, where ``loss`` is the summed NLL of :func:`marglik.KFAC` (cross-entropy,
  ``0.5 ||y - f||^2`` or BCE; laplace-torch's ``factor * MSELoss(sum)``) and ``n_out`` the number
  of regression targets (laplace-torch: ``N * C``). ``T`` is the temperature;
* minus half the log determinant ratio ``log det P - log det P_0`` with the posterior precision
  ``P = K / (sigma^2 T) + P_0`` (``K`` the K-FAC GGN/Fisher of the summed loss, laplace-torch's
  ``H * _H_factor + prior_precision``) and ``P_0 = diag(prior precision)``;
* minus half the scatter ``(theta_MAP - mu_0)^T P_0 (theta_MAP - mu_0)``.

Differences from laplace-torch, by design:

* The curvature is :class:`marglik.KFAC` (K-FAC-expand or -reduce, norm layers and
  ``Scale``/``Bias`` modules covered exactly). Its blocks couple a layer's weight and bias
  (``B ⊗ A`` over ``[W, b]``); laplace-torch's ``Kron`` keeps separate weight and bias blocks.
  ``separate_bias=True`` drops the cross terms and reproduces laplace-torch's structure exactly.
* A layerwise prior is exact also on joint weight+bias blocks (matrix determinant lemma, see
  :mod:`marglik.curvature.posterior_blocks`); a diagonal prior (rejected by laplace-torch's
  ``KronLaplace``) is supported with the documented K-FAC approximation.
* The log determinant has closed-form gradients w.r.t. the prior, ``sigma_noise`` and -- with
  ``differentiable=True`` -- the Kronecker factors (hence e.g. augmentation parameters).

What is written by hand and why: the posterior algebra (:class:`marglik.DecomposedKron`),
because laplace-torch's ``KronDecomposed`` has neither joint weight-bias blocks, per-channel
``2 x 2`` blocks, grouped convolutions, nor gradients that avoid ``eigh``; the Jacobians of the
covered parameters (``torch.func.jacrev``, a few lines), because laplace-torch's backends take all
trainable parameters and do not know ``ignore_modules``; and the link approximations of the GLM
predictive (:mod:`marglik.predictive`: ``probit``, ``mc``, ``bridge``, ``bridge_norm``), which
follow laplace-torch's formulas and give its numbers (tested against its public predictive), plus
a probit / MC link for the sigmoid of the binary likelihood, which laplace-torch lacks. Nothing
private of laplace-torch is used.

This module holds the fit, the prior and the marginal likelihood; the posterior samples and the
GLM predictive (``sample``, ``jacobians``, ``functional_variance``, ``glm_predictive_distribution``,
``__call__``) are inherited from :class:`marglik.laplace_predictive.GLMPredictive`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from .curvature import KFAC, DecomposedKron, Kron, PriorStructure
from .curvature.model_inputs import as_batches
from .curvature.options import Likelihood
from .laplace_predictive import GLMPredictive

if TYPE_CHECKING:
    from .curvature.batchwise import SumLeaf

__all__ = ["KronLaplace"]

TensorLike = Union[float, Tensor]


class KronLaplace(GLMPredictive):
    """Laplace approximation ``N(theta_MAP, P^{-1})`` with a K-FAC posterior precision.

    Args:
        model: the network at its MAP parameters (outputs ``(N, C)``; ``(N, R, C)`` is fine for
            the marginal likelihood, the predictive needs ``(N, C)``).
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        approx: ``"expand"`` or ``"reduce"`` (see :class:`marglik.KFAC`). The default differs from
            the engine's (``"expand"``, curvlinops' and laplace-torch's convention) on purpose:
            ``KronLaplace`` is the marginal-likelihood object of the tuning loop, whose models pool
            or average over their shared axes (reduce's exact setting), and reduce is the cheaper
            fit. Also ``"auto"`` (expand on convolutions, reduce elsewhere: the invariance signal
            of expand where a spatial augmentation acts, :mod:`marglik.curvature.flavours`) or a
            per-layer mapping (see :class:`marglik.KFAC`).
        copies_approx: how augmented copies flattened into the batch enter the factors,
            ``"expand"`` / ``"reduce"``, or ``None`` (the same as ``approx``); see
            :class:`marglik.KFAC`.
        fisher_type: ``"type-2"``, ``"mc"``, ``"mc-root"`` or ``"empirical"`` (:class:`marglik.KFAC`).
        mc_samples: samples per output for ``fisher_type="mc"`` / ``"mc-root"``.
        prior_precision: ``P_0``: a float / 0-d tensor (scalar), a ``(L,)`` tensor with one entry
            per parameter tensor of the covered parameters (layerwise, laplace-torch's convention;
            ``L = len(self.params)``), or a ``(P,)`` tensor (diagonal). Must be positive.
        prior_mean: ``mu_0``: float / 0-d tensor or ``(P,)`` tensor.
        sigma_noise: observation noise std (regression only; must be 1 otherwise).
        temperature: likelihood temperature ``T > 0``.
        differentiable: compute the factors with an autograd graph (``KFAC(differentiable=True)``)
            so that the log marginal likelihood can be differentiated w.r.t. whatever produced them.
        ignore_modules: modules left out of the posterior (as in :class:`marglik.KFAC`).
        separate_bias: drop weight-bias cross terms (laplace-torch's block structure).
        factor_form: ``"auto"`` (default) or ``"dense"``: whether factors built from few rows
            (fewer than half their dimension, e.g. K-FAC-reduce's input factors on a small fit) are
            kept and decomposed as rows -- ``O(d m^2)`` instead of ``O(d^3)``, the same posterior to
            round-off -- or always dense (see :class:`marglik.KFAC`).

    Raises:
        ValueError: an invalid likelihood, prior precision, prior mean, ``sigma_noise`` or
            temperature (the message names it).

    Attributes after :meth:`fit`: ``kron`` (:class:`marglik.Kron`), ``mean`` (``(P,)`` MAP vector
    over ``params`` in ``Kron.to_dense`` order), ``loss`` (summed NLL, 0-d), ``n_data``,
    ``n_outputs`` (number of regression targets summed over the data).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Union[str, Likelihood] = "classification",
        approx: Any = "reduce",
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        prior_precision: TensorLike = 1.0,
        prior_mean: TensorLike = 0.0,
        sigma_noise: TensorLike = 1.0,
        temperature: float = 1.0,
        differentiable: bool = False,
        ignore_modules: Optional[Sequence[Any]] = None,
        separate_bias: bool = False,
        copies_approx: Optional[str] = None,
        factor_form: str = "auto",
    ) -> None:
        self.model = model
        self.kfac = KFAC(
            model,
            likelihood=likelihood,
            approx=approx,
            copies_approx=copies_approx,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            differentiable=differentiable,
            ignore_modules=ignore_modules,
            factor_form=factor_form,
        )
        self.likelihood: Likelihood = self.kfac.likelihood
        self.differentiable = differentiable
        self.separate_bias = separate_bias
        self.params = self.kfac.params
        self.n_params = sum(p.numel() for p in self.params)
        self.n_layers = len(self.params)
        self._layer_sizes = [p.numel() for p in self.params]
        ref = self.params[0]
        self._device, self._dtype = ref.device, ref.dtype
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self.sigma_noise = sigma_noise
        self.kron: Optional[Kron] = None
        self.posterior: Optional[DecomposedKron] = None
        self.mean: Optional[Tensor] = None
        self.loss: Optional[Tensor] = None
        self.n_data = 0
        self.n_outputs = 0

    # ------------------------------------------------------------------ hyperparameters
    def _tensor(self, value: TensorLike, what: str) -> Tensor:
        if torch.is_tensor(value):
            return value.to(device=self._device, dtype=self._dtype)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.tensor(float(value), device=self._device, dtype=self._dtype)
        raise TypeError(f"{what} must be a float or a tensor, got {type(value).__name__}")

    @property
    def prior_precision(self) -> Tensor:
        """The prior precision as set (0-d, ``(L,)`` or ``(P,)``)."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: TensorLike) -> None:
        p = self._tensor(value, "prior_precision")
        if PriorStructure.of(p, self.n_layers, self.n_params) is PriorStructure.SCALAR:
            p = p.reshape(())
        if not torch.isfinite(p.detach()).all() or (p.detach() <= 0).any():
            raise ValueError("prior precision must be positive and finite")
        self._prior_precision = p

    @property
    def prior_structure(self) -> PriorStructure:
        """The :class:`~marglik.PriorStructure` of the prior precision (compares equal to
        ``"scalar"``, ``"layerwise"`` or ``"diagonal"``)."""
        return PriorStructure.of(self._prior_precision, self.n_layers, self.n_params)

    @property
    def prior_mean(self) -> Tensor:
        """The prior mean ``mu_0`` (0-d or ``(P,)``)."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: TensorLike) -> None:
        m = self._tensor(value, "prior_mean")
        if m.dim() == 0 or m.numel() == 1:
            m = m.reshape(())
        elif m.dim() != 1 or m.numel() != self.n_params:
            raise ValueError(
                f"prior mean must be a scalar or a ({self.n_params},) tensor, got shape {tuple(m.shape)}"
            )
        self._prior_mean = m

    @property
    def sigma_noise(self) -> Tensor:
        """The observation noise std (0-d; 1 except for regression)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: TensorLike) -> None:
        s = self._tensor(value, "sigma_noise")
        if s.numel() != 1:
            raise ValueError(f"sigma_noise must be a scalar (homoscedastic noise), got shape {tuple(s.shape)}")
        s = s.reshape(())
        if not torch.isfinite(s.detach()) or s.detach() <= 0:
            raise ValueError(f"sigma_noise must be positive and finite, got {float(s.detach())}")
        if self.likelihood is not Likelihood.REGRESSION and float(s.detach()) != 1.0:
            raise ValueError("sigma_noise != 1 is only available for the regression likelihood")
        self._sigma_noise = s

    @property
    def _H_factor(self) -> Tensor:
        """``1 / (sigma^2 T)``: the scale of the curvature in the posterior precision."""
        return 1.0 / self.sigma_noise.square() / self.temperature

    # ------------------------------------------------------------------ fit
    def fit(self, train_loader: Any, num_data: Optional[int] = None, progress: bool = False) -> "KronLaplace":
        """Compute the K-FAC curvature at the current parameters (the MAP) and decompose it.

        Args:
            train_loader: a DataLoader / iterable of ``(X, y)`` batches or one ``(X, y)`` tuple.
            num_data: data-set size to represent (see :meth:`marglik.KFAC.fit`); default: the
                number of examples seen.
            progress: tqdm progress bar.

        Puts the model in eval mode (as laplace-torch does).

        Returns:
            ``self``.

        Raises:
            ValueError: the training data is empty.
        """
        n_targets, seen = self._accumulate(train_loader, progress)
        self._decompose(num_data, n_targets, seen)
        return self

    def fit_leaves(self, train_loader: Any, num_data: Optional[int] = None) -> List["SumLeaf"]:
        """:meth:`fit` with the factor sums accumulated *without* a graph to the data and then made
        autograd leaves: the first pass of a batchwise gradient (:mod:`marglik.curvature.batchwise`),
        which needs ``differentiable=True`` (the decomposition differentiable w.r.t. the sums).

        Returns:
            The leaves (the gradient of the log marginal likelihood w.r.t. them is the input of
            :func:`marglik.curvature.batchwise.contract`).
        """
        if not self.differentiable:
            raise ValueError("fit_leaves needs KronLaplace(differentiable=True)")
        self.kfac.differentiable = False
        try:
            n_targets, seen = self._accumulate(train_loader, False)
        finally:
            self.kfac.differentiable = True
        leaves = self.kfac.sums_as_leaves()
        self._decompose(num_data, n_targets, seen)
        return leaves

    def _accumulate(self, train_loader: Any, progress: bool) -> Tuple[int, int]:
        self.model.eval()
        batches: Iterable = as_batches(train_loader)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="KronLaplace.fit", leave=False)
        self.kfac.reset()
        n_targets, seen = 0, 0
        for X, y in batches:
            self.kfac.accumulate_batch(X, y)
            n_targets += y.numel()
            seen += y.shape[0]
        if seen == 0:
            raise ValueError("the training data is empty")
        return n_targets, seen

    def _decompose(self, num_data: Optional[int], n_targets: int, seen: int) -> None:
        kron = self.kfac.result(num_data)
        if self.separate_bias:
            kron = kron.split_bias()
        self.kron = kron
        self.posterior = DecomposedKron(kron)
        self.n_data = kron.num_data
        self.n_outputs = n_targets * kron.num_data / seen
        self.loss = kron.meta["loss"]
        mean = parameters_to_vector(self.params)
        self.mean = mean if self.differentiable else mean.detach()

    def _check_fitted(self) -> None:
        if self.posterior is None:
            raise RuntimeError("KronLaplace is not fitted: call fit(train_loader) first")

    # ------------------------------------------------------------------ marginal likelihood
    @property
    def log_likelihood(self) -> Tensor:
        """Log-likelihood of the training data at the MAP (laplace-torch's ``log_likelihood``)."""
        self._check_fitted()
        ll = -self._H_factor * self.loss
        if self.likelihood is Likelihood.REGRESSION:
            ll = ll - self.n_outputs * torch.log(self.sigma_noise * math.sqrt(2 * math.pi))
        return ll

    @property
    def prior_precision_diag(self) -> Tensor:
        """``(P,)`` diagonal of ``P_0``."""
        self._check_fitted()
        return self.posterior.prior_diagonal(self.prior_precision)

    @property
    def scatter(self) -> Tensor:
        """``(theta_MAP - mu_0)^T P_0 (theta_MAP - mu_0)``."""
        self._check_fitted()
        delta = self.mean - self.prior_mean
        structure = self.prior_structure
        if structure is PriorStructure.DIAGONAL:
            return (delta * self.prior_precision) @ delta
        sq = delta * delta
        if structure is PriorStructure.SCALAR:
            return self.prior_precision * sq.sum()
        # layerwise: per-tensor sums of squares (avoids expanding the prior to length P)
        per_layer = torch.stack([t.sum() for t in sq.split(self._layer_sizes)])
        return self.prior_precision @ per_layer

    @property
    def log_det_prior_precision(self) -> Tensor:
        """``log det P_0``."""
        return self.prior_precision_diag.log().sum()

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det P`` (exact for scalar / layerwise priors, see :meth:`marglik.DecomposedKron.exact`)."""
        self._check_fitted()
        return self.posterior.logdet(self.prior_precision, self._H_factor)

    @property
    def log_det_ratio(self) -> Tensor:
        """``log det P - log det P_0``, computed blockwise as a ratio (no cancellation, see
        :meth:`marglik.DecomposedKron.logdet_ratio`)."""
        self._check_fitted()
        return self.posterior.logdet_ratio(self.prior_precision, self._H_factor)

    def log_marginal_likelihood(
        self, prior_precision: Optional[TensorLike] = None, sigma_noise: Optional[TensorLike] = None
    ) -> Tensor:
        """Laplace log marginal likelihood.

        ``log p(D | theta_MAP) - 0.5 (log det P - log det P_0) - 0.5 scatter``.

        Args:
            prior_precision: if given, replaces the stored prior precision (as in laplace-torch).
            sigma_noise: if given, replaces the stored noise std (regression only).

        Returns:
            0-d tensor, differentiable w.r.t. the prior precision and ``sigma_noise``, and w.r.t.
            the factors if ``differentiable=True``.

        Raises:
            RuntimeError: not fitted.
            ValueError: an invalid prior precision or ``sigma_noise``, or ``sigma_noise`` for a
                likelihood other than regression.
        """
        self._check_fitted()
        if prior_precision is not None:
            self.prior_precision = prior_precision
        if sigma_noise is not None:
            if self.likelihood is not Likelihood.REGRESSION:
                raise ValueError("sigma_noise can only be changed for the regression likelihood")
            self.sigma_noise = sigma_noise
        return self.log_likelihood - 0.5 * (self.log_det_ratio + self.scatter)

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        n_steps: int = 100,
        lr: float = 0.1,
        init_prior_prec: Optional[TensorLike] = None,
        prior_structure: Optional[Union[str, PriorStructure]] = None,
        verbose: bool = False,
    ) -> Tensor:
        """Maximise the log marginal likelihood over ``log prior_precision`` with Adam.

        Args:
            method: only ``"marglik"``.
            n_steps: Adam steps.
            lr: Adam learning rate.
            init_prior_prec: start value (default: the current prior precision).
            prior_structure: ``"scalar"``, ``"layerwise"`` or ``"diagonal"`` to broadcast a scalar
                start value; default: the structure of the start value.
            verbose: print the negative log marginal likelihood every 10 steps.

        Returns:
            The optimised prior precision (also stored).

        Raises:
            RuntimeError: not fitted.
            ValueError: unknown ``method`` or ``prior_structure``, negative ``n_steps``, or a start
                value whose size does not match ``prior_structure``.
        """
        self._check_fitted()
        if method != "marglik":
            raise ValueError(f"unknown method {method!r}; only 'marglik' is implemented")
        if not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative integer, got {n_steps!r}")
        init = self.prior_precision if init_prior_prec is None else self._tensor(init_prior_prec, "init_prior_prec")
        init = init.detach()
        if prior_structure is not None:
            prior_structure = PriorStructure.parse(prior_structure, "prior_structure")
            size = prior_structure.size(self.n_layers, self.n_params)
            if init.numel() == 1:
                init = init.reshape(()).expand(size).clone()
                if prior_structure is PriorStructure.SCALAR:
                    init = init.reshape(())
            elif init.numel() != size:
                raise ValueError(f"init_prior_prec of shape {tuple(init.shape)} does not match {prior_structure!r}")
        self.prior_precision = init
        log_prec = self.prior_precision.detach().log().clone().requires_grad_(True)
        opt = torch.optim.Adam([log_prec], lr=lr)
        for step in range(n_steps):
            opt.zero_grad()
            neg = -self.log_marginal_likelihood(prior_precision=log_prec.exp())
            neg.backward()
            opt.step()
            if verbose and (step % 10 == 0 or step == n_steps - 1):
                print(f"step {step}: neg log marglik {float(neg):.4f}")
        self.prior_precision = log_prec.detach().exp()
        return self.prior_precision

    # ------------------------------------------------------------------ posterior
    @property
    def posterior_precision(self) -> Tensor:
        """Dense ``(P, P)`` posterior precision (small models / testing only)."""
        self._check_fitted()
        return self.posterior.to_dense(self.prior_precision.detach(), self._H_factor.detach())
