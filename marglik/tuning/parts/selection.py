"""The selection value and the best state: the Laplace log marginal likelihood of the current
weights and hyperparameters on fixed data (:class:`marglik.tuning.estimator.SelectionSet`), after
every marglik update; the highest so far marks the state the summary reports by default."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..distributed import DistContext
from ..estimator import SelectionSet
from .data import TensorData
from .hyper_step import sync
from .hyperparams import Augmenter, PriorPrecision
from .laplace_fit import LaplaceMarglik
from .nonfinite import NonFiniteValue


class Selection:
    """The selection value (no gradient) and the best-selection-value state.

    Args:
        estimator: the fixed selection data.
        laplace: fits and log marginal likelihoods.
        model: the network.
        prior: ``log delta``.
        augmenter: ``eta`` and the augmentation (one fixed noise draw per evaluation).
        data: the training data.
        hyperstep_fit_is_exact: the hyperstep's fit sees the whole training set in order, without
            augmentation noise or MC labels: when the selection set is the whole set too, its value
            reuses that fit.
        dist: the process group.

    State: ``best`` (``log_marglik``, ``epoch``, ``model``, ``log_prior``, ``eta`` of the best
    update, or ``None``), ``last_log_marglik`` and ``seconds`` (one per selection value).
    """

    def __init__(self, estimator: SelectionSet, laplace: LaplaceMarglik, model: nn.Module, prior: PriorPrecision,
                 augmenter: Augmenter, data: TensorData, hyperstep_fit_is_exact: bool = False,
                 dist: Optional[DistContext] = None) -> None:
        self.estimator, self.laplace, self.model, self.prior = estimator, laplace, model, prior
        self.augmenter, self.data, self.hyperstep_fit_is_exact = augmenter, data, bool(hyperstep_fit_is_exact)
        self.dist = dist if dist is not None else DistContext()
        self.best: Optional[Dict[str, Any]] = None
        self.last_log_marglik = float("nan")
        self.seconds: List[float] = []

    def batches(self) -> List[Tuple[Tensor, Tensor]]:
        """The fixed batches, augmented with the current ``eta`` and the same noise draw every
        time; this rank's shards under ``torchrun``."""
        X, y = self.data.X, self.data.y
        gen = self.estimator.noise_generator()
        with torch.no_grad():
            return [(self.augmenter(X[i], generator=gen, shard=True), y[i][self.dist.shard(len(i))])
                    for i in self.estimator.index_batches(X.device)]

    def reuses(self) -> bool:
        """Whether the hyperstep's last fit is on exactly the selection data."""
        return self.hyperstep_fit_is_exact and self.estimator.size >= self.estimator.n_data

    def value(self, la: Any = None) -> Tensor:
        """The selection value at the current weights and hyperparameters.

        No gradient is kept. The global RNGs are forked and seeded from the run's seed for the
        fit, so a Monte-Carlo estimate draws the same signs or labels every time and the run's own random streams are
        not advanced: the value changes only when the weights or the hyperparameters do. Under
        ``torchrun`` each rank fits its shard of every batch and the fit all-reduces the sums, so
        every rank holds the global value.

        Args:
            la: a fitted approximation on exactly these data to reuse; ``None``: fit one.

        Returns:
            A 0-d tensor.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            if la is None:
                la = self.fit()
            with torch.no_grad():
                return self.laplace.log_marglik(la).detach()
        finally:
            self.model.train(was_training)

    def fit(self) -> Any:
        """A fresh fit (no gradient) on the selection data at the current weights and ``eta``, with
        the global RNGs forked and seeded from the run's seed (the same noise and MC labels every
        time; the run's own streams are not advanced). :meth:`value` evaluates it; a caller that wants
        the terms of the log marglik (``log_likelihood``, ``log_det_ratio``, ``scatter``) reads them
        from it. Leaves the model's train/eval mode as it is.

        Returns:
            The fitted approximation.
        """
        device = self.prior.log_prior.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.estimator.noise_generator().initial_seed())
            return self.laplace.fit(self.batches(), self.estimator, differentiable=False)

    def update(self, epoch: int, hyperstep_fit: Any = None) -> bool:
        """The selection value after the update of epoch ``epoch`` (1-based); keeps the best state.

        Args:
            epoch: the epoch of the update.
            hyperstep_fit: the hyperstep's last fit (reused when :meth:`reuses`).

        Returns:
            Whether this value is the best so far (then :attr:`best` holds this state).

        Raises:
            NonFiniteValue: a non-finite value or a failed factorisation (kind ``"marglik"``).
        """
        device = self.prior.log_prior.device
        sync(device)
        t0 = time.perf_counter()
        try:
            sel = self.value(hyperstep_fit if self.reuses() else None)
        except (torch.linalg.LinAlgError, FloatingPointError) as err:
            raise NonFiniteValue("marglik", f"{type(err).__name__}: {err}", "selection value") from None
        if not torch.isfinite(sel):
            raise NonFiniteValue("marglik", sel.item(), "selection value")
        sync(device)
        self.seconds.append(time.perf_counter() - t0)
        selected = sel.item()
        self.last_log_marglik = selected
        if self.best is None or selected > self.best["log_marglik"]:
            self.best = ckpt.detach_copy({
                "log_marglik": selected, "epoch": epoch, "model": self.model.state_dict(),
                "log_prior": self.prior.log_prior, "eta": self.augmenter.eta,
            })
            return True
        return False

    def restore_best(self) -> None:
        """Load the best state's weights and hyperparameters into the model, ``delta`` and ``eta``."""
        self.model.load_state_dict(self.best["model"])
        with torch.no_grad():
            self.augmenter.eta.copy_(self.best["eta"])
            self.prior.log_prior.copy_(self.best["log_prior"])

    def state_dict(self) -> Dict[str, Any]:
        """Returns: ``best``, ``last_log_marglik``, ``seconds``."""
        return {"best": self.best, "last_log_marglik": self.last_log_marglik, "seconds": list(self.seconds)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Args: state: a :meth:`state_dict`."""
        self.best = state["best"]
        self.last_log_marglik = state["last_log_marglik"]
        self.seconds = list(state["seconds"])
