"""Weights & Biases logging that never breaks a run.

* ``logger.mode``: ``offline`` (default; files under ``<run_dir>/wandb``, sync later with
  ``wandb sync``), ``online`` or ``disabled``. ``WANDB_MODE`` in the environment wins.
* Runs are grouped (``logger.group``, default derived from data / model / augmentation / prior
  structure but *not* from the K-FAC approximation or seed), so expand and reduce runs of the same
  setting appear side by side in one dashboard group; ``job_type`` is the approximation,
  ``<approx>-<copies_approx>`` (positions, then augmented copies; see :func:`flavour`).
* If wandb is not installed, or ``wandb.init`` / ``log`` fails (no network, no API key, ...), a
  warning is printed once and the run continues without it.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)


def default_group(cfg: Dict[str, Any]) -> str:
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


def flavour(cfg: Dict[str, Any]) -> str:
    """``"<approx>-<copies_approx>"``, e.g. ``"expand-reduce"`` (K-FAC on positions, then on copies)."""
    c = cfg["curvature"]
    return f"{c['approx']}-{c.get('copies_approx') or c['approx']}"


class WandbLogger:
    """Thin wrapper: ``log(metrics, step)``, ``summary(dict)``, ``finish()``; all no-ops when off."""

    def __init__(self, cfg: Dict[str, Any], run_dir: str, resume_id: Optional[str] = None) -> None:
        self.run = None
        lc = cfg["logger"]
        mode = os.environ.get("WANDB_MODE") or lc.get("mode", "offline")
        if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
            mode = "disabled"
        mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
        self.mode = mode
        if mode == "disabled":
            return
        try:
            import wandb
        except Exception as e:  # not installed / broken install
            warnings.warn(f"wandb unavailable ({e}); continuing without it")
            return
        self._wandb = wandb
        try:
            self.run = wandb.init(
                project=lc.get("project") or "marglik",
                entity=lc.get("entity"),
                group=lc.get("group") or default_group(cfg),
                job_type=flavour(cfg),
                name=lc.get("name") or f"{flavour(cfg)}-s{cfg['trainer']['seed']}",
                tags=list(lc.get("tags") or []),
                config=cfg,
                dir=run_dir,
                mode=mode,
                id=resume_id,
                resume="allow" if resume_id else None,
                reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:
            warnings.warn(f"wandb.init failed in mode {mode!r} ({type(e).__name__}: {e}); continuing without it")
            self.run = None

    @property
    def run_id(self) -> Optional[str]:
        return getattr(self.run, "id", None)

    def log(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        except Exception as e:
            warnings.warn(f"wandb.log failed ({e}); disabling wandb for this run")
            self.run = None

    def summary(self, values: Dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            flat = {}
            for k, v in values.items():
                if isinstance(v, dict):
                    flat.update({f"{k}/{kk}": vv for kk, vv in v.items()})
                elif isinstance(v, list) and len(v) > 1:
                    flat[k] = v
                else:
                    flat[k] = v
            self.run.summary.update(flat)
        except Exception as e:
            warnings.warn(f"wandb summary failed ({e})")

    def save(self, path: str) -> None:
        if self.run is None:
            return
        try:
            if path.endswith(".png"):
                self.run.log({"curves": self._wandb.Image(path)})
        except Exception as e:
            warnings.warn(f"wandb image upload failed ({e})")

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:
            warnings.warn(f"wandb.finish failed ({e})")
        self.run = None
