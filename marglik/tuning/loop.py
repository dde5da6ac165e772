"""Marginal-likelihood hyperparameter tuning with learned augmentation (the outer loop).

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
uses the whole training set (deterministic up to the augmentation noise).

With augmentation on, ``eta`` moves the data, so every hyperstep refits the Laplace
approximation with ``differentiable=True`` (the gradient reaches ``eta`` through the K-FAC
factors and the log-likelihood term). Without augmentation one fit serves all ``K`` steps of an
update (the fit does not depend on the prior precision).

Safety: a non-finite training loss or log marginal likelihood rolls the run back to the last
good state (model, optimizers, hyperparameters and history as at the end of the previous epoch),
scales the offending learning rate by ``trainer.rollback_lr_factor`` (default 0.5; MAP lr for the
loss, hyper lrs for the marglik), records the
event in ``summary.json['rollbacks']`` and the log, and retries the epoch. The random streams are
*not* rewound, so the retry sees a fresh data order, marglik subset and augmentation noise (a
failure tied to one unlucky draw does not repeat deterministically). After
``trainer.max_rollbacks`` rollbacks it raises :class:`NonFiniteError`.

Checkpoints: ``<run_dir>/checkpoints/last.ckpt`` after every epoch (resume point) and
``best.ckpt`` whenever the log marglik improves (the model the summary reports by default,
``trainer.final_model=best``, as in Algorithm 1).
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import AffineAugmentation
from ..data import load_dataset
from ..models import get_model
from . import checkpoint as ckpt
from .config import Config
from .reporting import plot_curves, write_history, write_json
from .wandb_logger import WandbLogger

log = logging.getLogger("marglik.tuning")

Callback = Callable[["MarglikTuner", Dict[str, Any]], None]


class NonFiniteError(RuntimeError):
    """Raised when a run keeps producing non-finite values after ``trainer.max_rollbacks`` rollbacks."""


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={spec!r} but CUDA is not available; use trainer.device=cpu or auto")
    return dev


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MarglikTuner:
    """One tuning run. ``MarglikTuner(cfg, run_dir).fit()`` trains, tunes, evaluates and writes
    ``summary.json``, ``history.csv``, ``curves.png`` and ``checkpoints/`` into ``run_dir``.

    Args:
        cfg: a :class:`Config` (or a nested dict for :meth:`Config.from_dict`).
        run_dir: output directory (created).
        callbacks: called as ``cb(tuner, history_row)`` after every completed (and checkpointed)
            epoch; an exception raised there interrupts the run (the checkpoint is already saved).
        datasets: optional ``(train, test, info)`` as returned by :func:`marglik.data.load_dataset`
            (default: loaded from ``cfg.data``).
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.callbacks = list(callbacks)
        c = self.cfg
        if c.trainer.num_threads:
            torch.set_num_threads(int(c.trainer.num_threads))
        self.device = resolve_device(c.trainer.device)

        d = c.data
        train, test, info = datasets or load_dataset(
            d.name, root=d.root, download=d.download, train_size=d.train_size, rotation=d.rotation,
            translation=d.translation, upsample=d.upsample, seed=d.seed,
        )
        self.info = info
        self.X, self.y = (t.to(self.device) for t in train.tensors)
        self.X_test, self.y_test = (t.to(self.device) for t in test.tensors)
        self.N = len(self.X)

        _seed_everything(c.trainer.seed)
        self.model = get_model(
            c.model.name, info["in_channels"], info["num_classes"], info["image_size"], **c.model.kwargs
        ).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
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

        seed = c.trainer.seed
        self.generators = {
            "data": torch.Generator().manual_seed(seed * 7919 + 1),
            "aug": torch.Generator().manual_seed(seed * 7919 + 2),
            "hyper": torch.Generator().manual_seed(seed * 7919 + 3),
        }
        self.batches_per_epoch = math.ceil(self.N / t.batch_size)

        # run state (everything below is in the checkpoint)
        self.epoch = 0
        self.global_step = 0
        self.lr_scale = 1.0
        self.hyper_lr_scale = 1.0
        self.history: List[Dict[str, Any]] = []
        self.events: List[Dict[str, Any]] = []
        self.best: Optional[Dict[str, Any]] = None
        self.timing = {"elapsed": 0.0, "marglik_step_seconds": [], "cached_step_seconds": [], "n_fits": 0}
        self.wandb_id: Optional[str] = None
        self.last_log_marglik = float("nan")

        self.resumed_from: Optional[Path] = None
        path = ckpt.find_checkpoint(t.resume, self.run_dir)
        if path is not None:
            state = ckpt.load(path, map_location="cpu")  # RNG states must stay on the CPU
            diff = self.cfg.resume_diff(state["config"])
            if diff:
                raise ValueError(
                    f"cannot resume from {path}: the configuration differs from the checkpoint's:\n  "
                    + "\n  ".join(diff) + "\n(use trainer.resume=never, or a fresh run directory)"
                )
            self.load_state_dict(state)
            self.resumed_from = path
        self._snapshot = self.state_dict()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything the run depends on (see :mod:`marglik.tuning.checkpoint`); tensors cloned."""
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

    def _rollback(self, kind: str, value: float, where: str) -> None:
        """Restore the last good state after a non-finite ``kind`` ('loss' or 'marglik')."""
        events = self.events + [{
            "epoch": self.epoch + 1, "kind": kind, "value": str(value), "where": where,
            "action": "restored end of epoch %d; %s x %g" % (
                self.epoch, "MAP lr" if kind == "loss" else "hyper lrs", self.cfg.trainer.rollback_lr_factor),
        }]
        if len(events) > self.cfg.trainer.max_rollbacks:
            raise NonFiniteError(
                f"non-finite {kind} ({value}) at epoch {self.epoch + 1} ({where}) after "
                f"{len(events) - 1} rollbacks (trainer.max_rollbacks={self.cfg.trainer.max_rollbacks})"
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

    def _report(self, msg: str) -> None:
        if logging.getLogger().handlers or log.handlers:  # e.g. Hydra's console + file handlers
            log.warning(msg)
        else:  # plain Python use: print above the progress bar
            from tqdm import tqdm

            tqdm.write(f"[marglik {self.run_dir.name}] {msg}", file=sys.stderr)

    # ------------------------------------------------------------------ pieces
    def prior_precision(self) -> Tensor:
        """Current prior precision: 0-d (scalar) or one entry per parameter tensor (layerwise)."""
        prec = self.log_prior.exp()
        return prec.squeeze(0) if self.cfg.hyper.prior_structure == "scalar" else prec

    def _set_lrs(self) -> float:
        t, c = self.cfg.trainer, self.cfg
        total = max(1, t.epochs * self.batches_per_epoch)
        if t.schedule == "cosine":
            frac = min(self.global_step / total, 1.0)
            lr = t.lr_min + (t.lr - t.lr_min) * 0.5 * (1 + math.cos(math.pi * frac))
        else:
            lr = t.lr
        lr *= self.lr_scale
        for g in self.map_opt.param_groups:
            g["lr"] = lr
        h = c.hyper
        factor = self.hyper_lr_scale
        if h.schedule == "cosine":
            span = max(1, t.epochs - h.burn_in)
            frac = min(max(self.epoch - h.burn_in, 0) / span, 1.0)
            factor *= 0.5 * (1 + math.cos(math.pi * frac))
        for g in self.hyper_opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        return lr

    def _augment(self, x: Tensor, aug: Optional[AffineAugmentation] = None, generator=None) -> Tensor:
        if not self.aug_on:
            return x
        aug = aug or self.aug
        return aug(x, generator=generator if generator is not None else self.generators["aug"])

    def map_loss(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Negative log joint / N on one batch: ``(loss, mean nll, logits)``."""
        out = self.model(x)
        nll = F.cross_entropy(out, y)
        delta = self.log_prior.detach().exp()
        if delta.numel() == 1:
            reg = delta[0] * sum((p * p).sum() for p in self.params)
        else:
            reg = sum(d * (p * p).sum() for d, p in zip(delta, self.params))
        return nll + 0.5 * reg / self.N, nll, out

    def _marglik_data(self) -> List[Tuple[Tensor, Tensor]]:
        """Batches for one Laplace fit: all data, or ``marglik_batches`` random batches; augmented
        with the current ``eta`` (differentiable w.r.t. ``eta``)."""
        h = self.cfg.hyper
        bs = h.marglik_batch_size or self.cfg.trainer.batch_size
        if h.marglik_batches is None:
            idx = torch.arange(self.N)
        else:
            perm = torch.randperm(self.N, generator=self.generators["hyper"])
            idx = perm[: min(self.N, h.marglik_batches * bs)]
        idx = idx.to(self.device)
        return [(self._augment(self.X[i]), self.y[i]) for i in idx.split(bs)]

    def make_laplace(self):
        from ..laplace import KronLaplace

        c = self.cfg.curvature
        return KronLaplace(
            self.model,
            likelihood="classification",
            approx=c.approx,
            copies_approx=c.copies_approx,
            fisher_type=c.fisher_type,
            mc_samples=c.mc_samples,
            prior_precision=self.prior_precision().detach(),
            differentiable=self.aug_on,
        )

    def fit_laplace(self, data: List[Tuple[Tensor, Tensor]]):
        la = self.make_laplace()
        seen = sum(len(yb) for _, yb in data)
        kwargs = {}
        params = inspect.signature(la.fit).parameters
        if seen != self.N:
            if "num_data" in params:
                kwargs["num_data"] = self.N
            elif "N" in params:
                kwargs["N"] = self.N
            else:
                raise RuntimeError("KronLaplace.fit has no num_data argument: cannot fit on a subset")
        if getattr(la, "n_layers", len(self.params)) != len(self.params):
            raise RuntimeError(
                f"the Laplace approximation covers {la.n_layers} parameter tensors but the model trains "
                f"{len(self.params)}: every trainable module must be covered by the K-FAC engine"
            )
        la.fit(data, **kwargs)
        return la

    def log_marglik(self, la) -> Tensor:
        return la.log_marginal_likelihood(prior_precision=self.prior_precision())

    # ------------------------------------------------------------------ epoch
    def _map_epoch(self) -> Optional[Dict[str, float]]:
        self.model.train()
        t = self.cfg.trainer
        perm = torch.randperm(self.N, generator=self.generators["data"]).to(self.device)
        tot_loss = tot_nll = correct = 0.0
        lr = float("nan")
        for b, idx in enumerate(perm.split(t.batch_size)):
            xb, yb = self.X[idx], self.y[idx]
            with torch.no_grad():
                xb = self._augment(xb)
            lr = self._set_lrs()
            loss, nll, out = self.map_loss(xb, yb)
            if not torch.isfinite(loss):
                self._rollback("loss", loss.item(), f"MAP step, batch {b + 1}/{self.batches_per_epoch}")
                return None
            self.map_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.map_opt.step()
            self.global_step += 1
            n = len(yb)
            tot_loss += loss.item() * n
            tot_nll += nll.item() * n
            correct += (out.argmax(-1) == yb).sum().item()
        return {"lr": lr, "train_loss": tot_loss / self.N, "train_nll": tot_nll / self.N, "train_acc": correct / self.N}

    def _hyper_update(self) -> Optional[Dict[str, float]]:
        """K hypersteps; ``None`` after a rollback. Returns the last log marglik estimate."""
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
                    return None
                try:
                    if fitted:
                        la = self.fit_laplace(self._marglik_data())
                        self.timing["n_fits"] += 1
                    lml = self.log_marglik(la)
                except torch.linalg.LinAlgError as err:
                    self._rollback("marglik", f"LinAlgError: {err}", f"hyperstep {k + 1}/{h.steps}")
                    return None
                if not torch.isfinite(lml):
                    self._rollback("marglik", lml.item(), f"hyperstep {k + 1}/{h.steps}")
                    return None
                grads = torch.autograd.grad(-lml, hyper_params, allow_unused=True)
                pre = (lml.item(), self.log_prior.detach().clone(), self.aug.eta.detach().clone())
                bad = [g for g in grads if g is not None and not torch.isfinite(g).all()]
                if bad:
                    self._rollback("marglik", "non-finite gradient", f"hyperstep {k + 1}/{h.steps}")
                    return None
                for p, g in zip(hyper_params, grads):
                    p.grad = torch.zeros_like(p) if g is None else g
                self.hyper_opt.step()
                self.hyper_opt.zero_grad(set_to_none=True)
                _sync(self.device)
                dt = time.perf_counter() - t0
                self.timing["marglik_step_seconds" if fitted else "cached_step_seconds"].append(dt)
                values.append(pre[0])
        finally:
            self.model.train()
            del la
        value, log_prior, eta = pre
        self.last_log_marglik = value
        if self.best is None or value > self.best["log_marglik"]:
            self.best = ckpt.detach_copy({
                "log_marglik": value, "epoch": self.epoch + 1, "model": self.model.state_dict(),
                "log_prior": log_prior, "eta": eta,
            })
            ckpt.save({**self.best, "config": self.cfg.to_dict()}, self.run_dir / ckpt.CKPT_DIR / ckpt.BEST)
        return {"log_marglik": value, "log_marglik_first": values[0]}

    @torch.no_grad()
    def evaluate(self, X: Optional[Tensor] = None, y: Optional[Tensor] = None) -> Dict[str, float]:
        """Accuracy and mean NLL of the MAP invariant model (``S_test`` augmented copies with the
        current ``eta``; a fixed noise seed, so repeated evaluations agree)."""
        X = self.X_test if X is None else X
        y = self.y_test if y is None else y
        was_training = self.model.training
        self.model.eval()
        self.aug_test.eta.copy_(self.aug.eta)
        gen = torch.Generator().manual_seed(self.cfg.trainer.seed * 7919 + 4)
        nll = correct = 0.0
        bs = self.cfg.trainer.eval_batch_size
        for i in range(0, len(X), bs):
            xb = self._augment(X[i : i + bs], self.aug_test, gen)
            out = self.model(xb)
            nll += F.cross_entropy(out, y[i : i + bs], reduction="sum").item()
            correct += (out.argmax(-1) == y[i : i + bs]).sum().item()
        self.model.train(was_training)
        return {"test_acc": correct / len(X), "test_nll": nll / len(X)}

    def ranges(self) -> Dict[str, float]:
        """Learned augmentation ranges (rotation in degrees, translations in pixels, scales as
        log-factors, shear dimensionless); all zero when augmentation is off."""
        return self.aug.ranges(image_size=self.info["image_size"])

    def _run_epoch(self) -> Optional[Dict[str, Any]]:
        c = self.cfg
        _sync(self.device)
        t0 = time.perf_counter()
        train = self._map_epoch()
        if train is None:
            return None
        row: Dict[str, Any] = {"epoch": self.epoch + 1, **train}
        e = self.epoch + 1
        hyper_s = 0.0
        due = e > c.hyper.burn_in and (e - c.hyper.burn_in) % c.hyper.frequency == 0
        if due:
            th = time.perf_counter()
            res = self._hyper_update()
            if res is None:
                return None
            hyper_s = time.perf_counter() - th
            row["log_marglik"] = res["log_marglik"]
            row["log_marglik_per_example"] = res["log_marglik"] / self.N
        else:
            row["log_marglik"] = None
            row["log_marglik_per_example"] = None
        prec = self.log_prior.detach().exp()
        row.update({
            "prior_prec_mean": prec.mean().item(), "prior_prec_min": prec.min().item(),
            "prior_prec_max": prec.max().item(),
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
        """Run (or resume) the whole schedule, then evaluate and write the outputs; returns the summary."""
        c = self.cfg
        cfg_dict = c.to_dict()
        write_json({**cfg_dict, "data_info": self.info}, self.run_dir / "config.json")
        self.logger = WandbLogger(cfg_dict, str(self.run_dir), resume_id=self.wandb_id)
        self.wandb_id = self.logger.run_id or self.wandb_id
        if self.resumed_from is not None:
            self._report(f"resumed from {self.resumed_from} at epoch {self.epoch}/{c.trainer.epochs}")
        from tqdm.auto import tqdm

        pbar = tqdm(
            total=c.trainer.epochs, initial=self.epoch, disable=not c.trainer.progress,
            desc=f"marglik {c.data.name} {c.curvature.approx}-{c.curvature.copies_approx}", unit="ep", dynamic_ncols=True,
        )
        start = time.perf_counter()
        base_elapsed = self.timing["elapsed"]
        try:
            while self.epoch < c.trainer.epochs:
                row = self._run_epoch()
                if row is None:  # rolled back: retry the epoch from the restored state
                    base_elapsed = self.timing["elapsed"]
                    start = time.perf_counter()
                    continue
                self.epoch += 1
                self.history.append(row)
                self.timing["elapsed"] = base_elapsed + time.perf_counter() - start
                self._snapshot = self.state_dict()
                ckpt.save(self._snapshot, self.run_dir / ckpt.CKPT_DIR / ckpt.LAST)
                write_history(self.history, self.run_dir / "history.csv")
                self.logger.log({k: v for k, v in row.items() if k != "epoch"}, step=self.epoch)
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
        except BaseException:
            pbar.close()
            if self.epoch > 0:
                self._report(
                    f"interrupted after epoch {self.epoch}; resume with trainer.resume={self.run_dir} "
                    f"(or re-run into the same hydra.run.dir)"
                )
            self.logger.finish()
            raise
        pbar.close()
        summary = self.finalize()
        self.logger.summary(summary)
        self.logger.save(str(self.run_dir / "curves.png"))
        self.logger.finish()
        return summary

    def finalize(self) -> Dict[str, Any]:
        """Evaluate the reported model and write ``summary.json``, ``history.csv``, ``curves.png``."""
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
        summary = {
            "test_accuracy": metrics["test_acc"],
            "test_nll": metrics["test_nll"],
            "log_marglik": lml,
            "log_marglik_per_example": lml / self.N if lml is not None and math.isfinite(lml) else None,
            "prior_precision": self.log_prior.detach().exp().tolist(),
            "augmentation": self.ranges(),
            "approx": c.curvature.approx,
            "copies_approx": c.curvature.copies_approx,
            "seconds": self.timing["elapsed"],
            "seconds_per_marglik_step": float(np.mean(steps)) if steps else None,
            "seconds_per_cached_hyperstep": float(np.mean(cached)) if cached else None,
            "n_laplace_fits": self.timing["n_fits"],
            "n_hypersteps": len(steps) + len(cached),
            "fisher_type": c.curvature.fisher_type,
            "prior_structure": c.hyper.prior_structure,
            "augmentation_learned": self.aug_on,
            "augmentation_units": {"rotation": "degrees", "translation_x": "pixels", "translation_y": "pixels",
                                   "scale_x": "log-factor", "scale_y": "log-factor", "shear": "shear factor"},
            "final_model": "best" if use_best else "last",
            "best_epoch": self.best["epoch"] if self.best else None,
            "last": {"test_accuracy": last_metrics["test_acc"], "test_nll": last_metrics["test_nll"],
                     "log_marglik": self.last_log_marglik, "augmentation": last_ranges,
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
            "rollbacks": self.events,
            "marglik_estimator": (
                "whole training set" if c.hyper.marglik_batches is None else
                f"stochastic: {c.hyper.marglik_batches} random batches of "
                f"{c.hyper.marglik_batch_size or c.trainer.batch_size} per fit, rescaled to N={self.N}"
            ),
        }
        write_json(summary, self.run_dir / "summary.json")
        write_history(self.history, self.run_dir / "history.csv")
        if self.history:
            try:
                plot_curves(
                    self.history, self.run_dir / "curves.png",
                    title=f"{c.data.name} rot={c.data.rotation:g} {c.model.name} {c.curvature.approx}-{c.curvature.copies_approx} "
                          f"aug={'on' if self.aug_on else 'off'}",
                )
            except Exception as e:  # plotting must never lose a finished run
                self._report(f"could not write curves.png: {e}")
        return summary


def tune(cfg: Union[Config, Dict[str, Any]], run_dir: Union[str, Path], **kwargs: Any) -> Dict[str, Any]:
    """Convenience: ``MarglikTuner(cfg, run_dir, **kwargs).fit()``."""
    return MarglikTuner(cfg, run_dir, **kwargs).fit()
