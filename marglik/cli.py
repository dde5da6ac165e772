"""Command line entry point: ``marglik [overrides...]`` / ``python -m marglik [overrides...]``.

Built on Hydra; the configs live in the package (``marglik/conf``, also reachable as the
top-level ``configs/``), so the console script works from any directory and from a
non-editable install. Config groups and the fixed override paths::

    data=digits|cifar10|mnist|fashion_mnist   data.rotation=<deg> data.translation=<px> data.train_size=<n>
    model=cnn|mlp|wrn16_4|vit   model.<that model's own options>
    curvature.approx=expand|reduce  curvature.copies_approx=expand|reduce  curvature.fisher_type=type-2|mc|empirical  curvature.mc_samples=<n>
    curvature.separate_bias=true|false|null
    hyper.augmentation=true|false  hyper.prior_structure=scalar|layerwise  hyper.lr=  hyper.aug_lr=
    hyper.steps=  hyper.frequency=  hyper.burn_in=  hyper.n_samples=  hyper.marglik_batches=
    hyper.selection=full|subset  hyper.selection_size=<n>
    trainer.epochs=<n> trainer.batch_size= trainer.lr= trainer.optimizer=adam|sgd
    trainer.device=auto|cpu|cuda  trainer.seed=<n>  trainer.resume=auto|never|<run dir>
    logger.mode=offline|online|disabled  logger.project=  logger.group=

Outputs go to the Hydra run directory (``outputs/<date>/<time>_<data>_<approx>-<copies_approx>[-sepbias]``; set it with
``hydra.run.dir=...``): ``summary.json``, ``history.csv``, ``curves.png``, ``checkpoints/``,
``config.json``, Hydra's ``.hydra/`` and the log. Re-running into the same ``hydra.run.dir``
resumes an interrupted run (``trainer.resume=auto``).

Before Hydra runs, the overrides are composed and checked against the typed schema
(:mod:`marglik.cli_config`): a bad key, type or value prints one line
``marglik: config error: <key>=<value>: <problem>; allowed: <...>`` and exits with status 2
(``HYDRA_FULL_ERROR=1`` raises it with the traceback instead). ``marglik --help`` is generated
from the schema.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .launch import is_main_process, prepare_overrides
from .tuning import Config, tune
from .tuning.checkpoint import CheckpointError
from .tuning.config import ConfigError

log = logging.getLogger("marglik")


def run_from_config(cfg: DictConfig, run_dir: Optional[str] = None) -> dict:
    """Run one tuning job from a Hydra/OmegaConf config; returns the summary."""
    container = OmegaConf.to_container(cfg, resolve=True)
    config = Config.from_dict(container)  # type: ignore[arg-type]
    if run_dir is None:
        run_dir = HydraConfig.get().runtime.output_dir
    return tune(config, run_dir)


def _config_error(err: Exception) -> NoReturn:
    """One line on stderr and exit status 2 (the traceback only with ``HYDRA_FULL_ERROR=1``):
    ``marglik: config error: ...`` for a :class:`ConfigError`, ``marglik: error: ...`` for a folder
    or checkpoint problem."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    kind = "config error" if isinstance(err, ConfigError) else "error"
    print(f"marglik: {kind}: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> Any:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run_from_config(cfg, run_dir)
    except (ConfigError, PermissionError, CheckpointError) as err:  # named in one line; a ConfigError here
        _config_error(err)  # is e.g. a multirun job's, whose overrides are not checked up front
    short = {k: summary[k] for k in ("test_accuracy", "test_nll", "log_marglik", "approx", "copies_approx", "seconds",
                                     "seconds_per_marglik_step")}
    short["augmentation"] = {k: round(v, 3) for k, v in summary["augmentation"].items()}
    log.info("summary: %s", json.dumps(short))
    if is_main_process():
        written = [f for f in ("summary.json", "history.csv", "curves.png") if (Path(run_dir) / f).is_file()]
        print(f"marglik: wrote {', '.join(written)} to {run_dir}", file=sys.stderr)
        print(json.dumps(short, indent=1), file=sys.stderr)
    return summary["log_marglik"]  # objective for Hydra sweepers


def _precheck(argv: List[str]) -> None:
    """Compose and check the overrides of a single run before Hydra starts it (see module docstring)."""
    from hydra._internal.utils import get_args_parser

    from .cli_config import check_overrides

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # a malformed Hydra flag: Hydra reports it
        return
    if (args.multirun or args.hydra_help or args.info or args.shell_completion or args.config_path
            or args.config_dir or args.config_name or args.experimental_rerun):
        return  # sweeps / other config sources: each job is checked when it starts
    try:
        check_overrides(args.overrides)
    except ConfigError as err:
        _config_error(err)


def main() -> None:
    """Console script ``marglik``."""
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        from .cli_config import help_text

        print(help_text())
        return
    _precheck(argv)  # config errors first: nothing is created for a bad config
    sys.argv[1:] = prepare_overrides(argv)  # resume dir, ranks, writable run dir
    _hydra_main()


if __name__ == "__main__":
    main()
