"""The driver of a tuning run: it sequences epochs over built parts and never reads a config.

Each epoch: the MAP steps (:class:`~marglik.tuning.parts.MapStep`), the marglik update when due
(:class:`~marglik.tuning.parts.HyperStep`, then the selection value,
:class:`~marglik.tuning.parts.Selection`), the evaluation when due; then the checkpoint (the parts'
states, :mod:`marglik.tuning.checkpoint`), ``history.csv``, W&B and the callbacks. A part that meets
a non-finite value raises :class:`~marglik.tuning.parts.NonFiniteValue`; the driver rolls the run
back to the end of the previous epoch (see :mod:`marglik.tuning.loop`). At the end:
:func:`marglik.tuning.finalize.finalize`. The parts come from
:func:`marglik.tuning.build.build_parts` or from a Python user.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import UserError, one_line
from . import checkpoint as ckpt
from . import checkpoint_format, run_lock
from .finalize import finalize
from .parts import NonFiniteValue, Parts
from .parts.hyper_step import sync
from .reporting import write_history, write_json
from .wandb_logger import WandbLogger

log = logging.getLogger("marglik.tuning")

Callback = Callable[[Any, Dict[str, Any]], None]


class NonFiniteError(UserError, RuntimeError):
    """Raised when a run keeps producing non-finite values after ``trainer.max_rollbacks`` rollbacks
    (one line: what, where, and which learning rates to lower)."""


class Trainer:
    """Run (or resume) a tuning run over built parts: ``Trainer(parts, run_dir).fit()``.

    Args:
        parts: the run's parts (:func:`marglik.tuning.build.build_parts`).
        run_dir: output directory (created).
        callbacks: called as ``cb(trainer, history_row)`` after every completed (and checkpointed)
            epoch; an exception raised there interrupts the run (the checkpoint is already saved).

    Raises:
        PermissionError: the run or checkpoint directory is not writable.
        RunDirLockedError: another live process holds the run directory (:mod:`marglik.tuning.run_lock`;
            rank 0 takes it here and :meth:`fit` lets go of it).
    """

    def __init__(self, parts: Parts, run_dir: Union[str, Path], callbacks: Sequence[Callback] = ()) -> None:
        self.parts = parts
        self.dist = parts.dist
        self.is_main = self.dist.is_main  # rank 0 alone writes files, checkpoints and W&B
        self.run_dir = Path(run_dir)
        self._lock: Optional[run_lock.RunLock] = None
        if self.is_main:
            self._lock = run_lock.acquire(self.run_dir)  # checked writable; one process per run directory
            ckpt.check_writable(self.run_dir / ckpt.CKPT_DIR, "checkpoint directory")
        #: checkpoint files found damaged when resuming: moved aside (``<name>.damaged``) when the run
        #: starts, so that no save rotates one into ``prev.ckpt``
        self.damaged_checkpoints: List[Path] = []
        #: every warning of the run, one line each (``summary.json['warnings']``, the end-of-run lines)
        self.warnings: List[str] = []
        self.callbacks = list(callbacks)
        # the driver's own state (the "run" part of a checkpoint)
        self.epoch = 0
        self.history: List[Dict[str, Any]] = []
        self.events: List[Dict[str, Any]] = []
        self.elapsed = 0.0
        self.segments = 1
        self.wandb_id: Optional[str] = None
        self.standard_epoch_seconds: Optional[float] = None  # one standard-training epoch (tuning.cost)
        self.resumed_from: Optional[Path] = None
        self._saved_ckpt: Optional[Tuple[Path, int]] = None  # newest checkpoint on disk, its epoch
        # the save in progress: (path, epoch, identity of the file it replaces), see _resume_point
        self._saving: Optional[Tuple[Path, int, Optional[Tuple[int, int, int]]]] = None
        self._segment_start_elapsed = 0.0
        self._snapshot = self.state_dict()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint: every part's state and the driver's own (:func:`marglik.tuning.checkpoint.pack`).

        Returns:
            ``{"version", "epoch", "config", "parts"}``, tensors detached and cloned.
        """
        run = {"epoch": self.epoch, "history": self.history, "events": self.events, "elapsed": self.elapsed,
               "segments": self.segments, "wandb_id": self.wandb_id, "standard_epoch_seconds": self.standard_epoch_seconds}
        states = {"run": run, **{name: part.state_dict() for name, part in self.parts.stateful().items()}}
        return checkpoint_format.pack(states, self.epoch, self.parts.config)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (copied, not aliased).

        Args:
            state: a checkpoint of the current format (:func:`marglik.tuning.checkpoint.upgrade`).

        Raises:
            CheckpointError: a part's state is missing.
        """
        stateful = self.parts.stateful()
        states = checkpoint_format.check_parts(ckpt.detach_copy(state), ["run", *stateful])
        run = states["run"]
        self.epoch, self.history, self.events = run["epoch"], run["history"], run["events"]
        self.elapsed, self.segments, self.wandb_id = run["elapsed"], run["segments"], run["wandb_id"]
        self.standard_epoch_seconds = run.get("standard_epoch_seconds")  # absent from older checkpoints
        for name, part in stateful.items():
            part.load_state_dict(states[name])

    def resume(self, state: Dict[str, Any], path: Union[str, Path]) -> None:
        """Continue the run of a checkpoint (a new segment of it).

        Args:
            state: the checkpoint (current format).
            path: its file.
        """
        self.load_state_dict(state)
        self.segments += 1  # this process continues the run
        self.resumed_from = Path(path)
        self._saved_ckpt = (self.resumed_from, self.epoch)
        self._snapshot = self.state_dict()

    def _rollback(self, err: NonFiniteValue) -> None:
        """Restore the last good state after a non-finite value and lower the offending lr (the
        epoch is then retried), or raise :class:`NonFiniteError` past ``max_rollbacks``."""
        s, kind, value, where = self.parts.settings, err.kind, err.value, err.where
        events = self.events + [{
            "epoch": self.epoch + 1, "kind": kind, "value": str(value), "where": where,
            "action": "restored end of epoch %d; %s x %g" % (
                self.epoch, "MAP lr" if kind == "loss" else "hyper lrs", s.rollback_lr_factor),
        }]
        if len(events) > s.max_rollbacks:
            lrs = "trainer.lr" if kind == "loss" else "hyper.lr / hyper.aug_lr (or trainer.lr if the weights diverge)"
            raise NonFiniteError(
                f"non-finite {kind} ({value}) at epoch {self.epoch + 1} ({where}) after "
                f"{len(events) - 1} rollbacks (trainer.max_rollbacks={s.max_rollbacks}): the run "
                f"diverges; lower {lrs}, or raise trainer.max_rollbacks"
            ) from None
        step = self.parts.map_step if kind == "loss" else self.parts.hyper_step
        scale = step.lr_scale
        rng = self.parts.streams.state_dict()
        self.load_state_dict(self._snapshot)
        self.parts.streams.load_state_dict(rng)  # not rewound: the retry draws fresh batches / noise
        self.events = events
        step.lr_scale = scale * s.rollback_lr_factor
        self._report(
            f"non-finite {kind} ({value}) in epoch {self.epoch + 1} ({where}): rolled back to the end of "
            f"epoch {self.epoch}, {'MAP' if kind == 'loss' else 'hyperparameter'} learning rate x "
            f"{s.rollback_lr_factor:g} (rollback {len(events)}/{s.max_rollbacks})"
        )

    def _report(self, msg: str) -> None:
        if not self.is_main:  # one voice per job: rank 0
            return
        if logging.getLogger().handlers or log.handlers:  # e.g. Hydra's console + file handlers
            log.warning(msg)
        else:  # plain Python use: print above the progress bar
            from tqdm import tqdm

            tqdm.write(f"[marglik {self.run_dir.name}] {msg}", file=sys.stderr)

    # ------------------------------------------------------------------ pieces
    def evaluate(self, X: Any = None, y: Any = None) -> Dict[str, float]:
        """Test accuracy and NLL (:class:`~marglik.tuning.parts.Evaluation`).

        Args:
            X: inputs (default: the test set).
            y: labels (default: the test labels).

        Returns:
            ``{"test_acc", "test_nll"}``.
        """
        return self.parts.evaluation(X, y)

    def ranges(self) -> Dict[str, float]:
        """Returns: the learned augmentation ranges (all zero when augmentation is off)."""
        return self.parts.augmenter.ranges()

    def _marglik_update(self) -> Dict[str, float]:
        """The hypersteps, then the selection value at the updated hyperparameters; keeps (and
        writes) the best state.

        Returns:
            ``log_marglik`` (the selection value; ``None`` when this update is not scored,
            ``hyper.selection_every``), ``hyperstep_log_marglik`` (the last hyperstep's estimate,
            before its step), ``hyperstep_log_marglik_first``, and the seconds of the hypersteps and
            of the selection value (``hyperstep_seconds``, ``selection_seconds``).

        Raises:
            NonFiniteValue: from the parts.
        """
        p = self.parts
        sync(p.device)
        t0 = time.perf_counter()
        res, la = p.hyper_step.run(self.epoch)
        sync(p.device)
        t1 = time.perf_counter()
        scored = p.settings.selection_due(self.epoch + 1)
        try:
            improved = scored and p.selection.update(self.epoch + 1, la)
        finally:
            del la
        if improved and self.is_main:
            ckpt.save({**p.selection.best, "config": p.config}, self.run_dir / ckpt.CKPT_DIR / ckpt.BEST)
        sync(p.device)
        return {"log_marglik": p.selection.last_log_marglik if scored else None, **res,
                "hyperstep_seconds": t1 - t0, "selection_seconds": time.perf_counter() - t1 if scored else 0.0}

    def _run_epoch(self) -> Dict[str, Any]:
        """MAP steps, the marglik update when due, evaluation: the epoch's history row.

        Raises:
            NonFiniteValue: from the parts (the caller rolls back).
        """
        p, s = self.parts, self.parts.settings
        N = p.data.N
        sync(p.device)
        t0 = time.perf_counter()
        train = p.map_step.run_epoch()
        sync(p.device)
        map_s = time.perf_counter() - t0
        row: Dict[str, Any] = {"epoch": self.epoch + 1, **train}
        log_prior_before = p.prior.log_prior.detach().clone()
        e = self.epoch + 1
        hyperstep_s = selection_s = 0.0
        if s.update_due(e):
            res = self._marglik_update()
            hyperstep_s, selection_s = res["hyperstep_seconds"], res["selection_seconds"]
            lml = res["log_marglik"]
            row["log_marglik"] = lml
            row["log_marglik_per_example"] = None if lml is None else lml / N
            row["hyperstep_log_marglik"] = res["hyperstep_log_marglik"]
            row["hyperstep_log_marglik_per_example"] = res["hyperstep_log_marglik"] / N
        else:
            for key in ("log_marglik", "log_marglik_per_example", "hyperstep_log_marglik",
                        "hyperstep_log_marglik_per_example"):
                row[key] = None
        log_prior = p.prior.log_prior.detach()
        prec = log_prior.exp()
        change = (log_prior - log_prior_before).abs()
        row.update({
            "prior_prec_mean": prec.mean().item(), "prior_prec_min": prec.min().item(),
            "prior_prec_max": prec.max().item(),
            # convergence: the largest change of a log prior precision in this epoch's update, and
            # the parameter tensor it belongs to ("all" for a scalar prior; empty without a change)
            "log_prior_change_max": change.max().item(),
            "log_prior_change_argmax": (None if not bool(change.max() > 0) else
                                        "all" if p.prior.structure == "scalar" else p.prior.names[int(change.argmax())]),
        })
        row.update({f"aug_{k}": v for k, v in self.ranges().items()})
        te = time.perf_counter()
        if (s.eval_every and e % s.eval_every == 0) or e == s.epochs:
            row.update(self.evaluate())
        else:
            row.update({"test_acc": None, "test_nll": None})
        sync(p.device)
        row["epoch_seconds"] = time.perf_counter() - t0
        row["hyper_seconds"] = hyperstep_s + selection_s  # the whole marglik update
        # where the epoch's time went (summed by marglik.tuning.cost into summary.json['cost'])
        row.update({"map_seconds": map_s, "hyperstep_seconds": hyperstep_s, "selection_seconds": selection_s,
                    "eval_seconds": time.perf_counter() - te})
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
        A checkpoint found damaged when resuming is first moved aside (``last.ckpt.damaged``). Every
        Python warning marglik's code raises meanwhile (e.g. W&B failing to start) is said as one line and
        listed in ``summary.json['warnings']``. The run directory's lock is released at the end.

        Returns:
            The summary (:func:`marglik.tuning.finalize.finalize`; the fields of
            :class:`marglik.tuning.reporting.RunSummary`).

        Raises:
            NonFiniteError: non-finite values persist after ``max_rollbacks`` rollbacks.
        """
        with warnings.catch_warnings():  # every warning shown while it runs is a line of the run's record
            warnings.filterwarnings("default", module=r"marglik\.")  # ours (e.g. W&B's failures) once each run
            warnings.showwarning = self._warning
            try:
                return self._fit()
            finally:
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None

    def _warning(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                 line: Optional[str] = None) -> None:
        """``warnings.showwarning`` during :meth:`fit`: one line (no source line), kept for the summary."""
        text = one_line(str(message)) or category.__name__
        if text not in self.warnings:
            self.warnings.append(text)
            self._report(text)

    def _move_damaged_aside(self) -> None:
        """Rename each checkpoint found damaged to ``<name>.damaged`` (kept for inspection, never rotated)."""
        for path in self.damaged_checkpoints:
            if path.is_file():
                aside = path.with_name(path.name + ".damaged")
                os.replace(path, aside)
                self._report(f"moved the damaged checkpoint {path} aside to {aside.name}")
        self.damaged_checkpoints = []

    def _fit(self) -> Dict[str, Any]:
        p, s, lab = self.parts, self.parts.settings, self.parts.labels
        if self.is_main:
            self._move_damaged_aside()
        if self.wandb_id is None:  # unique per run, kept in the checkpoint: a resume continues it
            import secrets

            self.wandb_id = secrets.token_hex(4)  # not the seeded RNGs: resume stays bit-exact
        self.logger = (WandbLogger(p.config, str(self.run_dir), resume_id=self.wandb_id) if self.is_main
                       else WandbLogger(p.config, str(self.run_dir), mode="disabled"))
        if self.is_main:
            write_json({**p.config, "data_info": p.data.info}, self.run_dir / "config.json")
            if self.history:
                write_history(self.history, self.run_dir / "history.csv")
        if self.resumed_from is not None:
            self._report(f"resumed from {self.resumed_from} at epoch {self.epoch}/{s.epochs}")
            if self.history:
                self._log_row(self.history[-1])
        for msg in lab.warnings:  # e.g. epochs <= burn-in: say so before training starts
            self._report(msg)
        if s.cost_reference and self.standard_epoch_seconds is None and self.epoch < s.epochs:
            from .cost import standard_epoch_seconds

            self.standard_epoch_seconds = standard_epoch_seconds(p)  # not part of the run's seconds
            self._snapshot = self.state_dict()
        from tqdm.auto import tqdm

        pbar = tqdm(
            total=s.epochs, initial=self.epoch, disable=not (s.progress and self.is_main),
            desc=f"marglik {lab.data} {lab.approx}-{lab.copies_approx or lab.approx}",
            unit="ep", dynamic_ncols=True,
        )
        start = time.perf_counter()
        base_elapsed = self.elapsed
        self._segment_start_elapsed = base_elapsed  # seconds of the run before this segment (resume)
        try:
            while self.epoch < s.epochs:
                try:
                    row = self._run_epoch()
                except NonFiniteValue as err:  # roll back, then retry the epoch from the restored state
                    self._rollback(err)
                    base_elapsed = self.elapsed
                    start = time.perf_counter()
                    continue
                self.epoch += 1
                self.history.append(row)
                self.elapsed = base_elapsed + time.perf_counter() - start
                self._snapshot = self.state_dict()
                if self.is_main:
                    path = self.run_dir / ckpt.CKPT_DIR / ckpt.LAST
                    self._saving = (path, self.epoch, _file_identity(path))
                    ckpt.save(self._snapshot, path, keep_previous=True)
                    self._saved_ckpt, self._saving = (path, self.epoch), None
                    write_history(self.history, self.run_dir / "history.csv")
                self._log_row(row)
                pbar.update(1)
                self._postfix(pbar, row)
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

    def finalize(self) -> Dict[str, Any]:
        """Evaluate the reported model and write ``summary.json``, ``history.csv``, ``curves.png``
        (:func:`marglik.tuning.finalize.finalize`).

        Returns:
            The summary.
        """
        return finalize(self.parts, self.history, self.events, epoch=self.epoch, elapsed=self.elapsed,
                        segment_elapsed=self.elapsed - self._segment_start_elapsed, segments=self.segments,
                        run_dir=self.run_dir, is_main=self.is_main, report=self._report,
                        extra_warnings=self.warnings, standard_epoch_seconds=self.standard_epoch_seconds)

    def _postfix(self, pbar: Any, row: Dict[str, Any]) -> None:
        post = {"loss": f"{row['train_loss']:.3f}", "acc": f"{row['train_acc']:.3f}"}
        if row.get("test_acc") is not None:
            post["test"] = f"{row['test_acc']:.3f}"
        lml = self.parts.selection.last_log_marglik
        if math.isfinite(lml):
            post["lml/N"] = f"{lml / self.parts.data.N:.3f}"
        if self.parts.augmenter.enabled:
            post["rot"] = f"{row.get('aug_rotation', 0.0):.0f}deg"
        pbar.set_postfix(post)

    def _log_row(self, row: Dict[str, Any]) -> None:
        self.logger.log({k: v for k, v in row.items() if k != "epoch" and not isinstance(v, str)}, step=int(row["epoch"]))

    def _finish_logger(self) -> None:
        """Close the W&B run; for an offline run, say where it is and how to upload it."""
        hint = self.logger.finish()
        if hint and self.is_main:
            print(f"marglik: {hint}", file=sys.stderr)

    def _resume_point(self) -> Optional[Tuple[Path, int]]:
        """The newest checkpoint on disk and its epoch (``None``: none). An interrupt can land inside
        :func:`checkpoint.save` or right after its renames, before the bookkeeping that follows
        (a Ctrl-C is raised at the next bytecode): then the file on disk decides. ``last.ckpt`` replaced
        by another file: the new epoch's; ``last.ckpt`` gone (between the save's two renames): the
        replaced one, now ``prev.ckpt``; otherwise the save had not replaced anything yet."""
        saved = self._saved_ckpt
        if self._saving is not None:
            path, epoch, before = self._saving
            now = _file_identity(path)
            if now is not None and now != before:
                return path, epoch
            prev = path.with_name(ckpt.PREV)
            if now is None and before is not None and prev.is_file():
                return prev, (saved[1] if saved is not None and saved[0] == path else epoch - 1)
        return saved if saved is not None and saved[0].is_file() else None

    def _report_interrupt(self, err: BaseException) -> None:
        """How to continue after an exception: only from a checkpoint that exists on disk. The line
        is also attached to ``err`` as ``err.resume_hint`` (the CLI prints it after a Ctrl-C)."""
        if not self.is_main:
            return
        saved = self._resume_point()
        if saved is not None:
            path, epoch = saved
            how = (f"trainer.resume={self.run_dir} (continues in this run directory)"
                   if path.parent == self.run_dir / ckpt.CKPT_DIR else f"trainer.resume={path}")
            hint = f"the checkpoint {path} holds epoch {epoch}/{self.parts.settings.epochs}: resume with {how}"
        else:
            hint = "stopped before any checkpoint was written: nothing to resume from (a re-run starts at epoch 0)"
        self._report(hint if hint.startswith("stopped") else f"stopped; {hint}")
        try:
            err.resume_hint = hint  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - exceptions without a __dict__
            pass


def _file_identity(path: Path) -> Optional[Tuple[int, int, int]]:
    """``(inode, mtime ns, size)`` of a file, ``None`` if it does not exist: a rename over it changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
