"""Fit a Laplace approximation at the current weights and prior, and its log marginal likelihood.

The one place where the tuning loop meets the curvature: a *Laplace factory*
``factory(model, prior_precision, differentiable) -> approximation`` (default: from the config's
``curvature`` section, :func:`marglik.tuning.backends.build_laplace`; any object with ``fit(data,
num_data=...)``, ``n_layers`` and ``log_marginal_likelihood(prior_precision=...)`` serves) and the
``num_data`` rescaling of a subset or a shard (:meth:`marglik.tuning.estimator.MarglikSubset.num_data`).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from torch import Tensor, nn

from .hyperparams import PriorPrecision

#: ``factory(model, prior_precision, differentiable)``: an unfitted Laplace approximation
LaplaceFactory = Callable[[nn.Module, Tensor, bool], Any]


class LaplaceMarglik:
    """Laplace fits of the model and their log marginal likelihood at the current prior.

    Args:
        factory: the :data:`LaplaceFactory`.
        model: the network.
        prior: the prior precision.
        differentiable: default of :meth:`make`: factors with an autograd graph (when the
            augmentation is learned).
        sharded: the batches are this rank's shards (``torchrun``).
    """

    def __init__(self, factory: LaplaceFactory, model: nn.Module, prior: PriorPrecision,
                 differentiable: bool = False, sharded: bool = False) -> None:
        self.factory, self.model, self.prior = factory, model, prior
        self.differentiable, self.sharded = bool(differentiable), bool(sharded)

    def make(self, differentiable: Optional[bool] = None) -> Any:
        """An unfitted approximation at the current prior precision.

        Args:
            differentiable: factors with an autograd graph (default: the constructor's).

        Returns:
            What the factory returns.
        """
        diff = self.differentiable if differentiable is None else differentiable
        return self.factory(self.model, self.prior.precision().detach(), diff)

    def fit(self, data: List[Tuple[Tensor, Tensor]], estimator: Any, differentiable: Optional[bool] = None) -> Any:
        """Fit a fresh approximation at the current weights.

        Args:
            data: ``(X_aug, y)`` batches (this rank's shards under ``torchrun``).
            estimator: whose ``num_data(seen, sharded)`` rescaling applies (a
                :class:`~marglik.tuning.estimator.MarglikSubset` or
                :class:`~marglik.tuning.estimator.SelectionSet`).
            differentiable: as :meth:`make`.

        Returns:
            The fitted approximation.

        Raises:
            RuntimeError: the approximation does not cover every trainable parameter tensor.
        """
        la = self._covering(self.make(differentiable))
        seen = sum(len(yb) for _, yb in data)
        la.fit(data, num_data=estimator.num_data(seen, self.sharded))
        return la

    def batchwise(self, raw: List[Any], make_batch: Callable[[Any], Tuple[Tensor, Tensor]], estimator: Any,
                  through: List[Tensor]) -> Tuple[Any, Tensor, List[Optional[Tensor]], List[Tensor]]:
        """A differentiable fit and its log marglik's gradients w.r.t. ``log delta`` and ``through``,
        one batch's graph at a time (:func:`marglik.curvature.batchwise.batchwise_gradients`).

        Args:
            raw: what each batch is made from (its last element: the targets).
            make_batch: ``item -> (X_aug, y)``, deterministic (called twice per item).
            estimator: whose ``num_data`` rescaling applies.
            through: what the batches depend on (``eta``).

        Returns:
            ``(fitted approximation, log marglik (detached), [grad log delta], grads w.r.t. through)``.

        Raises:
            TypeError: the factory's approximation has no ``fit_leaves`` (a Laplace factory of your own).
            RuntimeError: the approximation does not cover every trainable parameter tensor.
        """
        from marglik.curvature.batchwise import batchwise_gradients

        la = self._covering(self.make(True))
        if not hasattr(la, "fit_leaves"):
            raise TypeError(f"hyper.batchwise needs marglik's KronLaplace; the Laplace factory made a "
                            f"{type(la).__name__} (set hyper.batchwise=false)")
        seen = sum(len(item[-1]) for item in raw)
        lml, direct, through_grads = batchwise_gradients(
            la, raw, make_batch, estimator.num_data(seen, self.sharded), self.log_marglik,
            [self.prior.log_prior], through)
        return la, lml, direct, through_grads

    def _covering(self, la: Any) -> Any:
        """``la``, checked to cover every trainable parameter tensor (else ``RuntimeError``)."""
        n_params = len(self.prior.params)
        if la.n_layers != n_params:
            raise RuntimeError(
                f"the Laplace approximation covers {la.n_layers} parameter tensors but the model trains "
                f"{n_params}: every trainable module must be covered by the K-FAC engine"
            )
        return la

    def log_marglik(self, la: Any) -> Tensor:
        """The Laplace log marginal likelihood at the current prior precision.

        Args:
            la: a fitted approximation (:meth:`fit`).

        Returns:
            A 0-d tensor, differentiable w.r.t. ``log delta`` (and ``eta`` through a differentiable fit).
        """
        return la.log_marginal_likelihood(prior_precision=self.prior.precision())
