"""The end of a run: evaluate the reported model (the best selection value's, or the last), build
the summary (:class:`marglik.tuning.reporting.RunSummary`) and write ``summary.json``,
``history.csv`` and ``curves.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .cost import cost_record
from .diagnosis import run_warnings
from .parts import Parts
from .reporting import plot_curves, summary_record, write_history, write_json

AUGMENTATION_UNITS = {"rotation": "degrees", "translation_x": "pixels", "translation_y": "pixels",
                      "scale_x": "log-factor", "scale_y": "log-factor", "shear": "shear factor"}


def _mean(values: List[float]) -> Any:
    return float(np.mean(values)) if values else None


def finalize(parts: Parts, history: List[Dict[str, Any]], events: List[Dict[str, Any]], *, epoch: int,
             elapsed: float, segment_elapsed: float, segments: int, run_dir: Path, is_main: bool,
             report: Callable[[str], None], extra_warnings: Sequence[str] = (),
             standard_epoch_seconds: Optional[float] = None) -> Dict[str, Any]:
    """Evaluate the reported model and write the outputs (rank 0 only writes).

    Loads the best state into the model first when ``final_model=best`` and an update ran.

    Args:
        parts: the run's parts.
        history: the history rows.
        events: the rollback events.
        epoch: completed epochs.
        elapsed: seconds of the whole run.
        segment_elapsed: seconds of this process's segment.
        segments: processes the run took (1 + resumes).
        run_dir: where the outputs go.
        is_main: whether this process writes.
        report: says one line (the run's warnings).
        extra_warnings: warnings the run met (and said) while training, e.g. W&B's; listed in the summary.
        standard_epoch_seconds: one standard-training epoch (:func:`marglik.tuning.cost.standard_epoch_seconds`;
            ``None``: not measured).

    Returns:
        The summary, checked against :class:`marglik.tuning.reporting.RunSummary`.
    """
    p, lab, sel = parts, parts.labels, parts.selection
    last_metrics = p.evaluation()
    last_ranges = p.augmenter.ranges()
    last_prior = p.prior.log_prior.detach().exp().tolist()
    last_lml = sel.last_log_marglik
    use_best = p.settings.final_model == "best" and sel.best is not None
    if use_best:
        sel.restore_best()
        metrics = p.evaluation()
        lml = sel.best["log_marglik"]
    else:
        metrics = last_metrics
        lml = last_lml
    steps, cached = p.hyper_step.step_seconds, p.hyper_step.cached_step_seconds
    summary = summary_record({
        "test_accuracy": metrics["test_acc"],
        "test_nll": metrics["test_nll"],
        "log_marglik": lml,
        "log_marglik_per_example": lml / p.data.N if lml is not None and math.isfinite(lml) else None,
        "prior_precision": p.prior.log_prior.detach().exp().tolist(),
        "prior_precision_by_name": p.prior.by_name(),
        "augmentation": p.augmenter.ranges(),
        "approx": lab.approx,
        "copies_approx": lab.copies_approx,
        "backend": lab.backend,
        "structure": lab.structure,
        "seconds": elapsed,
        "seconds_this_segment": segment_elapsed,
        "segments": segments,
        "seconds_per_marglik_step": _mean(steps),
        "seconds_per_cached_hyperstep": _mean(cached),
        "seconds_per_selection": _mean(sel.seconds),
        "n_laplace_fits": p.hyper_step.n_fits,
        "n_hypersteps": len(steps) + len(cached),
        "marglik_updates": sum(row.get("hyperstep_log_marglik") is not None for row in history),
        "cost": cost_record(history, p.hyper_step.phase_seconds, epoch, standard_epoch_seconds, elapsed),
        "fisher_type": lab.fisher_type,
        "prior_structure": lab.prior_structure,
        "augmentation_learned": p.augmenter.enabled,
        "augmentation_units": dict(AUGMENTATION_UNITS),
        "final_model": "best" if use_best else "last",
        "best_epoch": sel.best["epoch"] if sel.best else None,
        "last": {"test_accuracy": last_metrics["test_acc"], "test_nll": last_metrics["test_nll"],
                 "log_marglik": last_lml, "augmentation": last_ranges,
                 "hyperstep_log_marglik": next((r["hyperstep_log_marglik"] for r in reversed(history)
                                                if r.get("hyperstep_log_marglik") is not None), None),
                 "prior_precision": last_prior},
        "epochs": epoch,
        "train_size": p.data.N,
        "test_size": len(p.data.X_test),
        "data": lab.data,
        "rotation": lab.rotation,
        "translation": lab.translation,
        "model": lab.model,
        "num_params": sum(t.numel() for t in p.prior.params),
        "seed": lab.seed,
        "device": str(p.device),
        "world_size": p.dist.world_size,
        "rollbacks": len(events),
        "rollback_events": events,
        "marglik_estimator": p.hyper_step.estimator.describe(),
        "selection_estimator": sel.estimator.describe(),
        "separate_bias": lab.separate_bias,
        "warnings": list(lab.warnings) + [w for w in extra_warnings if w not in lab.warnings],
    })
    trouble = run_warnings(summary, history, p.data.info["num_classes"])  # a run that went wrong says so
    summary["warnings"] += trouble
    for msg in trouble:
        report(msg)
    if not is_main:
        return summary
    write_json(summary, run_dir / "summary.json")
    write_history(history, run_dir / "history.csv")
    if history:
        try:
            plot_curves(
                history, run_dir / "curves.png",
                title=f"{lab.data} rot={lab.rotation:g} {lab.model} {lab.approx}-{lab.copies_approx} "
                      f"aug={'on' if p.augmenter.enabled else 'off'}",
                burn_in=lab.burn_in,
                reported_epoch=summary["best_epoch"] if use_best else epoch,
                reported_label="reported (best selection value)" if use_best else "reported (last)",
            )
        except Exception as e:  # plotting must never lose a finished run
            report(f"could not write curves.png: {e}")
    return summary
