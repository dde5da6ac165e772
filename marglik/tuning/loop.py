"""Marginal-likelihood hyperparameter tuning with learned augmentation (the outer loop).

Classification only: the MAP loss and the evaluation are the cross-entropy of the model's logits
``(B, num_classes)`` against integer labels, and the Laplace approximation is built with
``likelihood="classification"`` (:func:`marglik.tuning.backends.build_laplace`). Regression or
binary likelihoods are supported by :class:`marglik.KronLaplace`, not by this loop.

Immer et al. (ICML 2021), Algorithm 1, with the invariance learning of Immer et al. (NeurIPS 2022)
and the K-FAC-expand/reduce Laplace of Eschenhagen et al. (NeurIPS 2023):

.. code-block:: text

    for epoch = 1..T:
        for each batch (X, y) of size B:                      # MAP step (weights only)
            X_aug = aug_eta(X)  -> (B, S, C, H, W)            #   current eta, no gradient to eta
            loss  = mean_b nll(f(X_aug), y) + 1/(2N) sum_l delta_l ||theta_l||^2
            theta <- optimizer step on loss                    #   = -log joint / N, batch estimate
        if epoch > burn_in and (epoch - burn_in) % F == 0:     # marglik update
            repeat K times:
                fit K-FAC Laplace at theta on (aug_eta(X), y) of a subset of M batches
                log p(D | delta, eta) ~= Laplace log marglik(prior precision delta)
                (log delta, eta) <- Adam ascent step on it    # own lrs; optional cosine decay
            selection value = Laplace log marglik on fixed data at the updated (delta, eta)
            keep the state as best.ckpt if it has the highest selection value so far

``delta`` is a scalar or one prior precision per parameter tensor (``hyper.prior_structure``),
optimised in log space. The MAP step never updates ``eta`` (``eta`` and ``log delta`` are in a
separate optimizer; the augmented batch is computed under ``no_grad``).

The estimator. The Laplace log marginal likelihood of :class:`marglik.laplace.KronLaplace`
(log-likelihood at theta, minus half the log-determinant ratio of posterior and prior precision,
minus half the prior scatter) is evaluated on the augmented data with the K-FAC GGN
(``curvature.approx`` = expand | reduce on the positions inside an image,
``curvature.copies_approx`` on the augmented copies, reduce by default as the model averages its
logits over them; see :class:`marglik.KFAC`). With ``hyper.marglik_batches = M`` only ``M`` random
batches (``hyper.marglik_batch_size``) are used per Laplace fit: the summed log-likelihood and the
GGN factor ``B`` are rescaled by ``N / (M * batch size)`` (``num_data`` rescaling), which gives an
unbiased estimate of the data term and of the GGN, and hence a *stochastic* (and, through the
log-determinant, slightly biased) estimate of the log marginal likelihood and of its gradient; a
fresh subset (and fresh augmentation noise) is drawn every hyperstep. ``marglik_batches = None``
uses the whole training set (deterministic up to the augmentation noise). The subset and its
rescaling: :class:`marglik.tuning.estimator.MarglikSubset`; the learning-rate schedules and when
an update is due: :mod:`marglik.tuning.schedules`; the random streams: :mod:`marglik.tuning.seeds`.

Selection. The stochastic hyperstep estimate drives the ascent only. After each update the
*selection value* -- the same Laplace log marginal likelihood, no gradient, at the updated
hyperparameters, on fixed data (``hyper.selection``: the whole training set, or a subset drawn
once from the seed; one fixed augmentation-noise draw; :class:`marglik.tuning.estimator.SelectionSet`,
:class:`marglik.tuning.parts.Selection`) -- picks the best epoch and is the reported
``log_marglik``. It changes only when the weights or the hyperparameters do. ``history.csv``
keeps both (``log_marglik``: selection value; ``hyperstep_log_marglik``: the last hyperstep's
estimate). ``n_laplace_fits`` in the summary counts the hyperstep fits only.

With augmentation on, ``eta`` moves the data, so every hyperstep refits the Laplace
approximation with ``differentiable=True`` (the gradient reaches ``eta`` through the K-FAC
factors and the log-likelihood term). Without augmentation one fit serves all ``K`` steps of an
update (the fit does not depend on the prior precision).

Safety: a non-finite training loss or log marginal likelihood rolls the run back to the last
good state (model, optimizers, hyperparameters and history as at the end of the previous epoch),
scales the offending learning rate by ``trainer.rollback_lr_factor`` (default 0.5; MAP lr for the
loss, hyper lrs for the marglik), records the
event in ``summary.json['rollback_events']`` and the log, and retries the epoch. The random streams are
*not* rewound, so the retry sees a fresh data order, marglik subset and augmentation noise (a
failure tied to one unlucky draw does not repeat deterministically). After
``trainer.max_rollbacks`` rollbacks it raises :class:`NonFiniteError`.

Checkpoints: ``<run_dir>/checkpoints/last.ckpt`` after every epoch (resume point; the one it
replaces is kept as ``prev.ckpt``, the fallback if ``last.ckpt`` is unreadable) and
``best.ckpt`` whenever the selection value improves (the model the summary reports by default,
``trainer.final_model=best``, as in Algorithm 1). A resumed run continues in its run directory
(``history.csv`` rewritten from the checkpoint, the same W&B run); see :meth:`MarglikTuner.fit`.

Data parallel (``torchrun``): see :mod:`marglik.tuning.distributed`.

Where the code is: this module holds :class:`MarglikTuner` (a config -> :func:`build_parts
<marglik.tuning.build.build_parts>` -> :class:`~marglik.tuning.trainer.Trainer`, resuming from a
checkpoint of the same config) and :func:`tune`; the driver that sequences epochs is
:mod:`marglik.tuning.trainer`, the MAP epoch, the hypersteps, the selection value and the
evaluation are parts in :mod:`marglik.tuning.parts`, the summary is :mod:`marglik.tuning.finalize`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from . import run_lock
from .build import as_config, build_parts, setup_runtime
from .config import Config
from .estimator import SelectionSet
from .parts import LaplaceFactory, TensorData
from .trainer import Callback, NonFiniteError, Trainer

__all__ = ["MarglikTuner", "NonFiniteError", "tune"]


class MarglikTuner(Trainer):
    """One tuning run of a classifier from a config. ``MarglikTuner(cfg, run_dir).fit()`` trains,
    tunes, evaluates and writes ``summary.json`` (schema: :class:`marglik.tuning.reporting.RunSummary`),
    ``history.csv``, ``curves.png`` and ``checkpoints/`` into ``run_dir``.

    Args:
        cfg: a :class:`Config` (or a nested dict for :meth:`Config.from_dict`).
        run_dir: output directory (created).
        callbacks: called as ``cb(tuner, history_row)`` after every completed (and checkpointed)
            epoch; an exception raised there interrupts the run (the checkpoint is already saved).
        datasets: optional ``(train, test, info)`` as returned by :func:`marglik.data.load_dataset`
            (default: loaded from ``cfg.data``).
        model: optional network instead of ``cfg.model`` (:func:`marglik.tuning.build.build_parts`).
        data: optional :class:`~marglik.tuning.parts.TensorData` instead of ``cfg.data``.
        laplace_factory: optional Laplace factory instead of ``cfg.curvature``'s.

    Raises:
        UserError: every cause the user can fix, as one line (:mod:`marglik.errors`):
            :class:`ConfigError` (a bad configuration, a device this machine lacks, a batch that gives
            some ``torchrun`` rank no example, a peer backend under ``torchrun``),
            :class:`~marglik.tuning.backends.BackendUnsupportedError` (a peer cannot run the model),
            :class:`~marglik.tuning.checkpoint.CheckpointError` (no readable checkpoint where
            ``trainer.resume`` names one, or one from another configuration),
            :class:`~marglik.errors.DataUnavailableError` (data files missing or not downloadable).
        PermissionError: the run or checkpoint directory is not writable.
    """

    def __init__(
        self,
        cfg: Union[Config, Dict[str, Any]],
        run_dir: Union[str, Path],
        callbacks: Sequence[Callback] = (),
        datasets: Optional[Tuple[Any, Any, Dict[str, Any]]] = None,
        *,
        model: Optional[nn.Module] = None,
        data: Optional[TensorData] = None,
        laplace_factory: Optional[LaplaceFactory] = None,
    ) -> None:
        self.cfg = as_config(cfg)
        dist, device = setup_runtime(self.cfg)
        made = _missing_folders(Path(run_dir)) if dist.is_main else []
        lock = None
        try:
            if dist.is_main:  # fail before any data is loaded, naming the folder; one process per run directory
                lock = run_lock.acquire(run_dir)
                ckpt.check_writable(Path(run_dir) / ckpt.CKPT_DIR, "checkpoint directory")
            with warnings.catch_warnings(record=True) as caught:  # building's warnings join the run's record
                warnings.filterwarnings("default", module=r"marglik\.")
                self._start(run_dir, callbacks, dist, device, model=model, data=data,
                            laplace_factory=laplace_factory, datasets=datasets)
            for w in caught:
                self._warning(w.message, w.category, w.filename, w.lineno)
        except BaseException:  # a failed start leaves no run folder behind (only folders it made, if empty)
            for held in (getattr(self, "_lock", None), lock):  # the driver's (if it was made), then ours
                if held is not None:
                    held.release()
            self._lock = None
            _remove_empty(made)
            raise
        if lock is not None:
            lock.release()  # the driver holds it now (re-entrant)

    def _start(self, run_dir: Union[str, Path], callbacks: Sequence[Callback], dist: Any, device: torch.device,
               **build: Any) -> None:
        """Build the parts and the driver, then resume from the checkpoint ``trainer.resume`` finds."""
        run_dir = Path(dist.broadcast_object(str(run_dir)))
        parts = build_parts(self.cfg, runtime=(dist, device), **build)
        super().__init__(parts, run_dir, callbacks)
        # rank 0 reads the checkpoint (falling back to prev.ckpt if last.ckpt is unreadable) and
        # sends it to the other ranks, which need no access to the run directory
        t = self.cfg.trainer
        state, path = (ckpt.load_resume_state(t.resume, self.run_dir, self._report, damaged=self.damaged_checkpoints)
                       if self.is_main else (None, None))
        state, path = self.dist.broadcast_object((state, path))
        if state is not None:
            diff = self.cfg.resume_diff(state["config"])
            if diff:
                raise ckpt.ResumeMismatchError(path, diff)
            before = state["config"]["trainer"]["epochs"]
            if before != t.epochs:
                self._report(
                    f"trainer.epochs changed from {before} to {t.epochs} since the checkpoint: "
                    + (f"extending the run by {t.epochs - state['epoch']} epochs"
                       if t.epochs > state["epoch"] else "nothing left to train")
                    + ("; the cosine lr schedule is stretched to the new length" if t.schedule == "cosine" else "")
                )
            self.resume(state, path)

    # ------------------------------------------------------------------ the parts, by their old names
    @property
    def model(self) -> nn.Module:
        """The network."""
        return self.parts.model

    @property
    def device(self) -> torch.device:
        """Where the model and data live."""
        return self.parts.device

    @property
    def info(self) -> Dict[str, Any]:
        """The data's ``info`` (``num_classes``, ``in_channels``, ``image_size``)."""
        return self.parts.data.info

    @property
    def X(self) -> Tensor:
        """Training inputs."""
        return self.parts.data.X

    @property
    def y(self) -> Tensor:
        """Training labels."""
        return self.parts.data.y

    @property
    def X_test(self) -> Tensor:
        """Test inputs."""
        return self.parts.data.X_test

    @property
    def y_test(self) -> Tensor:
        """Test labels."""
        return self.parts.data.y_test

    @property
    def N(self) -> int:
        """Training examples."""
        return self.parts.data.N

    @property
    def params(self) -> List[Tensor]:
        """The trainable parameters."""
        return self.parts.prior.params

    @property
    def aug(self) -> Any:
        """The training augmentation (:class:`marglik.AffineAugmentation`, holds ``eta``)."""
        return self.parts.augmenter.aug

    @property
    def aug_on(self) -> bool:
        """Whether the augmentation is learned."""
        return self.parts.augmenter.enabled

    @property
    def log_prior(self) -> nn.Parameter:
        """``log delta``."""
        return self.parts.prior.log_prior

    @property
    def generators(self) -> Dict[str, torch.Generator]:
        """The run's named random streams."""
        return self.parts.streams.generators

    @property
    def map_opt(self) -> torch.optim.Optimizer:
        """The optimizer of the weights."""
        return self.parts.map_step.optimizer

    @property
    def hyper_opt(self) -> torch.optim.Optimizer:
        """The optimizer of ``log delta`` and ``eta``."""
        return self.parts.hyper_step.optimizer

    @property
    def lr_scale(self) -> float:
        """The rollbacks' factor on the MAP lr."""
        return self.parts.map_step.lr_scale

    @property
    def hyper_lr_scale(self) -> float:
        """The rollbacks' factor on the hyper lrs."""
        return self.parts.hyper_step.lr_scale

    @property
    def global_step(self) -> int:
        """MAP steps taken."""
        return self.parts.map_step.global_step

    @property
    def best(self) -> Optional[Dict[str, Any]]:
        """The best selection value's state, or ``None``."""
        return self.parts.selection.best

    @property
    def last_log_marglik(self) -> float:
        """The last selection value (``nan`` before the first update)."""
        return self.parts.selection.last_log_marglik

    @property
    def marglik_subset(self) -> Any:
        """The hyperstep's estimator (:class:`~marglik.tuning.estimator.MarglikSubset`)."""
        return self.parts.hyper_step.estimator

    @property
    def selection(self) -> SelectionSet:
        """The selection value's data (settable, e.g. to score a finished run on other data)."""
        return self.parts.selection.estimator

    @selection.setter
    def selection(self, value: SelectionSet) -> None:
        self.parts.selection.estimator = value

    @property
    def timing(self) -> Dict[str, Any]:
        """The run's timings: ``elapsed``, ``segments``, ``marglik_step_seconds``,
        ``cached_step_seconds``, ``n_fits``, ``selection_seconds`` (the parts' own lists)."""
        h = self.parts.hyper_step
        return {"elapsed": self.elapsed, "segments": self.segments, "marglik_step_seconds": h.step_seconds,
                "cached_step_seconds": h.cached_step_seconds, "n_fits": h.n_fits,
                "selection_seconds": self.parts.selection.seconds}

    def prior_precision(self) -> Tensor:
        """The current prior precision ``exp(log delta)`` (0-d, or ``(L,)`` layerwise)."""
        return self.parts.prior.precision()

    def prior_precision_by_name(self) -> Dict[str, float]:
        """Returns: ``{parameter name: precision}``, or ``{"all": precision}`` (scalar)."""
        return self.parts.prior.by_name()

    def map_loss(self, x: Tensor, y: Tensor, n_global: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """The MAP loss of one batch (:meth:`marglik.tuning.parts.MapStep.loss`)."""
        return self.parts.map_step.loss(x, y, n_global=n_global)

    def make_laplace(self, differentiable: Optional[bool] = None) -> Any:
        """An unfitted Laplace approximation at the current prior (:meth:`~marglik.tuning.parts.LaplaceMarglik.make`)."""
        return self.parts.laplace.make(differentiable)

    def fit_laplace(self, data: List[Tuple[Tensor, Tensor]], differentiable: Optional[bool] = None,
                    estimator: Any = None) -> Any:
        """A Laplace fit at the current weights (default rescaling: the hyperstep's subset)."""
        return self.parts.laplace.fit(data, estimator or self.marglik_subset, differentiable)

    def log_marglik(self, la: Any) -> Tensor:
        """The log marginal likelihood of a fit at the current prior."""
        return self.parts.laplace.log_marglik(la)

    def selection_log_marglik(self, la: Any = None) -> Tensor:
        """The selection value at the current weights and hyperparameters (:meth:`~marglik.tuning.parts.Selection.value`)."""
        return self.parts.selection.value(la)

    def _hyper_update(self) -> Dict[str, float]:
        """One marglik update (hypersteps and selection value), as an epoch runs it."""
        return self._marglik_update()


def _missing_folders(path: Path) -> List[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    out = []
    while not path.exists() and path.parent != path:
        out.append(path)
        path = path.parent
    return out


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a failed start made, deepest first, while they hold no file."""
    for folder in folders:
        if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def tune(cfg: Union[Config, Dict[str, Any]], run_dir: Union[str, Path], **kwargs: Any) -> Dict[str, Any]:
    """Run one tuning run: ``MarglikTuner(cfg, run_dir, **kwargs).fit()``.

    Args:
        cfg: a :class:`Config`, or a nested dict for :meth:`Config.from_dict`.
        run_dir: output directory (created; a resumable run continues in it).
        **kwargs: ``callbacks`` / ``datasets`` / ``model`` / ``data`` / ``laplace_factory`` of
            :class:`MarglikTuner`.

    Returns:
        The run's summary (the fields of :class:`marglik.tuning.reporting.RunSummary`).

    Raises:
        NonFiniteError: see :meth:`Trainer.fit`; construction errors as :class:`MarglikTuner`.
    """
    return MarglikTuner(cfg, run_dir, **kwargs).fit()
