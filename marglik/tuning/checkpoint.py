"""Checkpoints of a tuning run: atomic files, RNG states, in-memory snapshots for rollback.

A checkpoint is a plain dict (see :meth:`marglik.tuning.loop.MarglikTuner.state_dict`) holding
everything the run depends on: model, augmentation and prior parameters, both optimizers, the
lr scales, the epoch, the history, every random number generator (torch CPU/CUDA, numpy,
Python, and the run's own ``torch.Generator`` streams) and the resolved config. Resuming from the
file therefore continues the run exactly as if it had not been interrupted (on the same device
type; CUDA kernels may be nondeterministic).
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

LAST = "last.ckpt"
BEST = "best.ckpt"
CKPT_DIR = "checkpoints"


def rng_state(generators: Dict[str, torch.Generator]) -> Dict[str, Any]:
    """Snapshot of the global RNGs and of the named generators."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], generators: Dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for k, g in generators.items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:  # different number of devices: CUDA streams cannot be restored exactly
            pass


def detach_copy(obj: Any) -> Any:
    """Deep copy with every tensor cloned (a snapshot unaffected by later in-place updates)."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: detach_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [detach_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(detach_copy(v) for v in obj)
    return copy.deepcopy(obj)


def save(state: Dict[str, Any], path: Union[str, Path]) -> None:
    """``torch.save`` to a temporary file, then an atomic rename: a crash mid-write never leaves a
    truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Union[str, Path], map_location: Any = "cpu") -> Dict[str, Any]:
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def find_checkpoint(spec: Optional[str], run_dir: Union[str, Path]) -> Optional[Path]:
    """Resolve ``trainer.resume``.

    * ``None`` / ``"never"``: no resumption.
    * ``"auto"``: ``<run_dir>/checkpoints/last.ckpt`` if it exists (re-running into the same
      ``hydra.run.dir`` resumes), else start fresh.
    * a path to a checkpoint file, or to a run directory holding ``checkpoints/last.ckpt``: that
      checkpoint (an error if missing).
    """
    if spec is None or str(spec).lower() in ("never", "none", "false", ""):
        return None
    if str(spec).lower() == "auto":
        cand = Path(run_dir) / CKPT_DIR / LAST
        return cand if cand.is_file() else None
    p = Path(spec).expanduser()
    if p.is_dir():
        for cand in (p / CKPT_DIR / LAST, p / LAST):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"trainer.resume={spec!r}: no {CKPT_DIR}/{LAST} in that directory")
    if not p.is_file():
        raise FileNotFoundError(f"trainer.resume={spec!r}: no such checkpoint file or run directory")
    return p
