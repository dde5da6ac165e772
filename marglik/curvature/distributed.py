"""Summing the engine's factor sums over ``torch.distributed`` ranks (each rank sees its own shard)."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .blocks import BlockSums

__all__ = ["default_distributed", "all_reduce_sum", "all_reduce_block_sums"]


def default_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _SumOverRanks(torch.autograd.Function):
    """Forward: the all-reduced sum. Backward: the incoming gradient, to this rank's own term."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        total = t.detach().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over all ranks.

    With autograd history (``differentiable=True``) the gradient flows to this rank's own ``t``
    only (identity backward): each rank then back-propagates into its own shard, and summing a
    data-dependent gradient (e.g. of augmentation parameters) over ranks gives the gradient of the
    global quantity.

    Args:
        t: this rank's term (reduced in place when it has no autograd history).

    Returns:
        The sum over ranks.
    """
    if not t.requires_grad:
        dist.all_reduce(t)
        return t
    return _SumOverRanks.apply(t)


def all_reduce_block_sums(
    blocks: List[BlockSums], kron: List[bool], num_seen: int, loss: Optional[Tensor], device: torch.device
) -> Tuple[List[BlockSums], int, Optional[Tensor]]:
    """Sum every block's factor sums, the number of examples seen and the loss over all ranks.

    Args:
        blocks: this rank's sums, one per covered block (in the same order on every rank).
        kron: per block, whether it is a Kronecker block (whose ``A_count`` is reduced too).
        num_seen: examples seen on this rank.
        loss: this rank's summed loss (or ``None``).
        device: where to place the count tensors of the collective.

    Returns:
        ``(blocks, num_seen, loss)`` summed over ranks.
    """
    out = []
    for s, is_kron in zip(blocks, kron):
        A_sum = None if s.A_sum is None else all_reduce_sum(s.A_sum)
        grad_sum = None if s.grad_sum is None else all_reduce_sum(s.grad_sum)
        count = s.A_count
        if is_kron:
            if torch.is_tensor(count):
                dist.all_reduce(count)
            else:
                c = torch.tensor([count], dtype=torch.float64, device=device)
                dist.all_reduce(c)
                count = float(c)
        out.append(BlockSums(A_sum, count, grad_sum))
    n = torch.tensor([float(num_seen)], dtype=torch.float64, device=device)
    dist.all_reduce(n)
    return out, int(n.item()), (all_reduce_sum(loss) if loss is not None else None)
