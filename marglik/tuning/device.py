"""``trainer.device``: the torch device a run uses, checked against what this machine has."""

from __future__ import annotations

import torch

from .config import ConfigError

__all__ = ["resolve_device"]


def resolve_device(spec: str) -> torch.device:
    """The torch device for ``trainer.device``.

    Args:
        spec: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:<index>"``
            or ``"mps"``.

    Returns:
        The device.

    Raises:
        ConfigError: ``spec`` names a device this machine does not have (no CUDA, a CUDA index past
            the last device, no MPS); one line naming what there is instead.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
            raise ConfigError("trainer.device", spec, f"CUDA is not available on this machine ({build}, no usable GPU)",
                              "cpu, or auto (CUDA when there is one)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError("trainer.device", spec, f"this machine has {count} CUDA device(s)",
                              f"cuda, cuda:0 .. cuda:{count - 1}, cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device", spec, "MPS (Apple-silicon GPU) is not available on this machine",
                          "cpu, or auto (CUDA when there is one)")
    return dev
