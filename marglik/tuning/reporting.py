"""Run outputs: ``history.csv`` (one row per epoch), ``summary.json`` and ``curves.png``."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union


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


def write_json(obj: Dict[str, Any], path: Union[str, Path]) -> None:
    Path(path).write_text(json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def write_history(history: Sequence[Dict[str, Any]], path: Union[str, Path]) -> None:
    """CSV with the union of the rows' keys as columns (first-seen order); missing cells empty.

    Written to a temporary file and renamed over ``path``: a kill mid-write leaves the previous
    complete file."""
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
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
    os.replace(tmp, path)


def read_history(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """Rows of a ``history.csv`` with numbers parsed (empty cells -> ``None``)."""
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


def plot_curves(history: Sequence[Dict[str, Any]], path: Union[str, Path], title: str = "") -> None:
    """Four panels over epochs: log marglik (per example), accuracy, rotation range (degrees) and
    the other augmentation ranges."""
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

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    ax = axes[0]
    ax.plot(*series("log_marglik_per_example"), marker=".", label="log marglik / N")
    ax.set_title("log marginal likelihood / N")
    ax.set_xlabel("epoch")
    ax = axes[1]
    ax.plot(*series("train_acc"), label="train")
    ax.plot(*series("test_acc"), marker=".", label="test")
    ax.set_title("accuracy")
    ax.set_xlabel("epoch")
    ax.legend()
    ax = axes[2]
    ax.plot(*series("aug_rotation"), color="C3")
    ax.set_title("learned rotation range (degrees)")
    ax.set_xlabel("epoch")
    ax = axes[3]
    keys = [k for k in (history[0].keys() if history else []) if k.startswith("aug_") and k != "aug_rotation"]
    for k in keys:
        ax.plot(*series(k), label=k[4:])
    ax.set_title("other ranges (translation: px)")
    ax.set_xlabel("epoch")
    if keys:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no other generators learned", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
