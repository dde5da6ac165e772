"""Running the engine's forward pass in channels-last layout (faster oneDNN convolution backward
on CPU: ``results/kfac_speed.md``), and undoing a failed attempt's side effects."""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["wants_channels_last", "SideEffects"]


def wants_channels_last(X: Any, setting: Union[bool, str], works: Optional[bool], has_conv2d: bool) -> bool:
    """Whether to run the forward on a channels-last copy of ``X``.

    Args:
        X: the model input (only a floating 4-D tensor qualifies).
        setting: ``True`` / ``False`` (forced) or ``"auto"`` (on CPU with a covered ``nn.Conv2d``).
        works: what an earlier ``"auto"`` attempt found (``None``: not tried yet).
        has_conv2d: whether a covered module is an ``nn.Conv2d``.

    Returns:
        Whether to convert.
    """
    if not (torch.is_tensor(X) and X.dim() == 4 and X.is_floating_point()):
        return False
    if setting == "auto":
        return works is not False and X.device.type == "cpu" and has_conv2d
    return bool(setting)


class SideEffects:
    """What a failed forward may have changed: module buffers (BatchNorm statistics) and the CPU
    random number generator (dropout); :meth:`restore` puts them back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.buffers: Dict[str, Tensor] = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.rng: Tensor = torch.get_rng_state()

    def restore(self) -> None:
        """Copy the saved buffers back into the model and reset the CPU generator."""
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(self.buffers[n])
        torch.set_rng_state(self.rng)
