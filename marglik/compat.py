"""Checks that the installed packages can work together, made once per process.

A torchvision wheel built for another torch release fails on import with
``operator torchvision::nms does not exist`` (its compiled operators do not load). Everything that
imports it then fails with that line -- torchvision's data sets, ``model=vit``, and laplace-torch's
peer backends (laplace-torch imports torchmetrics, which imports torchvision) -- and the failure
reads as if the data set, model or backend were at fault. :func:`check_torchvision` imports it
once and turns that failure into one :class:`~marglik.errors.IncompatibleInstallError` naming both
versions, what differs between them (:func:`mismatch`: the releases, or the builds -- ``+cpu``,
``+cuXXX`` or PyPI's default) and what to install; every place that needs torchvision calls it first.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

from .errors import IncompatibleInstallError, one_line

__all__ = ["check_torchvision", "mismatch"]

_UNCHECKED = object()
_problem: object = _UNCHECKED  # None: fine (or not installed); str: the message of the failed import


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(unknown version)"


def _split(version: str) -> Tuple[str, str]:
    """``"2.13.0+cpu"`` -> ``("2.13.0", "cpu")``; no local tag -> ``""`` (PyPI's default build)."""
    base, _, local = version.partition("+")
    return base, local


def _build(local: str) -> str:
    """A build in words: ``cpu`` -> ``a CPU build (+cpu)``, ``cu128`` -> ``a CUDA 12.8 build (+cu128)``."""
    if not local:
        return "PyPI's default build (no +local tag; CUDA on Linux)"
    m = re.fullmatch(r"cu(\d+)(\d)", local)
    if m:
        return f"a CUDA {m.group(1)}.{m.group(2)} build (+{local})"
    return f"a CPU build (+{local})" if local == "cpu" else f"a {local} build (+{local})"


def _index(local: str) -> str:
    """The pip option that installs the build with this local tag."""
    return f" --index-url https://download.pytorch.org/whl/{local}" if local else ""


def _torchvision_for(torch_base: str) -> Optional[str]:
    """The torchvision release made for a torch 2.x release: 0.(x + 15), e.g. 2.5 -> 0.20."""
    m = re.match(r"2\.(\d+)(?:\.(\d+))?", torch_base)
    return f"0.{int(m.group(1)) + 15}" if m else None


def mismatch(torch_version: str, torchvision_version: str) -> Optional[str]:
    """What differs between a torch and a torchvision install, and what to install.

    Args:
        torch_version: e.g. ``"2.13.0+cpu"``.
        torchvision_version: e.g. ``"0.28.0+cu128"``.

    Returns:
        ``"versions differ: ...; fix: pip install ..."`` when torchvision is not the release made for
        this torch (torch 2.x pairs with torchvision 0.(x+15)), ``"builds differ: ..."`` when the
        releases pair but the builds (``+cpu`` / ``+cuXXX``) do not, ``"builds may differ: ..."`` when
        one is PyPI's default build (no tag: CUDA, of a version the tag does not say) and the other
        ``+cuXXX``, ``None`` when both match.
    """
    t_base, t_local = _split(torch_version)
    v_base, v_local = _split(torchvision_version)
    want = _torchvision_for(t_base)
    if want is not None and not (v_base == want or v_base.startswith(want + ".")):
        return (f"versions differ: torchvision {torchvision_version} is not the release made for torch "
                f"{torch_version}, which is torchvision {want}; fix: pip install --force-reinstall "
                f"'torchvision=={want}.*'{_index(t_local)}")
    if t_local != v_local:
        # PyPI's default build (no tag) is a CUDA build of a CUDA version its tag does not say: certain to
        # differ from a CPU build, possibly from a +cuXXX one
        certain = "cpu" in (t_local, v_local) or (t_local and v_local)
        return (f"builds {'differ' if certain else 'may differ'}: torch {torch_version} is {_build(t_local)}, "
                f"torchvision {torchvision_version} is {_build(v_local)}; fix: install the torchvision build that "
                f"matches torch: pip install --force-reinstall --no-deps torchvision=={v_base}{_index(t_local)}")
    return None


def _diagnose() -> Optional[str]:
    """Import torchvision; the one-line problem if it is installed but cannot be imported."""
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return None  # not installed: whoever needs it says so with the ordinary import error
    except Exception as e:  # RuntimeError: operator torchvision::nms does not exist, or similar
        import torch

        first = one_line(str(e).splitlines()[0] if str(e) else type(e).__name__)
        tv = _version("torchvision")
        why = mismatch(torch.__version__, tv)
        if why is None:  # the two match: not a pairing problem
            why = ("it fails to import although it matches torch; fix: pip install --force-reinstall torch "
                   "torchvision (from the index torch came from, e.g. https://download.pytorch.org/whl/cpu)")
        return f"torchvision {tv} cannot be used with torch {torch.__version__}: {why} (the import said: {first})"
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
