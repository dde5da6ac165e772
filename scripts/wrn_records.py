"""Derived numbers of one WRN-16-4 study record (a library module of ``scripts/``, no entry point):
the learned rotation, the hyperparameters' movement over the last marglik updates and the most
that Adam's schedule allowed them to move, the wall time split into training and marglik.

A record is what ``runner.tune_job`` returns for one run: ``summary`` (the run's ``summary.json``),
``history`` (``history.csv`` as columns), and after :func:`finish` ``convergence`` and ``time_split``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List, Optional

from marglik.tuning.schedules import hyper_lr_factor


def fmt(v: Optional[float], spec: str, se: Optional[float] = None) -> str:
    """``v`` formatted (``-`` for ``None``), with ``± se`` when given."""
    if v is None:
        return "-"
    return format(v, spec) + ("" if se is None else f" ± {format(se, spec)}")


def learned_rotation(rec: Optional[Dict[str, Any]]) -> Optional[float]:
    """The learned rotation range (degrees) of a run record; ``None`` without augmentation or record."""
    if rec is None or not rec["augmentation"]:
        return None
    return (rec["summary"]["augmentation"] or {}).get("rotation")


def update_rows(history: Dict[str, List[Any]]) -> List[int]:
    """Indices of the history rows that hold a marglik update (a logged ``log_marglik``)."""
    return [i for i, v in enumerate(history.get("log_marglik") or []) if v is not None]


def convergence(history: Dict[str, List[Any]], updates: int = 3) -> Dict[str, Any]:
    """How much the hyperparameters moved over the last ``updates`` marglik updates: the range of
    the learned rotation (degrees) over the values before and after them, and the sum of the
    per-update largest changes of a log prior precision (a bound on every tensor's movement; equal to
    one tensor's movement when the same tensor moved most in each update: ``log_prior_movers`` names
    them, where the history records it)."""
    idx = update_rows(history)
    if len(idx) < updates + 1:
        return {"rotation_movement_deg": None, "log_prior_movement": None}
    last = idx[-updates:]
    rot = history.get("aug_rotation")
    rot_vals = [rot[i] for i in [idx[-updates - 1]] + last] if rot else None
    change = history.get("log_prior_change_max") or [None] * len(history.get("log_marglik") or [])
    moves = [change[i] for i in last]
    out: Dict[str, Any] = {"rotation_movement_deg": None if not rot_vals else max(rot_vals) - min(rot_vals),
                           "log_prior_movement": None if any(m is None for m in moves) else sum(moves)}
    movers = history.get("log_prior_change_argmax")
    if movers:
        out["log_prior_movers"] = [movers[i] for i in last]
    return out


def movement_bound(history: Dict[str, List[Any]], epochs: int, burn_in: int, hyper_lr: float, steps: int,
                   updates: int = 3) -> Optional[float]:
    """The most a log prior precision could move over the last ``updates`` marglik updates under the
    protocol's schedule: Adam's nominal step is its learning rate (``|m_hat / sqrt(v_hat)| <= ~1``), so
    an update of ``steps`` hypersteps after ``e`` completed epochs moves a tensor by at most
    ``steps * hyper_lr * factor(e)`` (``factor``: the cosine of ``hyper.schedule=cosine``,
    :func:`marglik.tuning.schedules.hyper_lr_factor`). A movement at this bound means some precision was
    still pushed the same way at every hyperstep: it had not reached a stationary point, and the small
    number is the schedule's; a movement well below it means the pushes weakened or changed sign."""
    idx = update_rows(history)
    if len(idx) < updates:
        return None
    trainer = SimpleNamespace(epochs=epochs)
    hyper = SimpleNamespace(schedule="cosine", burn_in=burn_in)
    completed = [int(history["epoch"][i]) - 1 for i in idx[-updates:]]  # the update after epoch e runs at e - 1
    return sum(steps * hyper_lr * hyper_lr_factor(trainer, hyper, e) for e in completed)


def time_split(history: Dict[str, List[Any]]) -> Dict[str, float]:
    """Seconds of MAP training and of marglik updates (hypersteps and selection values)."""
    ep, hy = history.get("epoch_seconds") or [], history.get("hyper_seconds") or []
    marglik = sum(h or 0.0 for h in hy)
    return {"train_seconds": sum(e or 0.0 for e in ep) - marglik, "marglik_seconds": marglik}


def finish(rec: Dict[str, Any]) -> Dict[str, Any]:
    """Derived numbers of one record (convergence, time split), kept in the JSON."""
    if "error" not in rec:
        rec["convergence"] = convergence(rec["history"])
        rec["time_split"] = time_split(rec["history"])
    return rec
