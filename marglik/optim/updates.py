"""Parameter updates of :class:`marglik.optim.KFACOptimizer` from a direction: heavy-ball momentum
with decoupled weight decay (:func:`momentum_update`, both parameter groups) and the first-order
fallback of the parameters that are not preconditioned (:class:`Fallback`,
:func:`fallback_update`: SGD with momentum or torch's functional AdamW).

Each function updates one parameter in place and keeps its buffers in that parameter's optimizer
state ``st`` (a dict); call them under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

from ..curvature.options import StrOption

__all__ = ["Fallback", "FALLBACKS", "momentum_update", "fallback_update"]


class Fallback(StrOption):
    """The first-order update of the parameters that are not preconditioned."""

    SGD = "sgd"
    ADAMW = "adamw"


FALLBACKS = tuple(f.value for f in Fallback)


def momentum_update(p: nn.Parameter, u: Tensor, st: Dict[str, Any], lr: float, mom: float, wd: float) -> None:
    """``buf <- mom * buf + u`` (when ``mom > 0``), ``p <- p (1 - lr * wd)``, ``p <- p - lr * buf``.

    Args:
        p: the parameter, updated in place.
        u: the update direction, shaped like ``p`` (a preconditioned gradient or the gradient).
        st: ``p``'s optimizer state (holds ``momentum_buffer``; the first buffer is ``u``).
        lr: learning rate.
        mom: heavy-ball momentum in ``[0, 1)``.
        wd: decoupled weight decay.
    """
    if mom > 0:
        buf = st.get("momentum_buffer")
        if buf is None:
            buf = st["momentum_buffer"] = u.clone()
        else:
            buf.mul_(mom).add_(u)
        u = buf
    if wd:
        p.mul_(1.0 - lr * wd)
    p.add_(u, alpha=-lr)


def fallback_update(p: nn.Parameter, st: Dict[str, Any], fallback: Fallback, lr: float, mom: float, wd: float,
                    betas: Tuple[float, float], eps: float) -> None:
    """One first-order step of a parameter from its ``.grad`` (none when it has no gradient).

    Args:
        p: the parameter, updated in place.
        st: ``p``'s optimizer state (momentum buffer, or AdamW's ``exp_avg``, ``exp_avg_sq``,
            ``adam_step``).
        fallback: SGD with momentum ``mom`` or AdamW.
        lr: learning rate.
        mom: heavy-ball momentum (SGD only).
        wd: decoupled weight decay.
        betas: AdamW's ``(beta1, beta2)``.
        eps: AdamW's epsilon.
    """
    if p.grad is None:
        return
    if fallback is Fallback.SGD:
        momentum_update(p, p.grad, st, lr, mom, wd)
        return
    if "exp_avg" not in st:
        st["exp_avg"] = torch.zeros_like(p)
        st["exp_avg_sq"] = torch.zeros_like(p)
        st["adam_step"] = torch.tensor(0.0)
    elif not torch.is_tensor(st["adam_step"]):  # a state dict written before the step was a tensor
        st["adam_step"] = torch.tensor(float(st["adam_step"]))
    adamw(
        [p], [p.grad], [st["exp_avg"]], [st["exp_avg_sq"]], [], [st["adam_step"]], foreach=False,
        amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=wd, eps=eps, maximize=False,
    )
