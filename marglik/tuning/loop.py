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
:meth:`MarglikTuner.selection_log_marglik`) -- picks the best epoch and is the reported
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
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import AffineAugmentation
from ..data import load_dataset
from ..errors import UserError
from ..models import get_model
from . import checkpoint as ckpt
from .backends import build_laplace, check_backend_runs, resolved_separate_bias
from .config import Config, ConfigError
from .device import resolve_device
from .diagnosis import run_warnings
from .distributed import DistContext
from .estimator import MarglikSubset, SelectionSet
from .reporting import plot_curves, summary_record, write_history, write_json
from .schedules import hyper_lr_factor, map_lr, marglik_update_due
from .seeds import Stream, run_generators, seed_everything, stream_generator
from .wandb_logger import WandbLogger

log = logging.getLogger("marglik.tuning")

Callback = Callable[["MarglikTuner", Dict[str, Any]], None]


class NonFiniteError(UserError, RuntimeError):
    """Raised when a run keeps producing non-finite values after ``trainer.max_rollbacks`` rollbacks
    (one line: what, where, and which learning rates to lower)."""


class _RolledBack(Exception):
    """The epoch in flight was rolled back (state restored, lr scaled, event recorded): retry it.

    Raised by :meth:`MarglikTuner._rollback`, caught by :meth:`MarglikTuner.fit` only."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MarglikTuner:
    """One tuning run of a classifier. ``MarglikTuner(cfg, run_dir).fit()`` trains, tunes,
    evaluates and writes ``summary.json`` (schema: :class:`marglik.tuning.reporting.RunSummary`),
    ``history.csv``, ``curves.png`` and ``checkpoints/`` into ``run_dir``.

    Args:
        cfg: a :class:`Config` (or a nested dict for :meth:`Config.from_dict`).
        run_dir: output directory (created).
        callbacks: called as ``cb(tuner, history_row)`` after every completed (and checkpointed)
            epoch; an exception raised there interrupts the run (the checkpoint is already saved).
        datasets: optional ``(train, test, info)`` as returned by :func:`marglik.data.load_dataset`
            (default: loaded from ``cfg.data``).

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
    ) -> None:
        self.cfg = cfg if isinstance(cfg, Config) else Config.from_dict(cfg)
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        c = self.cfg
        if c.trainer.num_threads:
            torch.set_num_threads(int(c.trainer.num_threads))
        self.dist = DistContext.setup(c.trainer.device)
        self.is_main = self.dist.is_main  # rank 0 alone writes files, checkpoints and W&B
        self.device = self.dist.device(resolve_device(c.trainer.device))
        if self.is_main:  # fail before any training, naming the folder
            ckpt.check_writable(self.run_dir, "run directory")
            ckpt.check_writable(self.run_dir / ckpt.CKPT_DIR, "checkpoint directory")
        self.run_dir = Path(self.dist.broadcast_object(str(self.run_dir)))

        d = c.data
        train, test, info = datasets or load_dataset(
            d.name, root=d.root, download=d.download, train_size=d.train_size, rotation=d.rotation,
            translation=d.translation, upsample=d.upsample, seed=d.seed,
        )
        self.info = info
        self.X, self.y = (t.to(self.device) for t in train.tensors)
        self.X_test, self.y_test = (t.to(self.device) for t in test.tensors)
        self.N = len(self.X)

        seed_everything(c.trainer.seed)
        try:
            self.model = get_model(
                c.model.name, info["in_channels"], info["num_classes"], info["image_size"], **c.model.kwargs
            ).to(self.device)
        except (ValueError, AssertionError) as e:  # options that do not fit the data, e.g. a patch size
            size = info["image_size"]
            raise ConfigError("model", c.model.name, str(e) or type(e).__name__,
                              f"options of model {c.model.name} that fit {size}x{size} images") from e
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        check_backend_runs(c.curvature, self.model, (self.X[:2], self.y[:2]))  # a peer fails here, not mid-run
        if self.dist.world_size > 1 and c.curvature.backend != "marglik":
            raise ConfigError("curvature.backend", c.curvature.backend, "laplace-torch's peer backends do not "
                              "all-reduce their curvature over torchrun ranks", "marglik under torchrun (or run the "
                              "peer in one process)")
        self.aug_on = bool(c.hyper.augmentation)
        self.aug = AffineAugmentation(c.hyper.n_samples, generators=c.hyper.generators).to(self.device)
        self.aug_test = AffineAugmentation(
            c.hyper.n_samples_test or c.hyper.n_samples, generators=c.hyper.generators
        ).to(self.device)
        n_prior = 1 if c.hyper.prior_structure == "scalar" else len(self.params)
        self.log_prior = nn.Parameter(
            torch.full((n_prior,), math.log(c.hyper.prior_prec_init), device=self.device)
        )

        t = c.trainer
        if t.optimizer == "adam":
            self.map_opt: torch.optim.Optimizer = torch.optim.Adam(self.params, lr=t.lr)
        else:
            self.map_opt = torch.optim.SGD(self.params, lr=t.lr, momentum=t.momentum)
        groups = [{"params": [self.log_prior], "lr": c.hyper.lr, "base_lr": c.hyper.lr}]
        if self.aug_on:
            groups.append({"params": [self.aug.eta], "lr": c.hyper.aug_lr, "base_lr": c.hyper.aug_lr})
        self.hyper_opt = torch.optim.Adam(groups)

        self.generators = run_generators(c.trainer.seed)
        self.marglik_subset = MarglikSubset.from_config(c, self.N)
        self.selection = SelectionSet.from_config(c, self.N)
        self.batches_per_epoch = math.ceil(self.N / t.batch_size)
        if self.dist.enabled:
            self._check_shards()

        # run state (everything below is in the checkpoint)
        self.epoch = 0
        self.global_step = 0
        self.lr_scale = 1.0
        self.hyper_lr_scale = 1.0
        self.history: List[Dict[str, Any]] = []
        self.events: List[Dict[str, Any]] = []
        self.best: Optional[Dict[str, Any]] = None
        self.timing = {"elapsed": 0.0, "marglik_step_seconds": [], "cached_step_seconds": [], "n_fits": 0,
                       "selection_seconds": []}
        self.wandb_id: Optional[str] = None
        self.last_log_marglik = float("nan")

        self.resumed_from: Optional[Path] = None
        self._saved_ckpt: Optional[Tuple[Path, int]] = None  # newest checkpoint on disk, its epoch
        # rank 0 reads the checkpoint (falling back to prev.ckpt if last.ckpt is unreadable) and
        # sends it to the other ranks, which need no access to the run directory
        state, path = ckpt.load_resume_state(t.resume, self.run_dir, self._report) if self.is_main else (None, None)
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
            self.load_state_dict(state)
            self.timing["segments"] = self.timing.get("segments", 1) + 1  # this process continues the run
            self.resumed_from = Path(path)
            self._saved_ckpt = (self.resumed_from, self.epoch)
        self._snapshot = self.state_dict()
        self.net: nn.Module = self.model  # what the MAP steps call: the model, or its DDP wrapper
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids, output_device=ids[0] if ids else None)

    def _check_shards(self) -> None:
        """Every global batch must give each rank at least one example."""
        c, k, sub = self.cfg, self.dist.world_size, self.marglik_subset
        sizes = {"trainer.batch_size": (c.trainer.batch_size, self.N % c.trainer.batch_size),
                 "hyper.marglik_batch_size": (sub.batch_size, sub.size % sub.batch_size)}
        for key, (full, rest) in sizes.items():
            if full < k or 0 < rest < k:
                fix = (f"a batch size >= {k} whose last batch ({self.N} mod the batch size) is 0 or >= {k}"
                       if self.N >= k else f"more training examples than the {k} ranks (data.train_size)")
                raise ConfigError(key, full, f"with {self.N} training examples a batch of {min(full, rest or full)} "
                                  f"is split over world_size={k} ranks and gives some rank no example",
                                  f"{fix}, or fewer ranks (torchrun --nproc_per_node)")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything the run depends on (see :mod:`marglik.tuning.checkpoint`).

        Returns:
            The run state (weights, hyperparameters, optimizers, RNG streams, history, best
            checkpoint, timing, config), tensors detached and cloned.
        """
        return ckpt.detach_copy({
            "version": 1,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "eta": self.aug.eta,
            "log_prior": self.log_prior,
            "map_opt": self.map_opt.state_dict(),
            "hyper_opt": self.hyper_opt.state_dict(),
            "lr_scale": self.lr_scale,
            "hyper_lr_scale": self.hyper_lr_scale,
            "rng": ckpt.rng_state(self.generators),
            "history": self.history,
            "events": self.events,
            "best": self.best,
            "timing": self.timing,
            "last_log_marglik": self.last_log_marglik,
            "wandb_id": self.wandb_id,
            "config": self.cfg.to_dict(),
        })

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a run state (the inverse of :meth:`state_dict`).

        Args:
            state: a :meth:`state_dict` (e.g. a checkpoint); copied, not aliased.
        """
        state = ckpt.detach_copy(state)
        self.epoch = state["epoch"]
        self.global_step = state["global_step"]
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            self.aug.eta.copy_(state["eta"])
            self.log_prior.copy_(state["log_prior"])
        self.map_opt.load_state_dict(state["map_opt"])
        self.hyper_opt.load_state_dict(state["hyper_opt"])
        self.lr_scale = state["lr_scale"]
        self.hyper_lr_scale = state["hyper_lr_scale"]
        ckpt.set_rng_state(state["rng"], self.generators)
        self.history = state["history"]
        self.events = state["events"]
        self.best = state["best"]
        self.timing = state["timing"]
        self.last_log_marglik = state["last_log_marglik"]
        self.wandb_id = state.get("wandb_id")

    def _rollback(self, kind: str, value: Any, where: str) -> NoReturn:
        """Restore the last good state after a non-finite ``kind`` ('loss' or 'marglik') and raise
        :class:`_RolledBack` (the epoch is retried), or :class:`NonFiniteError` past
        ``trainer.max_rollbacks``."""
        events = self.events + [{
            "epoch": self.epoch + 1, "kind": kind, "value": str(value), "where": where,
            "action": "restored end of epoch %d; %s x %g" % (
                self.epoch, "MAP lr" if kind == "loss" else "hyper lrs", self.cfg.trainer.rollback_lr_factor),
        }]
        if len(events) > self.cfg.trainer.max_rollbacks:
            lrs = "trainer.lr" if kind == "loss" else "hyper.lr / hyper.aug_lr (or trainer.lr if the weights diverge)"
            raise NonFiniteError(
                f"non-finite {kind} ({value}) at epoch {self.epoch + 1} ({where}) after "
                f"{len(events) - 1} rollbacks (trainer.max_rollbacks={self.cfg.trainer.max_rollbacks}): the run "
                f"diverges; lower {lrs}, or raise trainer.max_rollbacks"
            )
        lr_scale, hyper_scale = self.lr_scale, self.hyper_lr_scale
        rng = ckpt.rng_state(self.generators)
        self.load_state_dict(self._snapshot)
        ckpt.set_rng_state(rng, self.generators)  # not rewound: the retry draws fresh batches / noise
        self.events = events
        factor = self.cfg.trainer.rollback_lr_factor
        if kind == "loss":
            self.lr_scale = lr_scale * factor
        else:
            self.hyper_lr_scale = hyper_scale * factor
        self._report(
            f"non-finite {kind} ({value}) in epoch {self.epoch + 1} ({where}): rolled back to the end of "
            f"epoch {self.epoch}, {'MAP' if kind == 'loss' else 'hyperparameter'} learning rate x {factor:g} "
            f"(rollback {len(events)}/{self.cfg.trainer.max_rollbacks})"
        )
        raise _RolledBack

    def _report(self, msg: str) -> None:
        if not self.is_main:  # one voice per job: rank 0
            return
        if logging.getLogger().handlers or log.handlers:  # e.g. Hydra's console + file handlers
            log.warning(msg)
        else:  # plain Python use: print above the progress bar
            from tqdm import tqdm

            tqdm.write(f"[marglik {self.run_dir.name}] {msg}", file=sys.stderr)

    # ------------------------------------------------------------------ pieces
    def prior_precision_by_name(self) -> Dict[str, float]:
        """The current prior precisions by parameter name.

        Returns:
            ``{parameter name: precision}`` in the order of the trainable parameters
            (layerwise), or ``{"all": precision}`` (scalar).
        """
        prec = self.log_prior.detach().exp().tolist()
        if len(prec) == 1 and self.cfg.hyper.prior_structure == "scalar":
            return {"all": prec[0]}
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        return dict(zip(names, prec))

    def prior_precision(self) -> Tensor:
        """The current prior precision ``exp(log delta)`` (differentiable w.r.t. ``log delta``).

        Returns:
            A 0-d tensor (``hyper.prior_structure=scalar``) or one entry per trainable parameter
            tensor, shape ``(L,)`` (layerwise).
        """
        prec = self.log_prior.exp()
        return prec.squeeze(0) if self.cfg.hyper.prior_structure == "scalar" else prec

    def _set_lrs(self) -> float:
        """Set the MAP and hyper learning rates (schedules times rollback scales); returns the MAP lr."""
        t = self.cfg.trainer
        lr = map_lr(t, self.global_step, self.batches_per_epoch) * self.lr_scale
        for g in self.map_opt.param_groups:
            g["lr"] = lr
        factor = self.hyper_lr_scale * hyper_lr_factor(t, self.cfg.hyper, self.epoch)
        for g in self.hyper_opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        return lr

    def _augment(
        self, x: Tensor, aug: Optional[AffineAugmentation] = None, generator=None, shard: bool = False
    ) -> Tensor:
        """Augmented copies ``(n, S, C, H, W)`` of ``x (n, C, H, W)`` (``x`` itself without augmentation).

        ``shard=True`` (data parallel): ``x`` is a global batch; the noise is drawn for all of it,
        as a single process would, and this rank's shard of the augmented batch is returned.
        """
        gen = generator if generator is not None else self.generators["aug"]
        if shard and self.dist.enabled:
            part = self.dist.shard(len(x))
            if not self.aug_on:
                return x[part]
            aug = aug or self.aug
            return aug(x[part], eps=aug.sample_eps(len(x), gen)[part])
        if not self.aug_on:
            return x
        aug = aug or self.aug
        return aug(x, generator=gen)

    def map_loss(self, x: Tensor, y: Tensor, n_global: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Negative log joint / N on one batch (cross-entropy plus the prior term).

        Data parallel: ``x``, ``y`` are this rank's shard of a global batch of ``n_global``
        examples; ``nll`` is then the shard's share of the global mean (its summed NLL /
        ``n_global``) and ``loss`` is ``world_size * nll`` plus the prior term, whose average
        over ranks (DDP's gradient reduction) is the global batch's loss.

        Args:
            x: inputs ``(n, C, H, W)``, or augmented copies ``(n, S, C, H, W)``.
            y: integer labels ``(n,)``.
            n_global: the global batch size when ``x`` is one rank's shard; ``None`` otherwise.

        Returns:
            ``(loss, nll, logits)``: the 0-d loss to back-propagate, the mean NLL (0-d) and the
            logits ``(n, num_classes)``.
        """
        out = self.net(x)
        if n_global is None:
            nll = F.cross_entropy(out, y)
            return nll + self._prior_term(), nll, out
        nll = F.cross_entropy(out, y, reduction="sum") / n_global
        return nll * self.dist.world_size + self._prior_term(), nll, out

    def _prior_term(self) -> Tensor:
        """``delta ||theta||^2 / (2 N)``: the negative log prior divided by ``N`` (no gradient to ``delta``)."""
        delta = self.log_prior.detach().exp()
        if delta.numel() == 1:
            reg = delta[0] * sum((p * p).sum() for p in self.params)
        else:
            reg = sum(d * (p * p).sum() for d, p in zip(delta, self.params))
        return 0.5 * reg / self.N

    def _marglik_data(self) -> List[Tuple[Tensor, Tensor]]:
        """Batches for one Laplace fit (:class:`MarglikSubset`: all data, or ``marglik_batches``
        random batches); augmented with the current ``eta`` (differentiable w.r.t. ``eta``)."""
        batches = self.marglik_subset.index_batches(self.generators["hyper"], self.device)
        if self.dist.enabled:  # this rank's shard of every batch; the fit all-reduces the sums
            return [(self._augment(self.X[i], shard=True), self.y[i][self.dist.shard(len(i))]) for i in batches]
        return [(self._augment(self.X[i]), self.y[i]) for i in batches]

    def make_laplace(self, differentiable: Optional[bool] = None):
        """An unfitted Laplace approximation of the model at the current prior precision.

        Args:
            differentiable: factors with an autograd graph (default: when augmentation is learned).

        Returns:
            marglik's :class:`KronLaplace`, or a laplace-torch :class:`PeerLaplace`
            (``curvature.backend``, see :mod:`marglik.tuning.backends`).
        """
        diff = self.aug_on if differentiable is None else differentiable
        return build_laplace(self.cfg.curvature, self.model, self.prior_precision().detach(), diff)

    def fit_laplace(self, data: List[Tuple[Tensor, Tensor]], differentiable: Optional[bool] = None,
                    estimator: Optional[Union[MarglikSubset, SelectionSet]] = None):
        """Fit a fresh Laplace approximation at the current weights.

        Args:
            data: ``(X_aug, y)`` batches (this rank's shards under ``torchrun``); a subset or a
                shard is rescaled to ``N`` (:meth:`MarglikSubset.num_data`).
            differentiable: as :meth:`make_laplace`.
            estimator: whose ``num_data`` rescaling applies (default: the hyperstep's subset).

        Returns:
            The fitted approximation (:meth:`make_laplace`).

        Raises:
            RuntimeError: the approximation does not cover every trainable parameter tensor.
        """
        la = self.make_laplace(differentiable)
        if la.n_layers != len(self.params):
            raise RuntimeError(
                f"the Laplace approximation covers {la.n_layers} parameter tensors but the model trains "
                f"{len(self.params)}: every trainable module must be covered by the K-FAC engine"
            )
        seen = sum(len(yb) for _, yb in data)
        la.fit(data, num_data=(estimator or self.marglik_subset).num_data(seen, self.dist.enabled))
        return la

    def log_marglik(self, la) -> Tensor:
        """The Laplace log marginal likelihood at the current hyperparameters.

        Args:
            la: a fitted approximation (:meth:`fit_laplace`).

        Returns:
            A 0-d tensor, differentiable w.r.t. ``log delta`` (and ``eta`` through a
            differentiable fit).
        """
        return la.log_marginal_likelihood(prior_precision=self.prior_precision())

    def _selection_data(self) -> List[Tuple[Tensor, Tensor]]:
        """The fixed batches of the selection value (:class:`SelectionSet`), augmented with the
        current ``eta`` and the same noise draw every time; this rank's shards under ``torchrun``."""
        gen = self.selection.noise_generator()
        with torch.no_grad():
            return [(self._augment(self.X[i], generator=gen, shard=True), self.y[i][self.dist.shard(len(i))])
                    for i in self.selection.index_batches(self.device)]

    def selection_log_marglik(self, la=None) -> Tensor:
        """The selection value: the Laplace log marginal likelihood of the current weights and
        hyperparameters on the fixed selection data (``hyper.selection``, :class:`SelectionSet`).

        No gradient is kept. The global RNGs are forked and seeded from the run's seed for the
        fit, so an MC Fisher draws the same labels every time and the run's own random streams are
        not advanced: the value changes only when the weights or the hyperparameters do. Under
        ``torchrun`` each rank fits its shard of every batch and the fit all-reduces the sums (as
        for the hyperstep), so every rank holds the global value.

        Args:
            la: a fitted approximation on exactly these data to reuse (the hyperstep's fit when it
                saw the whole training set without augmentation noise); ``None``: fit one.

        Returns:
            A 0-d tensor.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            if la is None:
                device = self.device
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(self.selection.noise_generator().initial_seed())
                    la = self.fit_laplace(self._selection_data(), differentiable=False, estimator=self.selection)
            with torch.no_grad():
                return self.log_marglik(la).detach()
        finally:
            self.model.train(was_training)

    def _selection_reuses_fit(self) -> bool:
        """Whether the hyperstep's last fit is on the selection data: the whole set in order, no
        augmentation noise, no MC labels (then the selection value needs no fit of its own)."""
        c = self.cfg
        return (not self.aug_on and self.marglik_subset.n_batches is None and self.selection.size >= self.N
                and c.curvature.fisher_type != "mc")

    # ------------------------------------------------------------------ epoch
    def _map_epoch(self) -> Dict[str, float]:
        """One epoch of MAP steps; returns its training metrics (rolls back on a non-finite loss)."""
        self.model.train()
        t = self.cfg.trainer
        perm = torch.randperm(self.N, generator=self.generators["data"]).to(self.device)
        tot_loss = tot_nll = correct = 0.0
        lr = float("nan")
        for b, idx in enumerate(perm.split(t.batch_size)):
            n = len(idx)
            if self.dist.enabled:
                part = self.dist.shard(n)
                xb, yb = self.X[idx], self.y[idx][part]
                with torch.no_grad():
                    xb = self._augment(xb, shard=True)
            else:
                xb, yb = self.X[idx], self.y[idx]
                with torch.no_grad():
                    xb = self._augment(xb)
            lr = self._set_lrs()
            loss, nll, out = self.map_loss(xb, yb, n_global=n) if self.dist.enabled else self.map_loss(xb, yb)
            hits = (out.argmax(-1) == yb).sum()
            if self.dist.enabled:  # global batch NLL and hits, so every rank takes the same decision
                bad = (~torch.isfinite(loss.detach())).double()
                stats = self.dist.sum_(torch.stack([nll.detach().double(), hits.double(), bad]))
                nll_value, hits_value = stats[0].item(), stats[1].item()
                loss_value = (stats[0] + self._prior_term().detach().double()).item() if stats[2] == 0 else math.nan
            else:
                loss_value, nll_value, hits_value = loss.item(), nll.item(), hits.item()
            if not math.isfinite(loss_value):
                if self.dist.enabled:  # DDP needs the backward of every forward; the grads are discarded
                    loss.backward()
                self._rollback("loss", loss_value, f"MAP step, batch {b + 1}/{self.batches_per_epoch}")
            self.map_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.map_opt.step()
            self.global_step += 1
            tot_loss += loss_value * n
            tot_nll += nll_value * n
            correct += hits_value
        return {"lr": lr, "train_loss": tot_loss / self.N, "train_nll": tot_nll / self.N, "train_acc": correct / self.N}

    def _hyper_update(self) -> Dict[str, float]:
        """``hyper.steps`` hypersteps, then the selection value at the updated hyperparameters
        (rolls back on a non-finite value or gradient); keeps the best-selection-value state.

        Returns:
            ``log_marglik`` (the selection value), ``hyperstep_log_marglik`` (the last hyperstep's
            estimate, before its step) and ``hyperstep_log_marglik_first``.
        """
        h = self.cfg.hyper
        self._set_lrs()
        self.model.eval()
        la = None
        values = []
        pre = None
        hyper_params = [self.log_prior] + ([self.aug.eta] if self.aug_on else [])
        try:
            for k in range(h.steps):
                _sync(self.device)
                t0 = time.perf_counter()
                fitted = la is None or self.aug_on
                if not torch.isfinite(self.log_prior).all() or not torch.isfinite(self.aug.eta).all():
                    self._rollback("marglik", "non-finite hyperparameters", f"hyperstep {k + 1}/{h.steps}")
                try:
                    if fitted:
                        la = self.fit_laplace(self._marglik_data())
                        self.timing["n_fits"] += 1
                    lml = self.log_marglik(la)
                except (torch.linalg.LinAlgError, FloatingPointError) as err:  # e.g. factors overflowed to inf
                    self._rollback("marglik", f"{type(err).__name__}: {err}", f"hyperstep {k + 1}/{h.steps}")
                if not torch.isfinite(lml):
                    self._rollback("marglik", lml.item(), f"hyperstep {k + 1}/{h.steps}")
                grads = torch.autograd.grad(-lml, hyper_params, allow_unused=True)
                if self.dist.enabled and self.aug_on:
                    # eta acts through each rank's own shard: its gradient is the sum over ranks.
                    # The prior precision acts through the all-reduced factors only: same on all ranks.
                    grads = (grads[0], self.dist.sum_(torch.zeros_like(self.aug.eta) if grads[1] is None
                                                      else grads[1].detach().clone()))
                pre = (lml.item(), self.log_prior.detach().clone(), self.aug.eta.detach().clone())
                bad = [g for g in grads if g is not None and not torch.isfinite(g).all()]
                if bad:
                    self._rollback("marglik", "non-finite gradient", f"hyperstep {k + 1}/{h.steps}")
                for p, g in zip(hyper_params, grads):
                    p.grad = torch.zeros_like(p) if g is None else g
                self.hyper_opt.step()
                self.hyper_opt.zero_grad(set_to_none=True)
                if self.dist.enabled:  # identical hyperparameters on every rank, whatever the hardware
                    for p in hyper_params:
                        self.dist.broadcast_(p.data)
                _sync(self.device)
                dt = time.perf_counter() - t0
                self.timing["marglik_step_seconds" if fitted else "cached_step_seconds"].append(dt)
                values.append(pre[0])
            _sync(self.device)
            t0 = time.perf_counter()
            try:
                sel = self.selection_log_marglik(la if self._selection_reuses_fit() else None)
            except (torch.linalg.LinAlgError, FloatingPointError) as err:
                self._rollback("marglik", f"{type(err).__name__}: {err}", "selection value")
            if not torch.isfinite(sel):
                self._rollback("marglik", sel.item(), "selection value")
            _sync(self.device)
            self.timing.setdefault("selection_seconds", []).append(time.perf_counter() - t0)
        finally:
            self.model.train()
            del la
        value = pre[0]
        selected = sel.item()
        self.last_log_marglik = selected
        if self.best is None or selected > self.best["log_marglik"]:
            self.best = ckpt.detach_copy({
                "log_marglik": selected, "epoch": self.epoch + 1, "model": self.model.state_dict(),
                "log_prior": self.log_prior, "eta": self.aug.eta,
            })
            if self.is_main:
                ckpt.save({**self.best, "config": self.cfg.to_dict()}, self.run_dir / ckpt.CKPT_DIR / ckpt.BEST)
        return {"log_marglik": selected, "hyperstep_log_marglik": value, "hyperstep_log_marglik_first": values[0]}

    @torch.no_grad()
    def evaluate(self, X: Optional[Tensor] = None, y: Optional[Tensor] = None) -> Dict[str, float]:
        """Accuracy and mean NLL of the MAP invariant model (``S_test`` augmented copies with the
        current ``eta``; a fixed noise seed, so repeated evaluations agree).

        Args:
            X: inputs ``(n, C, H, W)`` (default: the test set).
            y: integer labels ``(n,)`` (default: the test labels).

        Returns:
            ``{"test_acc": accuracy, "test_nll": mean NLL}`` over all ``n`` examples (all ranks).
        """
        X = self.X_test if X is None else X
        y = self.y_test if y is None else y
        was_training = self.model.training
        self.model.eval()
        self.aug_test.eta.copy_(self.aug.eta)
        gen = stream_generator(self.cfg.trainer.seed, Stream.eval)
        nll = correct = 0.0
        bs = self.cfg.trainer.eval_batch_size
        for i in range(0, len(X), bs):
            yb = y[i : i + bs]
            if self.dist.enabled:  # each rank evaluates its shard of every batch
                xb, yb = self._augment(X[i : i + bs], self.aug_test, gen, shard=True), yb[self.dist.shard(len(yb))]
                if len(yb) == 0:
                    continue
            else:
                xb = self._augment(X[i : i + bs], self.aug_test, gen)
            out = self.model(xb)
            nll += F.cross_entropy(out, yb, reduction="sum").item()
            correct += (out.argmax(-1) == yb).sum().item()
        if self.dist.enabled:
            totals = torch.tensor([nll, correct], dtype=torch.float64, device=self.device)
            nll, correct = self.dist.sum_(totals).tolist()
        self.model.train(was_training)
        return {"test_acc": correct / len(X), "test_nll": nll / len(X)}

    def ranges(self) -> Dict[str, float]:
        """Learned augmentation ranges.

        Returns:
            ``{generator: range}``: rotation in degrees, translations in pixels, scales as
            log-factors, shear dimensionless; all zero when augmentation is off.
        """
        return self.aug.ranges(image_size=self.info["image_size"])

    def _run_epoch(self) -> Dict[str, Any]:
        """MAP steps, the marglik update when due, evaluation: the epoch's history row.

        Raises:
            _RolledBack: a non-finite value rolled the run back to the end of the previous epoch.
        """
        c = self.cfg
        _sync(self.device)
        t0 = time.perf_counter()
        train = self._map_epoch()
        row: Dict[str, Any] = {"epoch": self.epoch + 1, **train}
        log_prior_before = self.log_prior.detach().clone()
        e = self.epoch + 1
        hyper_s = 0.0
        if marglik_update_due(c.hyper, e):
            th = time.perf_counter()
            res = self._hyper_update()
            hyper_s = time.perf_counter() - th
            row["log_marglik"] = res["log_marglik"]
            row["log_marglik_per_example"] = res["log_marglik"] / self.N
            row["hyperstep_log_marglik"] = res["hyperstep_log_marglik"]
            row["hyperstep_log_marglik_per_example"] = res["hyperstep_log_marglik"] / self.N
        else:
            for key in ("log_marglik", "log_marglik_per_example", "hyperstep_log_marglik",
                        "hyperstep_log_marglik_per_example"):
                row[key] = None
        prec = self.log_prior.detach().exp()
        row.update({
            "prior_prec_mean": prec.mean().item(), "prior_prec_min": prec.min().item(),
            "prior_prec_max": prec.max().item(),
            # convergence: the largest change of a log prior precision in this epoch's update
            "log_prior_change_max": (self.log_prior.detach() - log_prior_before).abs().max().item(),
        })
        row.update({f"aug_{k}": v for k, v in self.ranges().items()})
        ev = c.trainer.eval_every
        if (ev and e % ev == 0) or e == c.trainer.epochs:
            row.update(self.evaluate())
        else:
            row.update({"test_acc": None, "test_nll": None})
        _sync(self.device)
        row["epoch_seconds"] = time.perf_counter() - t0
        row["hyper_seconds"] = hyper_s
        row["rollbacks"] = len(self.events)
        return row

    # ------------------------------------------------------------------ main
    def fit(self) -> Dict[str, Any]:
        """Run (or resume) the whole schedule, then evaluate and write the outputs; returns the summary.

        Every completed epoch is checkpointed (``last.ckpt``, the previous one kept as
        ``prev.ckpt``), then appended to ``history.csv``, then logged to W&B, so a ``kill -9``
        loses at most the epoch in flight. A resumed run rewrites ``history.csv`` from the
        checkpoint's history (no lost or duplicated epoch) and logs the checkpoint's last epoch to
        its W&B run again (same id, ``resume="allow"``), in case the kill came between the two.

        Returns:
            The summary (:meth:`finalize`; the fields of
            :class:`marglik.tuning.reporting.RunSummary`).

        Raises:
            NonFiniteError: non-finite values persist after ``trainer.max_rollbacks`` rollbacks.
        """
        c = self.cfg
        cfg_dict = c.to_dict()
        if self.wandb_id is None:  # unique per run, kept in the checkpoint: a resume continues it
            import secrets

            self.wandb_id = secrets.token_hex(4)  # not the seeded RNGs: resume stays bit-exact
        self.logger = (WandbLogger(cfg_dict, str(self.run_dir), resume_id=self.wandb_id) if self.is_main
                       else WandbLogger(cfg_dict, str(self.run_dir), mode="disabled"))
        if self.is_main:
            write_json({**cfg_dict, "data_info": self.info}, self.run_dir / "config.json")
            if self.history:
                write_history(self.history, self.run_dir / "history.csv")
        if self.resumed_from is not None:
            self._report(f"resumed from {self.resumed_from} at epoch {self.epoch}/{c.trainer.epochs}")
            if self.history:
                self._log_row(self.history[-1])
        for msg in c.warnings():  # e.g. epochs <= burn-in: say so before training starts
            self._report(msg)
        from tqdm.auto import tqdm

        pbar = tqdm(
            total=c.trainer.epochs, initial=self.epoch, disable=not (c.trainer.progress and self.is_main),
            desc=f"marglik {c.data.name} {c.curvature.approx}-{c.curvature.copies_approx or c.curvature.approx}",
            unit="ep", dynamic_ncols=True,
        )
        start = time.perf_counter()
        base_elapsed = self.timing["elapsed"]
        self._segment_start_elapsed = base_elapsed  # seconds of the run before this segment (resume)
        try:
            while self.epoch < c.trainer.epochs:
                try:
                    row = self._run_epoch()
                except _RolledBack:  # retry the epoch from the restored state
                    base_elapsed = self.timing["elapsed"]
                    start = time.perf_counter()
                    continue
                self.epoch += 1
                self.history.append(row)
                self.timing["elapsed"] = base_elapsed + time.perf_counter() - start
                self._snapshot = self.state_dict()
                if self.is_main:
                    path = self.run_dir / ckpt.CKPT_DIR / ckpt.LAST
                    ckpt.save(self._snapshot, path, keep_previous=True)
                    self._saved_ckpt = (path, self.epoch)
                    write_history(self.history, self.run_dir / "history.csv")
                self._log_row(row)
                pbar.update(1)
                post = {"loss": f"{row['train_loss']:.3f}", "acc": f"{row['train_acc']:.3f}"}
                if row.get("test_acc") is not None:
                    post["test"] = f"{row['test_acc']:.3f}"
                if math.isfinite(self.last_log_marglik):
                    post["lml/N"] = f"{self.last_log_marglik / self.N:.3f}"
                if self.aug_on:
                    post["rot"] = f"{row.get('aug_rotation', 0.0):.0f}deg"
                pbar.set_postfix(post)
                for cb in self.callbacks:
                    cb(self, row)
        except BaseException as err:
            pbar.close()
            self._report_interrupt(err)
            self._finish_logger()
            self.dist.close()
            raise
        pbar.close()
        summary = self.finalize()
        self.logger.summary(summary)
        if self.is_main:
            self.logger.save(str(self.run_dir / "curves.png"))
        self._finish_logger()
        self.dist.close()
        return summary

    def _log_row(self, row: Dict[str, Any]) -> None:
        self.logger.log({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def _finish_logger(self) -> None:
        """Close the W&B run; for an offline run, say where it is and how to upload it."""
        hint = self.logger.finish()
        if hint and self.is_main:
            print(f"marglik: {hint}", file=sys.stderr)

    def _report_interrupt(self, err: BaseException) -> None:
        """How to continue after an exception: only from a checkpoint that exists on disk. The line
        is also attached to ``err`` as ``err.resume_hint`` (the CLI prints it after a Ctrl-C)."""
        if not self.is_main:
            return
        saved = self._saved_ckpt
        if saved is not None and saved[0].is_file():
            path, epoch = saved
            how = (f"trainer.resume={self.run_dir} (continues in this run directory)"
                   if path.parent == self.run_dir / ckpt.CKPT_DIR else f"trainer.resume={path}")
            hint = f"the checkpoint {path} holds epoch {epoch}/{self.cfg.trainer.epochs}: resume with {how}"
        else:
            hint = "stopped before any checkpoint was written: nothing to resume from (a re-run starts at epoch 0)"
        self._report(hint if hint.startswith("stopped") else f"stopped; {hint}")
        try:
            err.resume_hint = hint  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - exceptions without a __dict__
            pass

    def finalize(self) -> Dict[str, Any]:
        """Evaluate the reported model and write ``summary.json``, ``history.csv``, ``curves.png``.

        Loads the best-marglik checkpoint into the model first when ``trainer.final_model=best``
        (and an update ran); only rank 0 writes.

        Returns:
            The summary, checked against :class:`marglik.tuning.reporting.RunSummary`.
        """
        c = self.cfg
        last_metrics = self.evaluate()
        last_ranges = self.ranges()
        last_prior = self.log_prior.detach().exp().tolist()
        use_best = c.trainer.final_model == "best" and self.best is not None
        if use_best:
            self.model.load_state_dict(self.best["model"])
            with torch.no_grad():
                self.aug.eta.copy_(self.best["eta"])
                self.log_prior.copy_(self.best["log_prior"])
            metrics = self.evaluate()
            lml = self.best["log_marglik"]
        else:
            metrics = last_metrics
            lml = self.last_log_marglik
        steps = self.timing["marglik_step_seconds"]
        cached = self.timing["cached_step_seconds"]
        summary = summary_record({
            "test_accuracy": metrics["test_acc"],
            "test_nll": metrics["test_nll"],
            "log_marglik": lml,
            "log_marglik_per_example": lml / self.N if lml is not None and math.isfinite(lml) else None,
            "prior_precision": self.log_prior.detach().exp().tolist(),
            "prior_precision_by_name": self.prior_precision_by_name(),
            "augmentation": self.ranges(),
            "approx": c.curvature.approx,
            "copies_approx": c.curvature.copies_approx,
            "backend": c.curvature.backend,
            "structure": c.curvature.structure,
            "seconds": self.timing["elapsed"],
            "seconds_this_segment": self.timing["elapsed"] - getattr(self, "_segment_start_elapsed", 0.0),
            "segments": self.timing.get("segments", 1),
            "seconds_per_marglik_step": float(np.mean(steps)) if steps else None,
            "seconds_per_cached_hyperstep": float(np.mean(cached)) if cached else None,
            "seconds_per_selection": (float(np.mean(self.timing["selection_seconds"]))
                                      if self.timing.get("selection_seconds") else None),
            "n_laplace_fits": self.timing["n_fits"],
            "n_hypersteps": len(steps) + len(cached),
            "marglik_updates": sum(row.get("log_marglik") is not None for row in self.history),
            "fisher_type": c.curvature.fisher_type,
            "prior_structure": c.hyper.prior_structure,
            "augmentation_learned": self.aug_on,
            "augmentation_units": {"rotation": "degrees", "translation_x": "pixels", "translation_y": "pixels",
                                   "scale_x": "log-factor", "scale_y": "log-factor", "shear": "shear factor"},
            "final_model": "best" if use_best else "last",
            "best_epoch": self.best["epoch"] if self.best else None,
            "last": {"test_accuracy": last_metrics["test_acc"], "test_nll": last_metrics["test_nll"],
                     "log_marglik": self.last_log_marglik, "augmentation": last_ranges,
                     "hyperstep_log_marglik": next((r["hyperstep_log_marglik"] for r in reversed(self.history)
                                                    if r.get("hyperstep_log_marglik") is not None), None),
                     "prior_precision": last_prior},
            "epochs": self.epoch,
            "train_size": self.N,
            "test_size": len(self.X_test),
            "data": c.data.name,
            "rotation": c.data.rotation,
            "translation": c.data.translation,
            "model": c.model.name,
            "num_params": sum(p.numel() for p in self.params),
            "seed": c.trainer.seed,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "rollbacks": len(self.events),
            "rollback_events": self.events,
            "marglik_estimator": self.marglik_subset.describe(),
            "selection_estimator": self.selection.describe(),
            "separate_bias": resolved_separate_bias(c.curvature),
            "warnings": c.warnings(),
        })
        trouble = run_warnings(summary, self.history, self.info["num_classes"])  # a run that went wrong says so
        summary["warnings"] += trouble
        for msg in trouble:
            self._report(msg)
        if not self.is_main:
            return summary
        write_json(summary, self.run_dir / "summary.json")
        write_history(self.history, self.run_dir / "history.csv")
        if self.history:
            try:
                plot_curves(
                    self.history, self.run_dir / "curves.png",
                    title=f"{c.data.name} rot={c.data.rotation:g} {c.model.name} {c.curvature.approx}-{c.curvature.copies_approx} "
                          f"aug={'on' if self.aug_on else 'off'}",
                    burn_in=c.hyper.burn_in,
                    reported_epoch=summary["best_epoch"] if use_best else self.epoch,
                    reported_label="reported (best selection value)" if use_best else "reported (last)",
                )
            except Exception as e:  # plotting must never lose a finished run
                self._report(f"could not write curves.png: {e}")
        return summary


def tune(cfg: Union[Config, Dict[str, Any]], run_dir: Union[str, Path], **kwargs: Any) -> Dict[str, Any]:
    """Run one tuning run: ``MarglikTuner(cfg, run_dir, **kwargs).fit()``.

    Args:
        cfg: a :class:`Config`, or a nested dict for :meth:`Config.from_dict`.
        run_dir: output directory (created; a resumable run continues in it).
        **kwargs: ``callbacks`` / ``datasets`` of :class:`MarglikTuner`.

    Returns:
        The run's summary (the fields of :class:`marglik.tuning.reporting.RunSummary`).

    Raises:
        NonFiniteError: see :meth:`MarglikTuner.fit`; construction errors as :class:`MarglikTuner`.
    """
    return MarglikTuner(cfg, run_dir, **kwargs).fit()
