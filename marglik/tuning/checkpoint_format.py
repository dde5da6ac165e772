"""The format of a run checkpoint: the dict of part states, its version, and the upgrade of old files.

Version 2 (:data:`VERSION`): ``{"version": 2, "epoch": int, "config": dict, "parts": {name:
state}}``, one state per part (:meth:`marglik.tuning.parts.Parts.stateful`: ``model``, ``prior``,
``augmentation``, ``map_step``, ``hyper_step``, ``selection``, ``streams``) plus the driver's
``run`` (epoch, history, rollback events, elapsed seconds, segments, W&B id). Version 1 (no
``version`` key) is the flat dict written before the loop was split into parts; :func:`upgrade`
converts it, so old runs still resume. :func:`pack` and :func:`check_parts` never look inside a
part's state; files are written and read by :mod:`marglik.tuning.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Union

from .checkpoint import CheckpointError, detach_copy

#: the checkpoint format written now (:func:`pack`)
VERSION = 2

def _version(state: Any) -> int:
    return int(state.get("version", 1) or 1) if isinstance(state, dict) else 0


def pack(parts: Dict[str, Dict[str, Any]], epoch: int, config: Dict[str, Any]) -> Dict[str, Any]:
    """A run checkpoint of the current format from the parts' states.

    Args:
        parts: ``{name: part.state_dict()}`` (the driver's own state as ``"run"``).
        epoch: completed epochs (also kept at the top, to be read without the parts).
        config: the run's configuration as plain data.

    Returns:
        ``{"version": VERSION, "epoch", "config", "parts"}``, tensors detached and cloned.
    """
    return detach_copy({"version": VERSION, "epoch": epoch, "config": config, "parts": parts})


def check_parts(state: Dict[str, Any], names: Sequence[str], path: Union[str, Path, None] = None) -> Dict[str, Any]:
    """The part states of a current-format checkpoint, checked to hold every part named.

    Args:
        state: a :func:`pack` (or :func:`upgrade`) dict.
        names: the parts the run needs.
        path: the file, for the message.

    Returns:
        ``state["parts"]``.

    Raises:
        CheckpointError: another version, or a part missing.
    """
    where = f"checkpoint {path}" if path is not None else "the checkpoint"
    if _version(state) != VERSION or not isinstance(state.get("parts"), dict):
        raise CheckpointError(f"{where} has format version {_version(state)}, expected {VERSION} "
                              "(load it through marglik.tuning.checkpoint.upgrade)")
    missing = [n for n in names if n not in state["parts"]]
    if missing:
        raise CheckpointError(f"{where} lacks the state of the parts {missing} (a checkpoint of another kind of run)")
    return state["parts"]


def upgrade(state: Dict[str, Any], path: Union[str, Path, None] = None) -> Dict[str, Any]:
    """A checkpoint in the current format: a version-1 (flat) run checkpoint is converted, a
    current one returned as it is.

    Version 1 held ``epoch, global_step, model, eta, log_prior, map_opt, hyper_opt, lr_scale,
    hyper_lr_scale, rng, history, events, best, timing, last_log_marglik, wandb_id, config`` at
    the top; version 2 holds the same values under the parts that own them.

    Args:
        state: a loaded run checkpoint.
        path: the file, for the message.

    Returns:
        The :func:`pack` layout.

    Raises:
        CheckpointError: a version-1 checkpoint that lacks a key, or an unknown (newer) version.
    """
    version = _version(state)
    if version == VERSION:
        return state
    where = f"checkpoint {path}" if path is not None else "the checkpoint"
    if version != 1:
        raise CheckpointError(f"{where} has format version {version}, which this marglik cannot read "
                              f"(it reads versions 1 to {VERSION})")
    try:
        timing = state["timing"]
        parts = {
            "run": {"epoch": state["epoch"], "history": state["history"], "events": state["events"],
                    "elapsed": timing["elapsed"], "segments": timing.get("segments", 1),
                    "wandb_id": state.get("wandb_id")},
            "model": state["model"],
            "prior": {"log_prior": state["log_prior"]},
            "augmentation": {"eta": state["eta"]},
            "map_step": {"optimizer": state["map_opt"], "global_step": state["global_step"],
                         "lr_scale": state["lr_scale"]},
            "hyper_step": {"optimizer": state["hyper_opt"], "lr_scale": state["hyper_lr_scale"],
                           "step_seconds": timing["marglik_step_seconds"],
                           "cached_step_seconds": timing["cached_step_seconds"], "n_fits": timing["n_fits"]},
            "selection": {"best": state["best"], "last_log_marglik": state["last_log_marglik"],
                          "seconds": timing.get("selection_seconds", [])},
            "streams": state["rng"],
        }
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where} is a version-1 run checkpoint without {e}: it cannot be resumed") from None
    return {"version": VERSION, "epoch": state["epoch"], "config": state["config"], "parts": parts}
