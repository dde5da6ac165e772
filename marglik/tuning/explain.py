"""What a run learned, in plain words: the lines the command line prints when a run ends.

Read from ``summary.json`` alone (:func:`explain_run`), so the same text can be made for any
finished run. Each learned augmentation range is set against the range the data are known to
have (``data.rotation`` degrees and ``data.translation`` pixels of fixed random warp; no scale or
shear), which says whether a range near zero is a failure or the right answer: the default job's
digits are upright, so a learned rotation near 0 degrees is correct -- there is nothing to be
invariant to -- and ``data.rotation=90`` shows a range being learned.
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional

__all__ = ["explain_run", "NEGLIGIBLE"]

#: learned ranges below these count as "none" (degrees; pixels; log-factor; shear factor)
NEGLIGIBLE = {"rotation": 5.0, "translation": 0.5, "scale": 0.05, "shear": 0.05}

_PRIOR_LIST_MAX = 8  #: list every prior precision by name up to this many tensors


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _against_known(what: str, learned: float, known: float, unit: str, data_key: Optional[str]) -> str:
    """One generator family's learned range against the data's known range (``data_key``: the
    option that sets it; ``None``: the data have none of this warp built in)."""
    small = learned < NEGLIGIBLE[what]
    if known > 0:
        share = f", {100 * learned / known:.0f}% of it" if learned <= 2 * known else ", less than learned"
        return f"{what} +-{_fmt(learned)}{unit} learned; the data are warped by +-{_fmt(known)}{unit} ({data_key}{share})"
    unwarped = f"not warped ({data_key}=0)" if data_key else f"given no {what}"
    if small:
        return (f"{what} +-{_fmt(learned)}{unit} learned, i.e. none: right for these data, which are {unwarped}, "
                f"so there is no {what} to be invariant to")
    return (f"{what} +-{_fmt(learned)}{unit} learned although the data are {unwarped}: the images vary that much "
            "naturally, or the range costs the marginal likelihood little")


def _augmentation_lines(s: Dict[str, Any]) -> List[str]:
    if not s.get("augmentation_learned"):
        return ["augmentation: not learned (hyper.augmentation=false)"]
    aug: Dict[str, float] = s.get("augmentation") or {}
    lines = []
    if "rotation" in aug:
        lines.append(_against_known("rotation", aug["rotation"], float(s.get("rotation") or 0.0), " deg",
                                    "data.rotation"))
        if not s.get("rotation") and aug["rotation"] < NEGLIGIBLE["rotation"]:
            lines[-1] += " (data.rotation=90 shows the range being learned)"
    shifts = [aug[k] for k in ("translation_x", "translation_y") if k in aug]
    if shifts:
        lines.append(_against_known("translation", max(shifts), float(s.get("translation") or 0.0), " px",
                                    "data.translation") + " (larger of x and y)")
    for what, keys, unit in (("scale", ("scale_x", "scale_y"), " (log-factor)"), ("shear", ("shear",), "")):
        vals = [aug[k] for k in keys if k in aug]
        if vals:
            lines.append(_against_known(what, max(vals), 0.0, unit, None))
    return ["augmentation ranges: " + lines[0]] + ["  " + line for line in lines[1:]] if lines else []


def _prior_line(by_name: Dict[str, float]) -> str:
    if not by_name:
        return "prior precisions: none"
    if list(by_name) == ["all"]:
        return f"prior precision (one for every weight, larger = stronger weight decay): {_fmt(by_name['all'])}"
    head = "prior precisions per parameter tensor (larger = stronger weight decay)"
    if len(by_name) <= _PRIOR_LIST_MAX:
        return f"{head}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in by_name.items())
    lo = min(by_name, key=by_name.__getitem__)
    hi = max(by_name, key=by_name.__getitem__)
    med = statistics.median(by_name.values())
    return (f"{head}: {len(by_name)} tensors from {_fmt(by_name[lo])} ({lo}) to {_fmt(by_name[hi])} ({hi}), "
            f"median {_fmt(med)} (all of them: prior_precision_by_name in summary.json)")


def _result_line(s: Dict[str, Any]) -> str:
    which: Optional[str]
    if s.get("final_model") == "best" and s.get("best_epoch") is not None:
        which = f"the model of epoch {s['best_epoch']}/{s.get('epochs')} (best selection value)"
    else:
        which = f"the last model (epoch {s.get('epochs')})"
    acc, nll = s.get("test_accuracy"), s.get("test_nll")
    metrics = (f"test accuracy {acc:.3f}, test NLL {nll:.3f}" if acc is not None and nll is not None
               else "no test metrics")
    lml, per = s.get("log_marglik"), s.get("log_marglik_per_example")
    evidence = (f"log marginal likelihood {_fmt(lml)} ({per:.4f} per example)" if lml is not None and per is not None
                else "no log marginal likelihood (no marginal-likelihood update ran)")
    return f"result: {which}: {metrics}; {evidence}"


def _cost_line(s: Dict[str, Any]) -> Optional[str]:
    """Where the run's time went, in standard trainings when the run timed one (``summary['cost']``)."""
    c = s.get("cost") or {}
    std = c.get("standard_trainings") or {}
    if c.get("seconds") is None:
        return None
    if std.get("total") is None:
        return (f"cost: {c['seconds']:.3g} s (MAP steps {c.get('map_seconds', 0):.3g} s, marglik updates "
                f"{c.get('marglik_update_seconds', 0):.3g} s of which selection values {c.get('selection_seconds', 0):.3g} s)")
    return (f"cost: {std['total']:.2f} standard trainings of this network ({c['seconds']:.3g} s): MAP steps "
            f"{std['map']:.2f}, marglik updates {std['marglik_updates']:.2f} (selection values {std['selection']:.2f}), "
            f"evaluation {std['evaluation']:.2f}")


def explain_run(summary: Dict[str, Any]) -> List[str]:
    """What a finished run learned, in plain words.

    Args:
        summary: a ``summary.json`` (the fields of :class:`marglik.tuning.reporting.RunSummary`).

    Returns:
        Lines: the result (test metrics, log marginal likelihood), each learned augmentation range
        against the data's known range, the prior precisions by parameter name, and what the run
        cost (in standard trainings where it timed one).
    """
    lines = [_result_line(summary)]
    cost = _cost_line(summary)
    tail = [cost] if cost else []
    if not summary.get("marglik_updates"):
        return lines + ["nothing was learned: no marginal-likelihood update ran (see the warning)"] + tail
    return lines + _augmentation_lines(summary) + [_prior_line(summary.get("prior_precision_by_name") or {})] + tail
