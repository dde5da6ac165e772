"""The hypersteps of one marglik update: ``K`` Adam ascent steps of ``(log delta, eta)`` on the
Laplace log marginal likelihood of a (sub)set of augmented training batches.

A fresh Laplace fit per step when the augmentation is learned (``eta`` moves the data; the fit is
differentiable w.r.t. ``eta``), one fit for all ``K`` steps otherwise (the fit does not depend on
the prior precision). Which batches a fit sees: :class:`marglik.tuning.estimator.MarglikSubset`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..distributed import DistContext
from ..estimator import MarglikSubset
from .data import TensorData
from .hyperparams import Augmenter, PriorPrecision
from .laplace_fit import LaplaceMarglik
from .nonfinite import NonFiniteValue

#: the parts of a hyperstep timed in ``HyperStep.phase_seconds``
PHASES = ("fit", "log_marglik", "gradient")


def sync(device: torch.device) -> None:
    """Wait for the device (honest timings on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HyperStep:
    """The ``K`` hypersteps of one marglik update.

    Args:
        model: the network (put in eval mode for the fits).
        prior: ``log delta``.
        augmenter: ``eta`` (learned when enabled) and the augmentation of the fit's batches.
        laplace: fits and log marginal likelihoods.
        estimator: which batches a fit sees.
        data: the training data.
        optimizer: Adam over ``log delta`` (and ``eta``), each group with its ``base_lr``.
        generator: the subset stream.
        steps: ``K``.
        lr_factor: ``lr_factor(epoch)``: the scheduled factor on the ``base_lr`` s after ``epoch``
            completed epochs (``None``: 1).
        dist: the process group.
        batchwise: with learned augmentation, take eta's gradient one batch at a time
            (:meth:`_batchwise_fit`; ``hyper.batchwise``).
        prior_steps: ``P`` more steps after the ``K``, on ``log delta`` alone, each reusing the last
            fit (a log det and its closed-form gradient, no forward or backward pass; ``hyper.prior_steps``).
            The fit does not depend on the prior precision, so each is an exact gradient step of that
            fit's log marglik; ``eta`` keeps its value (its gradient would need a new fit).

    State: the optimizer, ``lr_scale`` (the rollbacks' factor on the hyper lrs) and the timings:
    ``step_seconds`` (steps with a fit), ``cached_step_seconds`` (steps reusing one), ``n_fits``,
    ``phase_seconds`` (``fit``, ``log_marglik``, ``gradient``).
    """

    def __init__(self, model: nn.Module, prior: PriorPrecision, augmenter: Augmenter, laplace: LaplaceMarglik,
                 estimator: MarglikSubset, data: TensorData, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, steps: int, lr_factor: Optional[Callable[[int], float]] = None,
                 dist: Optional[DistContext] = None, batchwise: bool = False, prior_steps: int = 0) -> None:
        self.model, self.prior, self.augmenter, self.laplace = model, prior, augmenter, laplace
        self.batchwise = bool(batchwise)
        self.estimator, self.data, self.optimizer, self.generator = estimator, data, optimizer, generator
        self.steps = int(steps)
        self.prior_steps = int(prior_steps)
        self.lr_factor = lr_factor if lr_factor is not None else (lambda epoch: 1.0)
        self.dist = dist if dist is not None else DistContext()
        self.lr_scale = 1.0
        self.step_seconds: List[float] = []
        self.cached_step_seconds: List[float] = []
        self.n_fits = 0
        #: seconds spent in the fits (forward and backward passes, factors), the log marglik (log det)
        #: and its gradient; a batchwise step counts all three as ``fit``
        self.phase_seconds: Dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def _lap(self, phase: str, since: float) -> float:
        """Add the seconds since ``since`` to ``phase_seconds[phase]`` (device synchronised); returns now."""
        sync(self.device)
        now = time.perf_counter()
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + now - since
        return now

    @property
    def device(self) -> torch.device:
        """Where the hyperparameters live."""
        return self.prior.log_prior.device

    def set_lrs(self, epoch: int) -> None:
        """Set the hyper lrs: ``base_lr * lr_factor(epoch) * lr_scale``.

        Args:
            epoch: completed epochs.
        """
        factor = self.lr_scale * self.lr_factor(epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor

    def batches(self) -> List[Tuple[Tensor, Tensor]]:
        """Batches for one Laplace fit (the subset: all data, or ``marglik_batches`` random
        batches), augmented with the current ``eta`` (differentiable w.r.t. ``eta``)."""
        X, y = self.data.X, self.data.y
        batches = self.estimator.index_batches(self.generator, X.device)
        if self.dist.enabled:  # this rank's shard of every batch; the fit all-reduces the sums
            return [(self.augmenter(X[i], shard=True), y[i][self.dist.shard(len(i))]) for i in batches]
        return [(self.augmenter(X[i]), y[i]) for i in batches]

    def _batchwise_fit(self) -> Tuple[Any, Tensor, Tuple[Optional[Tensor], Tensor]]:
        """One fit, its log marglik and the gradients of ``-log marglik`` w.r.t. ``(log delta, eta)``,
        holding one batch's autograd graph at a time (:mod:`marglik.curvature.batchwise`): the noise of
        every batch is drawn once, and each batch is augmented twice with it (without a graph for the
        fit, with one for its share of ``eta``'s gradient). Equal to the one-pass gradient up to
        round-off (``tests/test_batchwise.py``)."""
        X, y = self.data.X, self.data.y
        aug, gen = self.augmenter.aug, self.augmenter.generator
        raw = [(X[i], aug.sample_eps(len(i), gen), y[i]) for i in self.estimator.index_batches(self.generator, X.device)]
        la, lml, (g_prior,), (g_eta,) = self.laplace.batchwise(
            raw, lambda item: (aug(item[0], eps=item[1]), item[2]), self.estimator, [self.augmenter.eta])
        return la, lml, (None if g_prior is None else -g_prior, -g_eta)

    def run(self, epoch: int) -> Tuple[Dict[str, float], Any]:
        """The ``K`` hypersteps after ``epoch`` completed epochs.

        Args:
            epoch: completed epochs (for the lr schedule).

        Returns:
            ``({"hyperstep_log_marglik": last step's estimate (before its step),
            "hyperstep_log_marglik_first": first step's}, last fit)``.

        Raises:
            NonFiniteValue: a non-finite hyperparameter, log marglik or gradient, or a failed
                factorisation (kind ``"marglik"``).
        """
        self.set_lrs(epoch)
        self.model.eval()
        aug_on = self.augmenter.enabled
        log_prior, eta = self.prior.log_prior, self.augmenter.eta
        hyper_params = [log_prior] + ([eta] if aug_on else [])
        la = None
        values = []
        pre = None
        try:
            total = self.steps + self.prior_steps
            for k in range(total):
                where = f"hyperstep {k + 1}/{total}"
                sync(self.device)
                t0 = time.perf_counter()
                prior_only = k >= self.steps  # reuse the last fit; eta keeps its value
                fitted = (la is None or aug_on) and not prior_only
                params = [log_prior] if prior_only else hyper_params
                if not torch.isfinite(log_prior).all() or not torch.isfinite(eta).all():
                    raise NonFiniteValue("marglik", "non-finite hyperparameters", where)
                batchwise = fitted and aug_on and self.batchwise
                try:
                    if batchwise:  # fit, log marglik and gradients together, one batch's graph at a time
                        la, lml, grads = self._batchwise_fit()
                    else:
                        if fitted:
                            la = self.laplace.fit(self.batches(), self.estimator)
                        t_fit = self._lap("fit", t0)
                        lml = self.laplace.log_marglik(la)
                        t_lml = self._lap("log_marglik", t_fit)
                    if fitted:
                        self.n_fits += 1
                except (torch.linalg.LinAlgError, FloatingPointError) as err:  # e.g. factors overflowed to inf
                    raise NonFiniteValue("marglik", f"{type(err).__name__}: {err}", where) from None
                if not torch.isfinite(lml):
                    raise NonFiniteValue("marglik", lml.item(), where)
                if not batchwise:
                    grads = torch.autograd.grad(-lml, params, allow_unused=True, retain_graph=self.prior_steps > 0)
                    self._lap("gradient", t_lml)
                else:
                    self._lap("fit", t0)  # one pass does all three
                if self.dist.enabled and aug_on and not prior_only:
                    # eta acts through each rank's own shard: its gradient is the sum over ranks.
                    # The prior precision acts through the all-reduced factors only: same on all ranks.
                    grads = (grads[0], self.dist.sum_(torch.zeros_like(eta) if grads[1] is None
                                                      else grads[1].detach().clone()))
                pre = lml.item()
                if any(g is not None and not torch.isfinite(g).all() for g in grads):
                    raise NonFiniteValue("marglik", "non-finite gradient", where)
                for p, g in zip(params, grads):  # eta's grad stays None in a prior-only step: Adam skips it
                    p.grad = torch.zeros_like(p) if g is None else g
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.dist.enabled:  # identical hyperparameters on every rank, whatever the hardware
                    for p in hyper_params:
                        self.dist.broadcast_(p.data)
                sync(self.device)
                (self.step_seconds if fitted else self.cached_step_seconds).append(time.perf_counter() - t0)
                values.append(pre)
        finally:
            self.model.train()
        return {"hyperstep_log_marglik": pre, "hyperstep_log_marglik_first": values[0]}, la

    def state_dict(self) -> Dict[str, Any]:
        """Returns: ``optimizer``, ``lr_scale``, ``step_seconds``, ``cached_step_seconds``, ``n_fits``,
        ``phase_seconds``."""
        return {"optimizer": self.optimizer.state_dict(), "lr_scale": self.lr_scale,
                "step_seconds": list(self.step_seconds), "cached_step_seconds": list(self.cached_step_seconds),
                "n_fits": self.n_fits, "phase_seconds": dict(self.phase_seconds)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Args: state: a :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scale = state["lr_scale"]
        self.step_seconds = list(state["step_seconds"])
        self.cached_step_seconds = list(state["cached_step_seconds"])
        self.n_fits = state["n_fits"]
        # checkpoints written before the phase split lack it: their phases start at zero
        self.phase_seconds = dict(state.get("phase_seconds", dict.fromkeys(PHASES, 0.0)))
