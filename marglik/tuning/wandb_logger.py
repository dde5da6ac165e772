"""Weights & Biases logging that never breaks a run.

* ``logger.mode``: ``offline`` (default; files under ``<run_dir>/wandb``, sync later with
  ``wandb sync``), ``online`` or ``disabled``. ``WANDB_MODE`` in the environment wins.
* Runs are grouped (``logger.group``, default derived from data / model / augmentation / prior
  structure but *not* from the K-FAC approximation or seed), so expand and reduce runs of the same
  setting appear side by side in one dashboard group; ``job_type`` names the curvature
  (:func:`marglik.tuning.backends.curvature_label`: ``marglik-expand-reduce`` (K-FAC on positions,
  then on augmented copies), ``curvlinops-kron-expand``, ``backpack-diag``, ...) and the tags
  ``backend:``/``structure:``/``approx:``/``copies_approx:`` its parts.
* If wandb is not installed, or ``wandb.init`` / ``log`` fails (no network, no API key, ...), a
  warning is printed once and the run continues without it.
* Run names are unique: the default is ``<approx>-s<seed>-<run id>``; the id is chosen by the
  tuner and kept in its checkpoint, so a resumed run continues the same W&B run
  (``resume="allow"``).
* :meth:`WandbLogger.finish` returns, for an offline run, where its files are and the
  ``wandb sync`` command that uploads them.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from .backends import curvature_label, resolved_separate_bias

log = logging.getLogger(__name__)


def curvature_tags(curvature: Dict[str, Any]) -> List[str]:
    """W&B tags naming the curvature: ``backend:<b>``, ``structure:<s>``, (Kronecker only)
    ``approx:<a>`` and ``bias:joint|separate`` (``curvature.separate_bias``), and (marglik only)
    ``copies_approx:<c>``.

    Args:
        curvature: the ``curvature`` section of a config dict.

    Returns:
        The tags.
    """
    structure, backend = curvature.get("structure", "kron"), curvature.get("backend", "marglik")
    tags = [f"backend:{backend}", f"structure:{structure}"]
    if structure == "kron":
        tags.append(f"approx:{curvature['approx']}")
        tags.append("bias:" + ("separate" if resolved_separate_bias(curvature) else "joint"))
    if backend == "marglik":
        tags.append(f"copies_approx:{curvature.get('copies_approx') or curvature['approx']}")
    return tags


def default_group(cfg: Dict[str, Any]) -> str:
    """The W&B group of a run: what its data, model and tuning set-up are (not its curvature).

    Args:
        cfg: a config dict (:meth:`marglik.tuning.Config.to_dict`).

    Returns:
        e.g. ``digits-rot90-n200-cnn-aug8-layerwise``.
    """
    d, h = cfg["data"], cfg["hyper"]
    parts = [d["name"]]
    if d.get("rotation"):
        parts.append(f"rot{d['rotation']:g}")
    if d.get("translation"):
        parts.append(f"tr{d['translation']:g}")
    if d.get("train_size"):
        parts.append(f"n{d['train_size']}")
    parts.append(cfg["model"]["name"])
    parts.append(f"aug{h['n_samples']}" if h["augmentation"] else "noaug")
    parts.append(h["prior_structure"])
    return "-".join(parts)


class WandbLogger:
    """Thin wrapper: ``log(metrics, step)``, ``summary(dict)``, ``finish()``; all no-ops when off."""

    def __init__(
        self, cfg: Dict[str, Any], run_dir: str, resume_id: Optional[str] = None, mode: Optional[str] = None
    ) -> None:
        self.run = None
        self.name = None
        self.run_dir = run_dir
        self.offline_dirs: list = []
        lc = cfg["logger"]
        mode = mode or os.environ.get("WANDB_MODE") or lc.get("mode", "offline")
        if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
            mode = "disabled"
        mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
        self.mode = mode
        if mode == "disabled":
            return
        try:
            import wandb
        except Exception as e:  # not installed / broken install
            warnings.warn(f"wandb unavailable ({e}); continuing without it", stacklevel=2)
            return
        self._wandb = wandb
        if mode == "offline" and resume_id and offline_run_dirs(run_dir, resume_id):
            # W&B names an offline segment's folder offline-run-<YYYYmmdd_HHMMSS>-<id>: a resume within
            # the same second as the previous segment would write into (and clobber) that folder
            time.sleep(1.0 - time.time() % 1.0 + 0.01)
        try:
            self.run = wandb.init(
                project=lc.get("project") or "marglik",
                entity=lc.get("entity"),
                group=lc.get("group") or default_group(cfg),
                job_type=curvature_label(cfg["curvature"]),
                name=lc.get("name") or default_name(cfg, resume_id),
                tags=list(lc.get("tags") or []) + curvature_tags(cfg["curvature"]),
                config=cfg,
                dir=run_dir,
                mode=mode,
                id=resume_id,
                resume="allow" if resume_id else None,
                reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:
            warnings.warn(f"wandb.init failed in mode {mode!r} ({type(e).__name__}: {e}); continuing without it", stacklevel=2)
            self.run = None
        self.name: Optional[str] = getattr(self.run, "name", None)  #: the W&B run name (None: no run)

    @property
    def run_id(self) -> Optional[str]:
        """The W&B run id (``None`` without a run)."""
        return getattr(self.run, "id", None)

    def log(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        """Log one step's metrics (``None`` values left out); a W&B failure disables logging.

        Args:
            metrics: name -> value.
            step: the W&B step (the epoch).
        """
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        except Exception as e:
            warnings.warn(f"wandb.log failed ({e}); disabling wandb for this run", stacklevel=2)
            self.run = None

    def summary(self, values: Dict[str, Any]) -> None:
        """Set the run summary; a nested dict ``k: {kk: v}`` becomes keys ``k/kk``.

        Args:
            values: the run's summary (``summary.json``).
        """
        if self.run is None:
            return
        try:
            flat = {}
            for k, v in values.items():
                if isinstance(v, dict):
                    flat.update({f"{k}/{kk}": vv for kk, vv in v.items()})
                else:
                    flat[k] = v
            self.run.summary.update(flat)
        except Exception as e:
            warnings.warn(f"wandb summary failed ({e})", stacklevel=2)

    def save(self, path: str) -> None:
        """Log a figure file to the run (``.png`` only, as ``curves``; other files are ignored).

        Args:
            path: the file.
        """
        if self.run is None:
            return
        try:
            if path.endswith(".png"):
                self.run.log({"curves": self._wandb.Image(path)})
        except Exception as e:
            warnings.warn(f"wandb image upload failed ({e})", stacklevel=2)

    def finish(self) -> Optional[str]:
        """Close the run.

        Returns:
            For an offline run, a line naming its folder(s) and the ``wandb sync`` command;
            ``None`` otherwise.
        """
        if self.run is None:
            return None
        run_id = self.run_id
        offline = self.mode == "offline"
        try:
            self.run.finish()
        except Exception as e:
            warnings.warn(f"wandb.finish failed ({e})", stacklevel=2)
        self.run = None
        if not offline or not run_id:
            return None
        self.offline_dirs = offline_run_dirs(self.run_dir, run_id)
        if not self.offline_dirs:
            return None
        where = " ".join(shlex.quote(str(d)) for d in self.offline_dirs)
        return (f"W&B offline run {run_id} saved in {where}; upload it with: wandb sync {where}")


def default_name(cfg: Dict[str, Any], run_id: Optional[str]) -> str:
    """``<curvature label>-s<seed>-<run id>`` (e.g. ``marglik-reduce-s0-1a2b3c4d``): unique per run,
    the same for a resumed run.

    Args:
        cfg: a config dict.
        run_id: the W&B run id (``None``: left out).

    Returns:
        The run name.
    """
    base = f"{curvature_label(cfg['curvature'])}-s{cfg['trainer']['seed']}"
    return f"{base}-{run_id}" if run_id else base


def offline_run_dirs(run_dir: str, run_id: str) -> List[Path]:
    """The offline run folders of one W&B run.

    Args:
        run_dir: the marglik run directory.
        run_id: the W&B run id.

    Returns:
        Its folders under ``<run_dir>/wandb`` (one per resumed segment), oldest first.
    """
    root = Path(run_dir) / "wandb"
    return sorted(p for p in root.glob(f"offline-run-*-{run_id}") if p.is_dir())
