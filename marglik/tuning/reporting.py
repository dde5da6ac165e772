"""Run outputs: ``history.csv`` (one row per epoch), ``summary.json`` and ``curves.png``.

``summary.json`` has one schema, :class:`RunSummary`: every run writes the same keys with the same
JSON types (``null`` only where a field is ``Optional``, never ``NaN``). A new summary field must
be added there, or :func:`summary_record` rejects it.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union


def _clean(v: Any) -> Any:
    """JSON-safe value: non-finite floats become ``None``; tensors / numpy scalars become Python."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


@dataclass
class RunSummary:
    """The fields of ``summary.json`` and their types (``Optional``: ``null`` when not available)."""

    test_accuracy: Optional[float]  #: of the reported model (``final_model``)
    test_nll: Optional[float]
    #: selection value (``selection_estimator``) of the reported model; null when no marglik update ran
    log_marglik: Optional[float]
    log_marglik_per_example: Optional[float]
    prior_precision: List[float]  #: current (last) prior precision: 1 entry (scalar) or one per tensor
    #: the same by trainable parameter name (``{"all": value}`` for a scalar prior)
    prior_precision_by_name: Dict[str, float]
    augmentation: Dict[str, float]  #: learned ranges of the reported model (see augmentation_units)
    approx: str  #: curvature.approx (positions)
    copies_approx: Optional[str]  #: curvature.copies_approx (augmented copies; null: as approx)
    backend: str  #: curvature.backend (marglik or a laplace-torch peer)
    structure: str  #: curvature.structure (kron | diag)
    separate_bias: bool  #: separate weight and bias Kronecker blocks (curvature.separate_bias resolved)
    world_size: int  #: processes of a data-parallel (torchrun) run; 1 otherwise
    seconds: float  #: training seconds of the whole run, over all its segments (resumes)
    seconds_this_segment: float  #: training seconds of the segment that wrote this summary
    segments: int  #: processes the run took: 1, plus one per resume
    seconds_per_marglik_step: Optional[float]
    seconds_per_cached_hyperstep: Optional[float]
    seconds_per_selection: Optional[float]  #: one selection value (its Laplace fit included)
    n_laplace_fits: int  #: Laplace fits of the hypersteps (selection values not counted: seconds_per_selection)
    n_hypersteps: int
    marglik_updates: int  #: marginal-likelihood updates that ran (0: no tuning happened)
    #: where the time went (MAP steps, hypersteps and their fit / log det / gradient, selection values,
    #: evaluation) and the same in standard trainings (:func:`marglik.tuning.cost.cost_record`)
    cost: Dict[str, Any]
    fisher_type: str
    prior_structure: str
    augmentation_learned: bool
    augmentation_units: Dict[str, str]
    final_model: str  #: "best" (best-marglik checkpoint) or "last"
    best_epoch: Optional[int]  #: epoch of the best selection value (argmax); null when no update ran
    #: the last model's test_accuracy, test_nll, log_marglik (selection value), hyperstep_log_marglik,
    #: augmentation, prior_precision
    last: Dict[str, Any]
    epochs: int
    train_size: int
    test_size: int
    data: str
    rotation: float
    translation: float
    model: str
    num_params: int
    seed: int
    device: str
    rollbacks: int  #: number of rollbacks (as the history column)
    rollback_events: List[Dict[str, Any]]  #: one record per rollback (epoch, kind, value, where, action)
    marglik_estimator: str  #: the data of a hyperstep's estimate (hyper.marglik_batches)
    #: the fixed estimator of log_marglik, best_epoch and the history's log_marglik column (hyper.selection)
    selection_estimator: str
    #: problems of the configuration (e.g. that no tuning happens with this schedule) and signs that the
    #: run went wrong (rollbacks, training that did not learn, chance accuracy, an absurd log marglik;
    #: :mod:`marglik.tuning.diagnosis`)
    warnings: List[str]


def _coerce(name: str, tp: Any, value: Any) -> Any:
    optional = typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    value = _clean(value.value if isinstance(value, enum.Enum) else value)
    if value is None:
        if optional:
            return None
        raise TypeError(f"summary field {name!r} is null but declared {tp}")
    origin = typing.get_origin(tp) or tp
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return str(value) if tp is str else value
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp) or (Any,)
        return [v if item is Any else _coerce(name, item, v) for v in value]
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): (v if item is Any else _coerce(name, item, v)) for k, v in value.items()}
    raise TypeError(f"summary field {name!r} = {value!r} is not of the declared type {tp}")


_SUMMARY_TYPES = typing.get_type_hints(RunSummary)


def summary_record(values: Dict[str, Any]) -> Dict[str, Any]:
    """A summary checked against :class:`RunSummary`, the one schema of ``summary.json``.

    Args:
        values: one value per :class:`RunSummary` field.

    Returns:
        The values in field order, of the declared types (ints to floats where a float is
        declared, non-finite floats to ``None``, enums to strings).

    Raises:
        TypeError: a missing or unknown field, or a value not of its declared type.
    """
    names = [f.name for f in dataclasses.fields(RunSummary)]
    extra, missing = sorted(set(values) - set(names)), sorted(set(names) - set(values))
    if extra or missing:
        raise TypeError(f"summary fields not matching RunSummary: unknown {extra}, missing {missing}")
    return {n: _coerce(n, _SUMMARY_TYPES[n], values[n]) for n in names}


def write_json(obj: Dict[str, Any], path: Union[str, Path]) -> None:
    """Write ``obj`` as indented JSON (non-finite floats as ``null``, tensors as lists).

    Args:
        obj: the data.
        path: the file.
    """
    Path(path).write_text(json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def write_history(history: Sequence[Dict[str, Any]], path: Union[str, Path]) -> None:
    """CSV with the union of the rows' keys as columns (first-seen order); missing cells empty.

    Written to a temporary file and renamed over ``path``: a kill mid-write leaves the previous
    complete file.

    Args:
        history: one dict per epoch.
        path: the CSV file.
    """
    cols: List[str] = []
    for row in history:
        for k in row:
            if k not in cols:
                cols.append(k)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if _clean(row.get(k)) is None else row.get(k)) for k in cols})
    os.replace(tmp, path)


def read_history(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """Read a ``history.csv``.

    Args:
        path: the CSV file.

    Returns:
        One dict per row, numbers parsed as floats, empty cells as ``None``.
    """
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for k, v in row.items():
                if v == "":
                    parsed[k] = None
                else:
                    try:
                        parsed[k] = float(v)
                    except ValueError:
                        parsed[k] = v
            out.append(parsed)
    return out


def make_figure(
    history: Sequence[Dict[str, Any]],
    title: str = "",
    burn_in: Optional[int] = None,
    reported_epoch: Optional[int] = None,
    reported_label: str = "reported (best selection value)",
):
    """The figure of ``curves.png``: five panels over epochs -- log marglik per example, accuracy,
    prior precision (mean with min-max band, log scale), rotation range (degrees), other ranges.

    Every panel shades the burn-in (epochs ``<= burn_in``: MAP training only, no marglik update)
    and marks the reported epoch (the best-marglik checkpoint, or the last epoch) with a dashed line.

    Args:
        history: one dict per epoch (the columns of ``history.csv``).
        title: the figure title.
        burn_in: epochs to shade (``None``: none).
        reported_epoch: epoch to mark (``None``: none).
        reported_label: the mark's legend label.

    Returns:
        The matplotlib figure (the caller saves and closes it).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def series(key: str):
        xs, ys = [], []
        for row in history:
            v = row.get(key)
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                xs.append(row["epoch"])
                ys.append(v)
        return xs, ys

    fig, axes = plt.subplots(1, 5, figsize=(21, 3.8))
    ax = axes[0]
    xs, ys = series("log_marglik_per_example")
    ax.plot(xs, ys, marker=".", label="selection value / N")
    hx, hy = series("hyperstep_log_marglik_per_example")
    if hx:
        ax.plot(hx, hy, ls=":", marker="x", ms=3, alpha=0.7, label="hyperstep estimate / N")
    if not xs:
        ax.text(0.5, 0.5, "no marginal-likelihood update ran", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("log marginal likelihood / N")
    ax = axes[1]
    ax.plot(*series("train_acc"), label="train")
    ax.plot(*series("test_acc"), marker=".", label="test")
    ax.set_title("accuracy")
    ax = axes[2]
    xs, mean = series("prior_prec_mean")
    ax.plot(xs, mean, color="C2", label="mean")
    _, lo = series("prior_prec_min")
    _, hi = series("prior_prec_max")
    if len(lo) == len(hi) == len(xs) and xs:
        ax.fill_between(xs, lo, hi, color="C2", alpha=0.25, label="min-max over tensors")
    if xs and min(lo or mean) > 0:
        ax.set_yscale("log")
    ax.set_title("prior precision")
    ax = axes[3]
    ax.plot(*series("aug_rotation"), color="C3")
    ax.set_title("learned rotation range (degrees)")
    ax = axes[4]
    keys = [k for k in (history[0].keys() if history else []) if k.startswith("aug_") and k != "aug_rotation"]
    for k in keys:
        ax.plot(*series(k), label=k[4:])
    ax.set_title("other ranges (translation: px)")
    if not keys:
        ax.text(0.5, 0.5, "no other generators learned", ha="center", va="center", transform=ax.transAxes)
    for i, ax in enumerate(axes):
        ax.set_xlabel("epoch")
        if burn_in:
            ax.axvspan(0.5, burn_in + 0.5, color="0.85", zorder=0, label="burn-in" if i == 0 else None)
        if reported_epoch is not None:
            ax.axvline(reported_epoch, color="k", ls="--", lw=1, label=reported_label if i == 0 else None)
    for ax in axes[:3]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if keys:
        axes[4].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(history: Sequence[Dict[str, Any]], path: Union[str, Path], title: str = "", **marks: Any) -> None:
    """Write :func:`make_figure` to ``path``.

    Args:
        history: one dict per epoch.
        path: the image file.
        title: the figure title.
        **marks: ``burn_in``, ``reported_epoch``, ``reported_label`` of :func:`make_figure`.
    """
    import matplotlib.pyplot as plt

    fig = make_figure(history, title, **marks)
    fig.savefig(path, dpi=100)
    plt.close(fig)
