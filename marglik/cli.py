"""Command line entry point: ``marglik [overrides...]`` / ``python -m marglik [overrides...]``.

Built on Hydra; the configs live in the package (``marglik/conf``, also reachable as the
top-level ``configs/``), so the console script works from any directory and from a
non-editable install. Every option, its default and what it allows: ``marglik --help``, generated
from the typed schema (:mod:`marglik.cli_config`), so it cannot drift from the code.

Outputs go to the Hydra run directory (``outputs/<date>/<time>_<data>_<approx>-<copies_approx>[-sepbias]``; set it with
``hydra.run.dir=...``): ``summary.json``, ``history.csv``, ``curves.png``, ``checkpoints/``,
``config.json``, Hydra's ``.hydra/`` and the log. Re-running into the same ``hydra.run.dir``
resumes an interrupted run (``trainer.resume=auto``).

Before Hydra runs, the overrides are composed and checked against the typed schema
(:mod:`marglik.cli_config`): a bad key, type or value prints one line
``marglik: config error: <key>=<value>: <problem>; allowed: <...>`` and exits with status 2.
``marglik --help`` is generated from the schema.

A run directory is a record (:mod:`marglik.run_guard`): when the command names it
(``hydra.run.dir``, ``trainer.resume=<run dir>``) its lock is taken (one process per directory,
:mod:`marglik.tuning.run_lock`) and the resume check runs before Hydra writes there; a command
rejected later puts back what Hydra wrote and removes what it added, and a failed start removes
the folder it made. The command is accepted once the tuner is built (data loaded, checkpoint
matched), just before training.

Exit status: 0 when the run finished (even with warnings: they are printed as
``marglik: warning: ...`` lines and listed in ``summary.json['warnings']``, so that one bad
configuration of a ``-m`` sweep does not stop the others); 2 for any cause the user can fix
(:class:`marglik.errors.UserError`: configuration, device, data, checkpoint, peer backend,
installation; and an unwritable folder), printed as one line ``marglik: [config ]error: ...`` (by
rank 0 only under ``torchrun``); 130 after Ctrl-C, one line ``marglik: interrupted; ... resume
with ...``; 1 with a traceback for anything else (a bug). ``HYDRA_FULL_ERROR=1`` re-raises the
user errors and the interrupt with their tracebacks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, NoReturn, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .errors import UserError, one_line
from .launch import is_main_process, override_value, prepare_overrides
from .run_guard import RunDirGuard, first_existing, hydra_only
from .tuning import Config, MarglikTuner
from .tuning import checkpoint as ckpt
from .tuning.config import ConfigError
from .tuning.device import resolve_device
from .tuning.explain import explain_run

log = logging.getLogger("marglik")
#: how long a rank other than 0 waits before exiting on an error, so that rank 0 prints the job's line
RANK_GRACE_SECONDS = 3.0


def run_from_config(cfg: DictConfig, run_dir: Optional[str] = None,
                    accepted: Optional[Callable[[], None]] = None) -> dict:
    """Run one tuning job from a Hydra/OmegaConf config.

    Args:
        cfg: the composed configuration.
        run_dir: the run directory (default: Hydra's).
        accepted: called once every check that can reject the command has passed (the data are
            loaded, the checkpoint read and matched), just before training starts.

    Returns:
        The summary.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    config = Config.from_dict(container)  # type: ignore[arg-type]
    if run_dir is None:
        run_dir = HydraConfig.get().runtime.output_dir
    tuner = MarglikTuner(config, run_dir)
    if accepted is not None:
        accepted()
    return tuner.fit()


def _user_error(err: BaseException) -> NoReturn:
    """One line on stderr (rank 0 only) and exit status 2; the traceback with ``HYDRA_FULL_ERROR=1``:
    ``marglik: config error: ...`` for a :class:`ConfigError`, ``marglik: error: ...`` for any other
    :class:`UserError` or an unwritable folder."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    if is_main_process():
        print(f"marglik: {getattr(err, 'kind', 'error')}: {one_line(str(err))}", file=sys.stderr, flush=True)
    else:  # torchrun stops the other ranks when one exits: let rank 0 say it first (its line is the job's)
        time.sleep(RANK_GRACE_SECONDS)
    sys.exit(2)


def _interrupted(err: KeyboardInterrupt) -> NoReturn:
    """Ctrl-C: one line with the resume hint the tuner attached (rank 0 only), exit status 130."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    hint = getattr(err, "resume_hint", None)
    if is_main_process():
        print(f"marglik: interrupted; {hint}" if hint else "marglik: interrupted", file=sys.stderr)
    sys.exit(130)


def _report_finished(summary: dict, run_dir: str) -> None:
    """The end of a finished run on stderr: what was written, what was learned, what went wrong."""
    written = [f for f in ("summary.json", "history.csv", "curves.png") if (Path(run_dir) / f).is_file()]
    took = f"training {summary['seconds']:.3g} s"
    if summary["segments"] > 1:
        took += f", {summary['seconds_this_segment']:.3g} s of it in this segment ({summary['segments']} in all)"
    print(f"marglik: wrote {', '.join(written)} to {run_dir} ({took})", file=sys.stderr)
    for line in explain_run(summary):
        print(f"marglik: {line}", file=sys.stderr)
    for warning in summary["warnings"]:
        print(f"marglik: warning: {warning}", file=sys.stderr)


#: the guard of the run directory taken before Hydra started (set by :func:`main`; ``None``: Hydra's
#: timestamped folder or a sweep job, guarded from inside the job)
_GUARD: Optional[RunDirGuard] = None
#: the folder that existed before the command made anything (where removing empty folders stops)
_ANCHOR: Optional[Path] = None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> Any:
    run_dir = HydraConfig.get().runtime.output_dir
    guard = _GUARD
    try:
        if guard is None and is_main_process():  # a folder Hydra just made: removed if the start fails
            fresh = Path(run_dir).is_dir() and hydra_only(Path(run_dir))
            guard = RunDirGuard(run_dir, fresh=fresh, anchor=_ANCHOR if fresh else None)
        try:
            summary = run_from_config(cfg, run_dir, accepted=guard.accept if guard is not None else None)
        finally:
            if guard is not None and guard is not _GUARD:
                guard.close()
    except (UserError, PermissionError) as err:  # named in one line; a ConfigError here is e.g. a
        _user_error(err)  # multirun job's (not checked up front) or one only the machine or the data reveal
    except KeyboardInterrupt as err:
        _interrupted(err)
    short = {k: summary[k] for k in ("test_accuracy", "test_nll", "log_marglik", "approx", "copies_approx", "seconds",
                                     "seconds_per_marglik_step")}
    short["augmentation"] = {k: round(v, 3) for k, v in summary["augmentation"].items()}
    log.info("summary: %s", json.dumps(short))
    if is_main_process():
        _report_finished(summary, run_dir)
    return summary["log_marglik"]  # objective for Hydra sweepers


def _precheck(argv: List[str]) -> Optional[Config]:
    """Compose and check the overrides of a single run before Hydra starts it (see module docstring)."""
    from hydra._internal.utils import get_args_parser

    from .cli_config import check_overrides

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # a malformed Hydra flag: Hydra reports it
        return None
    if (args.multirun or args.hydra_help or args.info or args.shell_completion or args.config_path
            or args.config_dir or args.config_name or args.experimental_rerun):
        return None  # sweeps / other config sources: each job is checked when it starts
    try:
        config = check_overrides(args.overrides)
        resolve_device(config.trainer.device)  # a device this machine lacks: before anything is created
    except ConfigError as err:
        _user_error(err)
    return config


def _check_resume(config: Config, run_dir: Path) -> None:
    """The resume check before Hydra writes into ``run_dir``: the checkpoint ``trainer.resume`` finds
    must be readable (an explicit one) and of the same configuration.

    Raises:
        CheckpointError: as :func:`marglik.tuning.checkpoint.load_resume_state`, or
            :class:`~marglik.tuning.checkpoint.ResumeMismatchError`.
    """
    state, path = ckpt.load_resume_state(config.trainer.resume, run_dir, lambda msg: None)
    if state is not None:
        diff = config.resume_diff(state["config"])
        if diff:
            raise ckpt.ResumeMismatchError(path, diff)


def _run_dir_before_hydra(argv: List[str]) -> Optional[Path]:
    """The run directory a single run will use when the command names it (``hydra.run.dir``, set by
    :func:`prepare_overrides` for a resume), without interpolations; ``None`` otherwise."""
    if any(o in ("-m", "--multirun") for o in argv):
        return None
    found = override_value(argv, "hydra.run.dir")
    return Path(found).expanduser() if found and "${" not in found else None


def main() -> None:
    """Console script ``marglik``."""
    from .cli_config import expand_model_shorthand

    argv = expand_model_shorthand(sys.argv[1:])  # model=tv:<arch> -> model=tv model.arch=<arch>
    if "-h" in argv or "--help" in argv:
        from .cli_config import help_text

        print(help_text())
        return
    global _GUARD, _ANCHOR
    _GUARD = None
    try:
        config = _precheck(argv)  # config errors first: nothing is created for a bad config
        _ANCHOR = first_existing(Path.cwd() / "outputs")
        explicit = _run_dir_before_hydra(prepare_overrides(argv, probe=False)) if is_main_process() else None
        try:
            if explicit is not None:  # lock it, then check, before Hydra writes there
                _GUARD = RunDirGuard(explicit)
                if config is not None:
                    _check_resume(config, explicit)
            sys.argv[1:] = prepare_overrides(argv)  # resume dir, ranks, writable run dir
            _hydra_main()
        except (UserError, PermissionError) as err:  # the lock or the resume check (the run's own are handled inside)
            _user_error(err)
        finally:  # restores the directory unless the run was accepted; releases the lock
            if _GUARD is not None:
                _GUARD.close()
                _GUARD = None
    except KeyboardInterrupt as err:  # Ctrl-C outside the run (start-up, Hydra's own work)
        _interrupted(err)


if __name__ == "__main__":
    main()
