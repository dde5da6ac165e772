"""What a tuning run costs, in seconds and in *standard trainings*.

A standard training is what a user compares a tuning run with: the same network trained for the
same epochs with fixed hyperparameters and one augmented copy per example and step (the learned
ranges frozen). :func:`standard_epoch_seconds` times one epoch of exactly that inside the run (a
copy of the model, a fresh optimizer of the run's kind, ``S = 1``, its own random stream, the
global RNGs forked, so the run itself is not changed and a resume stays bit-exact); ``epochs``
times it is the run's *standard training* in seconds.

:func:`cost_record` sums the history's per-epoch split (``map_seconds``, ``hyperstep_seconds``,
``selection_seconds``, ``eval_seconds``) and the hypersteps' phases (fit, log det, gradient) into
``summary.json['cost']`` and states each part in standard trainings. Wall-clock seconds (the device
synchronised around each part); the benchmark ``scripts/bench_vs_grid.py`` measures whole processes
in CPU seconds instead.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Dict, List, Optional

import torch

from .parts import Augmenter, MapStep, Parts
from .parts.hyper_step import sync
from .parts.hyperparams import sharing_eta
from .seeds import Stream, stream_generator

#: the history columns summed by :func:`cost_record` (seconds per epoch)
SPLIT = ("map_seconds", "hyperstep_seconds", "selection_seconds", "eval_seconds")
#: every timing column of ``history.csv`` (the columns that differ between two runs of the same numbers)
TIMING_COLUMNS = ("epoch_seconds", "hyper_seconds", *SPLIT)


def standard_epoch_seconds(parts: Parts, repeats: int = 2) -> Optional[float]:
    """Seconds of one epoch of a standard training of the run's network (the fastest of ``repeats``
    epochs, so one-off start-up costs do not count).

    Args:
        parts: the run's parts (their model, data, prior precision, augmentation and MAP step are
            copied, never changed).
        repeats: epochs timed.

    Returns:
        Seconds, or ``None`` under ``torchrun`` (a copy of a DDP model would need its own process
        group; the ranks' parts are measured by the run's own split).
    """
    if parts.dist.enabled:
        return None
    step, aug = parts.map_step, parts.augmenter
    model = copy.deepcopy(parts.model)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = type(step.optimizer)(params, **step.optimizer.defaults)
    prior = copy.copy(parts.prior)
    prior.params = params  # the same fixed precision, on the copy's weights
    prior.log_prior = parts.prior.log_prior.detach().clone()
    frozen = copy.deepcopy(aug.aug)
    frozen.eta.requires_grad_(False)
    gen = stream_generator(parts.labels.seed, Stream.reference)
    one = sharing_eta(frozen, 1)
    augmenter = Augmenter(frozen, frozen, aug.enabled, gen, parts.dist, aug.image_size, aug_train=one)
    ref = MapStep(model, opt, prior, augmenter, parts.data, gen, step.batch_size, lr_at=step.lr_at, dist=parts.dist)
    device = parts.device
    best = float("inf")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(max(1, repeats)):
            sync(device)
            t0 = time.perf_counter()
            ref.run_epoch()
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return best


def cost_record(history: List[Dict[str, Any]], phases: Dict[str, float], epochs: int,
                standard_epoch: Optional[float], total_seconds: float) -> Dict[str, Any]:
    """``summary.json['cost']``: where the run's time went, and the same in standard trainings.

    Args:
        history: the run's rows (with the :data:`SPLIT` columns; rows of older runs without them count 0).
        phases: the hypersteps' ``phase_seconds`` (``fit``, ``log_marglik``, ``gradient``).
        epochs: the run's epochs (a standard training has as many).
        standard_epoch: :func:`standard_epoch_seconds` (``None``: not measured).
        total_seconds: the run's training seconds (all segments).

    Returns:
        ``seconds`` (total), ``map_seconds``, ``hyperstep_seconds``, ``hyperstep_phase_seconds``,
        ``selection_seconds``, ``eval_seconds``, ``marglik_update_seconds`` (hypersteps + selection),
        ``standard_training_seconds`` (``epochs`` x the timed epoch, or ``None``) and
        ``standard_trainings``: each of ``total``, ``map``, ``hypersteps``, ``selection``,
        ``marglik_updates``, ``evaluation`` divided by it (``None`` when not measured).
    """
    sums = {key: float(sum(r.get(key) or 0.0 for r in history)) for key in SPLIT}
    out: Dict[str, Any] = {"seconds": float(total_seconds), **sums,
                           "hyperstep_phase_seconds": {k: float(v) for k, v in phases.items()},
                           "marglik_update_seconds": sums["hyperstep_seconds"] + sums["selection_seconds"]}
    standard = None if standard_epoch is None else float(standard_epoch) * max(1, epochs)
    out["standard_training_seconds"] = standard
    parts = {"total": out["seconds"], "map": sums["map_seconds"], "hypersteps": sums["hyperstep_seconds"],
             "selection": sums["selection_seconds"], "marglik_updates": out["marglik_update_seconds"],
             "evaluation": sums["eval_seconds"]}
    out["standard_trainings"] = {k: (None if not standard else v / standard) for k, v in parts.items()}
    return out
