"""Checkpoints of a tuning run: atomic files, RNG states, in-memory snapshots for rollback.

A checkpoint is a plain dict of the run's *part states*
(:func:`marglik.tuning.checkpoint_format.pack`; format version
:data:`~marglik.tuning.checkpoint_format.VERSION`): ``{"version", "epoch", "config", "parts": {name: part.state_dict()}}``, with one
entry per part of :meth:`marglik.tuning.parts.Parts.stateful` plus the driver's own ``"run"``
state -- model, prior and augmentation parameters, both optimizers with their lr scales, the
history, the best state, every random number generator (torch CPU/CUDA, numpy, Python, and the
run's own ``torch.Generator`` streams) -- and the resolved config. This module stores and loads
that dict; :mod:`marglik.tuning.checkpoint_format` packs and validates it (``check_parts``) and
never looks inside a part's state, except to ``upgrade`` a version-1 checkpoint (the flat dict
written before the loop was split into parts) to the current layout. Resuming from the file therefore continues the run exactly as if it
had not been interrupted (on the same device type; CUDA kernels may be nondeterministic).

Safety: checkpoints hold tensors and plain data only (dicts, lists, tuples, strings, numbers,
``None``): the config is saved as a plain dict, NumPy's and Python's RNG states as a tensor and
integers. :func:`load` reads them with ``torch.load(weights_only=True)``, whose unpickler builds
nothing but tensors and those types, plus an explicit allow-list (:data:`ALLOWED_GLOBALS`: the
NumPy array reconstructors of the RNG state that checkpoints written before this change hold).
A well-formed file that asks for any other Python object -- which an unrestricted unpickler would
build, possibly running code -- is refused with :class:`UnsafeCheckpointError`, one line naming the
file and the objects it asks for; nothing in it is executed.

Damage: a file that cannot be read at all (empty, truncated, random bytes, overwritten) is a
:class:`DamagedCheckpointError`, never a security refusal: torch's weights-only unpickler reports
both the same way, so :func:`load` tells them apart by reading the file's structure (a zip archive
whose pickle names disallowed globals, or a legacy torch file) without executing it. No message
repeats torch's advice to load with ``weights_only=False``.

Faults: a run keeps its last two epoch checkpoints (``last.ckpt``, ``prev.ckpt``); an unreadable
one is reported by path and the next older one is used (:func:`load_resume_state`), and the run
and checkpoint folders are probed for writing before training (:func:`check_writable`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import UserError

LAST = "last.ckpt"
PREV = "prev.ckpt"  #: the good checkpoint before ``last.ckpt`` (the fallback if ``last`` is corrupt)
BEST = "best.ckpt"
CKPT_DIR = "checkpoints"
#: keys every version-1 run checkpoint has; a file without them is not a usable resume point
REQUIRED_KEYS = ("epoch", "model", "history", "rng", "config")
#: keys every run checkpoint of the current version has (:mod:`marglik.tuning.checkpoint_format`)
REQUIRED_KEYS_V2 = ("version", "epoch", "config", "parts")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: damaged, unsafe, missing, not a run checkpoint, or from
    another configuration."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read: empty, truncated, corrupt or not a torch file."""


class UnsafeCheckpointError(CheckpointError):
    """A well-formed checkpoint file that holds pickled objects outside the allow-list (refused unread)."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """``trainer.resume`` names no checkpoint file, or a run directory without checkpoints."""


class ResumeMismatchError(CheckpointError, ValueError):
    """The configuration of a resumed run differs from its checkpoint's.

    Args:
        path: the checkpoint.
        diff: one ``"key: checkpoint <theirs> vs now <mine>"`` per differing key
            (:meth:`marglik.tuning.config.Config.resume_diff`).
    """

    def __init__(self, path: Union[str, Path], diff: Sequence[str]) -> None:
        self.path, self.diff = Path(path), list(diff)
        super().__init__(
            f"cannot resume from {path}: the configuration differs from the checkpoint's in {len(self.diff)} "
            f"key{'s' if len(self.diff) != 1 else ''}: {'; '.join(self.diff)} (repeat the run's overrides, or "
            "start over with trainer.resume=never or a fresh hydra.run.dir)"
        )


def _numpy_globals() -> List[Any]:
    """NumPy's array reconstructors as pickled in ``np.random.get_state()`` (legacy checkpoints)."""
    import importlib

    out: List[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            out.append(importlib.import_module(mod)._reconstruct)
            break
        except (ImportError, AttributeError):  # pragma: no cover - depends on the NumPy version
            continue
    return out


#: Python objects a checkpoint may ask the unpickler for besides tensors and plain data: only what
#: a legacy NumPy RNG state (a ``uint32`` array) needs. Files written now need none of them.
ALLOWED_GLOBALS: List[Any] = _numpy_globals()


def _numpy_state_plain(state: Tuple[Any, ...]) -> Dict[str, Any]:
    """``np.random.get_state()`` as plain data: the key as an int64 tensor, the rest as numbers."""
    name, key, pos, has_gauss, cached = state
    return {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_tuple(state: Any) -> Tuple[Any, ...]:
    """The inverse of :func:`_numpy_state_plain` (a legacy tuple is returned as it is)."""
    if not isinstance(state, dict):
        return tuple(state)
    key = np.asarray(state["key"].numpy(), dtype=np.uint32)
    return (state["bit_generator"], key, state["pos"], state["has_gauss"], state["cached_gaussian"])


def rng_state(generators: Dict[str, torch.Generator]) -> Dict[str, Any]:
    """Snapshot of the global RNGs and of the named generators.

    Args:
        generators: the run's named streams (:func:`marglik.tuning.seeds.run_generators`).

    Returns:
        ``{"torch", "numpy", "python", "generators"[, "cuda"]}`` states as tensors and plain data
        (NumPy's key as an int64 tensor, Python's state as a tuple of ints), loadable with
        ``weights_only=True``.
    """
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_plain(np.random.get_state()),
        "python": (int(version), tuple(int(v) for v in internal), None if gauss is None else float(gauss)),
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
    np.random.set_state(_numpy_state_tuple(state["numpy"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
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


def load(path: Union[str, Path], map_location: Any = "cpu", required: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Read a checkpoint without running code: ``torch.load(weights_only=True)`` with
    :data:`ALLOWED_GLOBALS` as the only Python objects besides tensors and plain data.

    Args:
        path: the checkpoint file.
        map_location: as for ``torch.load``.
        required: keys it must have (default: a run checkpoint's of the file's version,
            :data:`REQUIRED_KEYS_V2` or :data:`REQUIRED_KEYS`; ``()`` for ``best.ckpt``).

    Returns:
        The saved dict.

    Raises:
        UnsafeCheckpointError: naming ``path`` and the objects it asks for, if it is a well-formed
            torch file that holds any other pickled object (nothing in it is executed).
        DamagedCheckpointError: naming ``path``, if it cannot be read (empty, truncated, corrupt,
            not a torch file).
        CheckpointError: naming ``path``, if it lacks a ``required`` key.
    """
    path = Path(path)
    try:
        with _allowing(ALLOWED_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch reports damage and disallowed objects alike: look at the file itself
        unsafe = _unsafe_names(path) if isinstance(e, pickle.UnpicklingError) else None
        if unsafe is not None:
            raise UnsafeCheckpointError(
                f"checkpoint {path} refused as unsafe: it holds pickled Python objects that are not allowed "
                f"({unsafe}); marglik loads only tensors and plain data, so that loading cannot run code -- "
                "do not resume from a file you do not trust"
            ) from None
        raise DamagedCheckpointError(f"checkpoint {path} is damaged ({_damage(path)}) and cannot be read") from None
    if required is None:
        required = REQUIRED_KEYS_V2 if isinstance(state, dict) and (state.get("version") or 1) >= 2 else REQUIRED_KEYS
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a marglik run checkpoint (missing {missing})")
    return state


def _allowing(allowed: List[Any]) -> ContextManager[Any]:
    """``torch.serialization.safe_globals(allowed)`` (torch >= 2.5); on torch 2.4, which has only
    the process-wide ``add_safe_globals``, that (the same few NumPy reconstructors) and a no-op context."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(allowed)
    torch.serialization.add_safe_globals(allowed)
    return contextlib.nullcontext()


def _unsafe_names(path: Path) -> Optional[str]:
    """The globals a well-formed checkpoint asks for beyond the allowed ones (read from the
    pickle's opcodes, not executed); ``None`` if the file is not well formed or asks for none.

    A zip checkpoint (what ``torch.save`` writes) lists its globals; a legacy (pre-zip) torch file
    is recognised by its leading magic number, but its globals are not listed."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}
    if zipfile.is_zipfile(path):
        try:
            names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
        except Exception:
            return None
        return ", ".join(names) or None
    return "objects of a legacy torch file, not listed" if _is_legacy_torch_file(path) else None


class _NoGlobals(pickle.Unpickler):
    """An unpickler that builds plain values only (any global is an error): safe on any input."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name}")


def _is_legacy_torch_file(path: Path) -> bool:
    """Whether ``path`` starts like a legacy (``_use_new_zipfile_serialization=False``) torch file."""
    try:
        with open(path, "rb") as f:
            return _NoGlobals(f).load() == torch.serialization.MAGIC_NUMBER
    except Exception:
        return False


def _damage(path: Path) -> str:
    """What is wrong with a checkpoint that cannot be read, in words (not torch's message)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"cannot be opened: {e.strerror or type(e).__name__}"
    if size == 0:
        return "empty file"
    if zipfile.is_zipfile(path):
        return f"{size} bytes, a torch archive with corrupt contents"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return f"{size} bytes, a truncated torch archive"
    return f"{size} bytes, not a torch checkpoint: truncated, overwritten or never written by torch.save"


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
        MissingCheckpointError: ``spec`` names a run directory without checkpoints, or no such path
            (a ``FileNotFoundError``).
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
        raise MissingCheckpointError(f"trainer.resume={spec}: no {CKPT_DIR}/{LAST} or {CKPT_DIR}/{PREV} in that "
                                     "directory (trainer.resume=never starts over)")
    if not p.is_file():
        raise MissingCheckpointError(f"trainer.resume={spec}: no such checkpoint file or run directory")
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
        MissingCheckpointError: as :func:`resume_candidates`.
    """
    cands = resume_candidates(spec, run_dir)
    return cands[0] if cands else None


def load_resume_state(
    spec: Optional[str], run_dir: Union[str, Path], report: Callable[[str], None],
    damaged: Optional[List[Path]] = None,
) -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """Load the newest good checkpoint for ``trainer.resume``: ``(state, path)`` or ``(None, None)``.

    A candidate that cannot be read (damaged) is reported (by path) through ``report`` and the next
    one is tried; if none is good the run starts fresh, saying so (``resume=auto``), or, for an
    explicit ``trainer.resume=<path>``, :class:`CheckpointError` lists the files that failed. A candidate
    refused as unsafe (:class:`UnsafeCheckpointError`) stops an explicit resume at once (no
    fallback to an older file); under ``resume=auto`` it is reported and skipped like a corrupt one.

    Args:
        spec: ``trainer.resume``.
        run_dir: this run's directory.
        report: called with one line per problem.
        damaged: if given, each candidate found damaged (:class:`DamagedCheckpointError`) is appended,
            for the caller to move aside once the run starts (nothing is renamed here).

    Returns:
        ``(state, path)`` of the checkpoint loaded (on the CPU, in the current format:
        :func:`marglik.tuning.checkpoint_format.upgrade`), or ``(None, None)``.

    Raises:
        UnsafeCheckpointError: an explicit ``spec`` whose candidate holds disallowed objects.
        CheckpointError: an explicit ``spec`` whose candidates are all unreadable.
        MissingCheckpointError: as :func:`resume_candidates`.
    """
    from .checkpoint_format import upgrade

    cands = resume_candidates(spec, run_dir)
    failed = []
    for i, path in enumerate(cands):
        try:
            return upgrade(load(path, map_location="cpu"), path), path  # RNG states must stay on the CPU
        except CheckpointError as e:
            if isinstance(e, UnsafeCheckpointError) and str(spec).lower() != "auto":
                raise
            if damaged is not None and isinstance(e, DamagedCheckpointError):
                damaged.append(path)
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

