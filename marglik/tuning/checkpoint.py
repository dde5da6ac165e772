"""Checkpoints of a tuning run: atomic files, RNG states, in-memory snapshots for rollback.

A checkpoint is a plain dict (see :meth:`marglik.tuning.loop.MarglikTuner.state_dict`) holding
everything the run depends on: model, augmentation and prior parameters, both optimizers, the
lr scales, the epoch, the history, every random number generator (torch CPU/CUDA, numpy,
Python, and the run's own ``torch.Generator`` streams) and the resolved config. Resuming from the
file therefore continues the run exactly as if it had not been interrupted (on the same device
type; CUDA kernels may be nondeterministic).

Faults: a run keeps its last two epoch checkpoints (``last.ckpt``, ``prev.ckpt``); an unreadable
one is reported by path and the next older one is used (:func:`load_resume_state`), and the run
and checkpoint folders are probed for writing before training (:func:`check_writable`).
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

LAST = "last.ckpt"
PREV = "prev.ckpt"  #: the good checkpoint before ``last.ckpt`` (the fallback if ``last`` is corrupt)
BEST = "best.ckpt"
CKPT_DIR = "checkpoints"
#: keys every run checkpoint has; a file without them is not a usable resume point
REQUIRED_KEYS = ("epoch", "model", "history", "rng", "config")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a run checkpoint)."""


def rng_state(generators: Dict[str, torch.Generator]) -> Dict[str, Any]:
    """Snapshot of the global RNGs and of the named generators.

    Args:
        generators: the run's named streams (:func:`marglik.tuning.seeds.run_generators`).

    Returns:
        ``{"torch", "numpy", "python", "generators"[, "cuda"]}`` states (CPU tensors / tuples).
    """
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
    """Restore a :func:`rng_state` snapshot (CUDA streams only where the device count matches).

    Args:
        state: the snapshot.
        generators: the named streams to set (a name missing from ``state`` is left as it is).
    """
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
    """Deep copy with every tensor detached and cloned.

    Args:
        obj: tensors, dicts, lists, tuples and other deep-copyable values, nested.

    Returns:
        A snapshot unaffected by later in-place updates of ``obj``.
    """
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: detach_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [detach_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(detach_copy(v) for v in obj)
    return copy.deepcopy(obj)


def save(state: Dict[str, Any], path: Union[str, Path], keep_previous: bool = False) -> None:
    """``torch.save`` to ``<path>.tmp`` (flushed to disk), then an atomic rename: a crash mid-write
    never leaves a truncated checkpoint behind.

    With ``keep_previous`` the file being replaced is first renamed to ``prev.ckpt`` in the same
    folder, so the last two good checkpoints survive (a crash between the two renames leaves
    ``prev.ckpt`` and ``last.ckpt.tmp``; :func:`resume_candidates` then falls back to ``prev``).

    Args:
        state: what to save (``torch.save``-able).
        path: the checkpoint file (its folder is created).
        keep_previous: keep the replaced file as ``prev.ckpt``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.is_file():
        os.replace(path, path.with_name(PREV))
    os.replace(tmp, path)


def load(path: Union[str, Path], map_location: Any = "cpu", required: Sequence[str] = REQUIRED_KEYS) -> Dict[str, Any]:
    """Read a checkpoint.

    Args:
        path: the checkpoint file.
        map_location: as for ``torch.load``.
        required: keys it must have (default: a run checkpoint's; ``()`` for ``best.ckpt``).

    Returns:
        The saved dict.

    Raises:
        CheckpointError: naming ``path``, if it is truncated, corrupt or lacks a ``required`` key.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, I/O error
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt: {type(e).__name__}: {e})") from e
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a marglik run checkpoint (missing {missing})")
    return state


def _is_off(spec: Optional[str]) -> bool:
    return spec is None or str(spec).lower() in ("never", "none", "false", "")


def resume_candidates(spec: Optional[str], run_dir: Union[str, Path]) -> List[Path]:
    """Checkpoint files to try for ``trainer.resume``, newest first (the caller loads the first good one).

    * ``None`` / ``"never"``: none (start fresh).
    * ``"auto"``: ``<run_dir>/checkpoints/last.ckpt`` then ``prev.ckpt``, those that exist
      (re-running into the same ``hydra.run.dir`` resumes); none: start fresh.
    * a run directory: its ``checkpoints/last.ckpt`` then ``prev.ckpt`` (``FileNotFoundError`` if
      it has neither).
    * a checkpoint file: that file, then ``prev.ckpt`` beside it if the file is ``last.ckpt``.

    Args:
        spec: ``trainer.resume``.
        run_dir: this run's directory.

    Returns:
        Existing checkpoint files, newest first (empty: start fresh).

    Raises:
        FileNotFoundError: ``spec`` names a run directory without checkpoints, or no such path.
    """
    if _is_off(spec):
        return []
    if str(spec).lower() == "auto":
        d = Path(run_dir) / CKPT_DIR
        return [p for p in (d / LAST, d / PREV) if p.is_file()]
    p = Path(str(spec)).expanduser()
    if p.is_dir():
        for d in (p / CKPT_DIR, p):
            found = [c for c in (d / LAST, d / PREV) if c.is_file()]
            if found:
                return found
        raise FileNotFoundError(f"trainer.resume={spec!r}: no {CKPT_DIR}/{LAST} or {CKPT_DIR}/{PREV} in that directory")
    if not p.is_file():
        raise FileNotFoundError(f"trainer.resume={spec!r}: no such checkpoint file or run directory")
    prev = p.with_name(PREV)
    return [p, prev] if p.name == LAST and prev.is_file() else [p]


def find_checkpoint(spec: Optional[str], run_dir: Union[str, Path]) -> Optional[Path]:
    """The newest checkpoint ``trainer.resume`` points at, without reading it.

    Args:
        spec: ``trainer.resume``.
        run_dir: this run's directory.

    Returns:
        The first of :func:`resume_candidates`, or ``None``.

    Raises:
        FileNotFoundError: as :func:`resume_candidates`.
    """
    cands = resume_candidates(spec, run_dir)
    return cands[0] if cands else None


def load_resume_state(
    spec: Optional[str], run_dir: Union[str, Path], report: Callable[[str], None]
) -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """Load the newest good checkpoint for ``trainer.resume``: ``(state, path)`` or ``(None, None)``.

    A candidate that cannot be read is reported (by path) through ``report`` and the next one is
    tried; if none is good the run starts fresh, saying so (``resume=auto``), or, for an explicit
    ``trainer.resume=<path>``, :class:`CheckpointError` lists the files that failed.

    Args:
        spec: ``trainer.resume``.
        run_dir: this run's directory.
        report: called with one line per problem.

    Returns:
        ``(state, path)`` of the checkpoint loaded (on the CPU), or ``(None, None)``.

    Raises:
        CheckpointError: an explicit ``spec`` whose candidates are all unreadable.
        FileNotFoundError: as :func:`resume_candidates`.
    """
    cands = resume_candidates(spec, run_dir)
    failed = []
    for i, path in enumerate(cands):
        try:
            return load(path, map_location="cpu"), path  # RNG states must stay on the CPU
        except CheckpointError as e:
            failed.append(str(e))
            nxt = f"falling back to {cands[i + 1]}" if i + 1 < len(cands) else "no older good checkpoint"
            report(f"{e}; {nxt}")
    if failed and str(spec).lower() != "auto":
        raise CheckpointError("cannot resume: " + "; ".join(failed))
    if failed:
        report(f"no readable checkpoint in {Path(run_dir) / CKPT_DIR}: starting this run from epoch 0")
    return None, None


def check_writable(path: Union[str, Path], what: str) -> None:
    """Create folder ``path`` if needed and write/delete a probe file in it; ``PermissionError``
    naming ``path`` (and ``what`` it is for) otherwise. Run before training, so an unwritable
    output folder fails at once instead of after the first epoch.

    Args:
        path: the folder.
        what: what it is for, for the message (e.g. ``"run directory"``).

    Raises:
        PermissionError: the folder cannot be created or written.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or e
        raise PermissionError(
            f"the {what} {path} is not writable ({why}); choose another one "
            f"(hydra.run.dir=... on the command line, run_dir in Python)"
        ) from e
