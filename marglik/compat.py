"""Checks that the installed packages can work together, made once per process.

A torchvision wheel built for another torch release fails on import with
``operator torchvision::nms does not exist`` (its compiled operators do not load). Everything that
imports it then fails with that line -- torchvision's data sets, ``model=vit``, and laplace-torch's
peer backends (laplace-torch imports torchmetrics, which imports torchvision) -- and the failure
reads as if the data set, model or backend were at fault. :func:`check_torchvision` imports it
once and turns that failure into one :class:`~marglik.errors.IncompatibleInstallError` naming both
versions and the fix; every place that needs torchvision calls it first.
"""

from __future__ import annotations

from typing import Optional

from .errors import IncompatibleInstallError, one_line

__all__ = ["check_torchvision"]

_UNCHECKED = object()
_problem: object = _UNCHECKED  # None: fine (or not installed); str: the message of the failed import


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(unknown version)"


def _diagnose() -> Optional[str]:
    """Import torchvision; the one-line problem if it is installed but cannot be imported."""
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return None  # not installed: whoever needs it says so with the ordinary import error
    except Exception as e:  # RuntimeError: operator torchvision::nms does not exist, or similar
        import torch

        first = one_line(str(e).splitlines()[0] if str(e) else type(e).__name__)
        mismatch = "torchvision::" in str(e) or "does not exist" in str(e)
        why = ("it was built for another torch release" if mismatch else "it fails to import")
        return (f"torchvision {_version('torchvision')} cannot be used with torch {torch.__version__}: {why} "
                f"({first}); reinstall the two together so that they match: pip install --force-reinstall torch "
                "torchvision (with the --index-url torch came from, e.g. https://download.pytorch.org/whl/cpu)")
    return None


def check_torchvision() -> None:
    """Raise if the installed torchvision cannot work with the installed torch (checked once).

    A torchvision that is not installed at all passes (the import that needs it fails plainly).

    Raises:
        IncompatibleInstallError: torchvision is installed but does not import, e.g. built for
            another torch release; one line naming both versions and the fix.
    """
    global _problem
    if _problem is _UNCHECKED:
        _problem = _diagnose()
    if _problem is not None:
        raise IncompatibleInstallError(str(_problem))


def import_laplace():
    """``import laplace`` after :func:`check_torchvision`, without its import-time log lines.

    laplace-torch logs on the root logger while importing (``Asdfghjkl backend not available ...``
    when its old ASDL fork is absent); under Hydra's logging that line lands between a command's
    one-line error and its exit. The root logger is raised to WARNING for the import only.

    Returns:
        The ``laplace`` module.

    Raises:
        IncompatibleInstallError: torchvision (imported by laplace-torch) does not match torch.
    """
    import logging

    check_torchvision()
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        import laplace
        import laplace.curvature  # noqa: F401  (the submodule that logs)
    finally:
        root.setLevel(level)
    return laplace
