"""Summing the engine's factor sums over ``torch.distributed`` ranks (each rank sees its own shard)."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .blocks import BlockSums, FactorSum
from .row_factor import FactorForm, keep_rows

__all__ = ["default_distributed", "all_reduce_sum", "all_gather_rows", "all_reduce_block_sums"]


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


def _gather(rows: Tensor, counts: List[int]) -> Tensor:
    """Every rank's rows concatenated in rank order (padded to equal sizes for the collective)."""
    m_max = max(counts)
    padded = rows.new_zeros(rows.shape[0], m_max, rows.shape[2])
    padded[:, : rows.shape[1]] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:, :m] for part, m in zip(parts, counts)], dim=1)


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows, concatenated in rank order. Backward: the incoming gradient of
    this rank's own rows (the rows-form analogue of :class:`_SumOverRanks`)."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, counts: List[int]) -> Tensor:
        ctx.offset, ctx.m = sum(counts[: dist.get_rank()]), rows.shape[1]
        return _gather(rows.detach(), counts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        return grad[:, ctx.offset : ctx.offset + ctx.m], None


def all_gather_rows(rows: Tensor, counts: List[int]) -> Tensor:
    """Every rank's rows ``(G, m_r, d)`` concatenated along the rows, in rank order.

    With autograd history the gradient flows to this rank's own rows only, as in
    :func:`all_reduce_sum`.

    Args:
        rows: this rank's rows (``counts[rank]`` of them).
        counts: the number of rows on every rank.

    Returns:
        ``(G, sum(counts), d)``.
    """
    return _GatherRows.apply(rows, counts) if rows.requires_grad else _gather(rows, counts)


def _all_reduce_factor(F: FactorSum, total_rows: int, counts: List[int], form: FactorForm) -> FactorSum:
    """One factor sum over all ranks: the gathered rows while their total stays within
    :func:`keep_rows` on every rank (the same decision everywhere: it depends on the totals only),
    else the all-reduced dense sum."""
    ref = F.rows if F.rows is not None else F.dense
    d = ref.shape[-1]
    if total_rows >= 0 and keep_rows(total_rows, d, form):
        return FactorSum(rows=all_gather_rows(F.rows, counts))
    dense = F.dense if F.rows is None else F.rows.transpose(-1, -2) @ F.rows
    return FactorSum(dense=all_reduce_sum(dense))


def all_reduce_block_sums(
    blocks: List[BlockSums], kron: List[bool], num_seen: int, loss: Optional[Tensor], device: torch.device,
    form: FactorForm = FactorForm.AUTO,
) -> Tuple[List[BlockSums], int, Optional[Tensor]]:
    """Sum every block's factor sums, the number of examples seen and the loss over all ranks.

    Factors held as rows (:class:`~marglik.curvature.blocks.FactorSum`) are all-gathered when all
    ranks hold rows and their total stays small enough to keep (:func:`keep_rows`); otherwise every
    rank multiplies its rows out and the dense sums are all-reduced. Every rank takes the same
    decision from the row counts of all ranks (one all-gather of the counts).

    Args:
        blocks: this rank's sums, one per covered block (in the same order on every rank).
        kron: per block, whether it is a Kronecker block (whose ``A_count`` is reduced too).
        num_seen: examples seen on this rank.
        loss: this rank's summed loss (or ``None``).
        device: where to place the count tensors of the collective.
        form: the engine's :class:`~marglik.curvature.row_factor.FactorForm`.

    Returns:
        ``(blocks, num_seen, loss)`` summed over ranks.
    """
    factors = [F for s in blocks for F in (s.A, s.grad)]
    # rows per factor on this rank; -1: dense (or empty) here, which makes the factor dense everywhere
    local = torch.tensor([float(F.rows.shape[1]) if F.rows is not None else -1.0 for F in factors],
                         dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    per_rank = torch.stack(gathered).cpu()  # (world, factors)
    reduced = []
    for i, F in enumerate(factors):
        if F.empty:
            reduced.append(F)
            continue
        col = per_rank[:, i]
        total = -1 if bool((col < 0).any()) else int(col.sum())
        reduced.append(_all_reduce_factor(F, total, [int(c) for c in col], form))
    out = []
    for j, (s, is_kron) in enumerate(zip(blocks, kron)):
        count = s.A_count
        if is_kron:
            if torch.is_tensor(count):
                dist.all_reduce(count)
            else:
                c = torch.tensor([count], dtype=torch.float64, device=device)
                dist.all_reduce(c)
                count = float(c)
        out.append(BlockSums(reduced[2 * j], count, reduced[2 * j + 1], s.form))
    n = torch.tensor([float(num_seen)], dtype=torch.float64, device=device)
    dist.all_reduce(n)
    return out, int(n.item()), (all_reduce_sum(loss) if loss is not None else None)
