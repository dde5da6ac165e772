"""Command line entry point: ``marglik [overrides...]`` / ``python -m marglik [overrides...]``.

Built on Hydra; the configs live in the package (``marglik/conf``, also reachable as the
top-level ``configs/``), so the console script works from any directory and from a
non-editable install. Config groups and the fixed override paths::

    data=digits|cifar10|mnist|fashion_mnist   data.rotation=<deg> data.translation=<px> data.train_size=<n>
    model=cnn|mlp|wrn16_4
    curvature.approx=expand|reduce  curvature.copies_approx=expand|reduce  curvature.fisher_type=type-2|mc|empirical  curvature.mc_samples=<n>
    hyper.augmentation=true|false  hyper.prior_structure=scalar|layerwise  hyper.lr=  hyper.aug_lr=
    hyper.steps=  hyper.frequency=  hyper.burn_in=  hyper.n_samples=  hyper.marglik_batches=
    trainer.epochs=<n> trainer.batch_size= trainer.lr= trainer.optimizer=adam|sgd
    trainer.device=auto|cpu|cuda  trainer.seed=<n>  trainer.resume=auto|never|<run dir>
    logger.mode=offline|online|disabled  logger.project=  logger.group=

Outputs go to the Hydra run directory (``outputs/<date>/<time>_<data>_<approx>-<copies_approx>``; set it with
``hydra.run.dir=...``): ``summary.json``, ``history.csv``, ``curves.png``, ``checkpoints/``,
``config.json``, Hydra's ``.hydra/`` and the log. Re-running into the same ``hydra.run.dir``
resumes an interrupted run (``trainer.resume=auto``).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .tuning import Config, tune

log = logging.getLogger("marglik")


def run_from_config(cfg: DictConfig, run_dir: Optional[str] = None) -> dict:
    """Run one tuning job from a Hydra/OmegaConf config; returns the summary."""
    container = OmegaConf.to_container(cfg, resolve=True)
    config = Config.from_dict(container)  # type: ignore[arg-type]
    if run_dir is None:
        run_dir = HydraConfig.get().runtime.output_dir
    return tune(config, run_dir)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> Any:
    run_dir = HydraConfig.get().runtime.output_dir
    summary = run_from_config(cfg, run_dir)
    short = {k: summary[k] for k in ("test_accuracy", "test_nll", "log_marglik", "approx", "copies_approx", "seconds",
                                     "seconds_per_marglik_step")}
    short["augmentation"] = {k: round(v, 3) for k, v in summary["augmentation"].items()}
    log.info("summary: %s", json.dumps(short))
    print(f"marglik: wrote summary.json, history.csv, curves.png to {run_dir}", file=sys.stderr)
    print(json.dumps(short, indent=1), file=sys.stderr)
    return summary["log_marglik"]  # objective for Hydra sweepers


def main() -> None:
    """Console script ``marglik``."""
    _hydra_main()


if __name__ == "__main__":
    main()
