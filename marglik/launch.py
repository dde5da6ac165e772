"""What the command line does before Hydra starts: the run directory and the ranks.

:func:`prepare_overrides` rewrites the Hydra overrides of ``marglik`` / ``python -m marglik``:

* ``trainer.resume=<run dir or checkpoint>`` without ``hydra.run.dir``: the run continues in that
  run directory (``hydra.run.dir`` is set to it), so ``summary.json``, ``history.csv`` and the
  log of an interrupted run end up in one place.
* under ``torchrun``, ranks other than 0 get no Hydra output folder, no log file and a scratch
  run directory: rank 0 alone writes the run directory (:mod:`marglik.tuning.distributed`).
* the run directory (``hydra.run.dir``, or ``./outputs`` for the default timestamped one) is
  created and probed for writing *before* Hydra configures its log file in it, so an unwritable
  folder is one line naming it instead of Hydra's "Unable to configure handler 'file'".
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from .tuning.checkpoint import CKPT_DIR, check_writable
from .tuning.distributed import env_rank, env_world_size


def override_value(overrides: List[str], key: str) -> Optional[str]:
    """The value of the last ``key=value`` (also ``+key=`` / ``++key=``) among the overrides.

    Args:
        overrides: Hydra overrides.
        key: the dotted key.

    Returns:
        The value, or ``None`` if no override sets ``key``.
    """
    found = None
    for o in overrides:
        name, sep, val = o.lstrip("+").partition("=")
        if sep and name == key:
            found = val
    return found


def resume_run_dir(spec: str) -> Optional[Path]:
    """The run directory a ``trainer.resume`` value points into (``None`` for auto / never)."""
    if spec.lower() in ("auto", "never", "none", "null", "false", ""):
        return None
    p = Path(spec).expanduser()
    if p.is_file():  # <run dir>/checkpoints/last.ckpt -> <run dir>
        return p.parent.parent if p.parent.name == CKPT_DIR else p.parent
    return p


def prepare_overrides(overrides: List[str], probe: bool = True) -> List[str]:
    """The overrides to hand to Hydra (see the module docstring); exits with status 2 and one
    line naming the folder if the run directory is not writable.

    Args:
        overrides: the command line's.
        probe: create and probe the run directory (``False``: only compute the overrides; nothing is
            created).

    Returns:
        The overrides for Hydra.
    """
    out = list(overrides)
    if any(o in ("-h", "--help", "--hydra-help", "--info", "-c", "--cfg", "-m", "--multirun")
           or o.startswith(("--cfg", "--info")) for o in overrides):
        return out  # no run directory of ours (help, config printing, Hydra sweeps)
    run_dir = override_value(out, "hydra.run.dir")
    resume = override_value(out, "trainer.resume")
    if run_dir is None and resume is not None:
        target = resume_run_dir(resume)
        if target is not None and not Path(resume).expanduser().exists():
            print(f"marglik: error: trainer.resume={resume}: no such run directory or checkpoint file",
                  file=sys.stderr)
            raise SystemExit(2)
        if target is not None:
            run_dir = str(target)
            out.append(f"hydra.run.dir={run_dir}")
    if not probe:
        return out
    if env_world_size() > 1 and env_rank() != 0:
        scratch = tempfile.mkdtemp(prefix=f"marglik-rank{env_rank()}-")
        atexit.register(shutil.rmtree, scratch, True)
        return [o for o in out if not o.lstrip("+").startswith("hydra.run.dir=")] + [
            f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=disabled",
        ]
    if run_dir is not None and "${" in run_dir:  # interpolated (e.g. ${now:...}): probe the fixed folder
        prefix = run_dir.split("${")[0]
        run_dir = prefix if prefix.endswith("/") else str(Path(prefix or ".").parent) if "/" in prefix else "."
    target = Path(run_dir) if run_dir is not None else Path.cwd() / "outputs"
    try:
        check_writable(target, "run directory" if run_dir is not None else "output folder")
    except PermissionError as e:
        print(f"marglik: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return out


def is_main_process() -> bool:
    """Rank 0 (or not launched by ``torchrun``)."""
    return env_rank() == 0 or env_world_size() <= 1


__all__ = ["prepare_overrides", "resume_run_dir", "is_main_process", "override_value"]

