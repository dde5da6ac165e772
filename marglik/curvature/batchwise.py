"""The gradient of a function of the factor sums w.r.t. what the batches depend on, one batch at a time.

A differentiable fit (``KFAC(differentiable=True)``) keeps the autograd graph of every batch it saw
until the gradient is taken: for learned augmentation the class backward passes of every augmented
image, about 20 MiB per 32x32 image on WRN-16-4 (``results/wrn_cost.md``, ``results/batchwise.md``),
on the order of 300 GB for the CIFAR-10 recipe's 4 x 250 x 16 images. But a log marginal likelihood ``L`` depends on the batches only through
the factor sums ``S = sum_b S_b`` (and the summed loss), so by the chain rule

    dL/d eta = sum_b < dL/dS, dS_b/d eta >.

Two passes give it exactly with the memory of one batch's graph (:func:`batchwise_gradients`;
``hyper.batchwise`` in the tuning loop):

1. accumulate every batch *without* a graph to the batch inputs, make the sums autograd leaves
   (:func:`sums_as_leaves`), build the approximation on them, take ``G = dL/dS`` (and ``dL/d log delta``);
2. for each batch again, its sums with the graph (:meth:`marglik.KFAC.batch_sums`), the scalar
   ``<G, S_b>`` (:func:`contract`) and its gradient w.r.t. ``eta``; the batch's graph is freed before the
   next one.

A sum kept as rows (:class:`~marglik.curvature.row_factor.RowFactor`, ``S = R^T R`` with the batches'
rows concatenated in order) gets its gradient w.r.t. the rows; batch ``b``'s rows are the slice at its
offset, and ``<G_R, R_b>`` has the same derivative w.r.t. ``eta`` as ``L`` through those rows. A dense sum
takes ``<G, S_b>`` with ``S_b`` dense (``R_b^T R_b`` for a batch that came as rows). Both passes must see
the same inputs: the caller replays the same augmentation noise (and the engine's forward is
deterministic for a given input on a given device). A Monte-Carlo estimate (``fisher_type="mc"`` or
``"mc-root"``) draws its labels or signs per batch: the random state the first pass started from
(``KFAC.generator``, else the global generators of the CPU and of the fit's CUDA device) is restored
before the second pass, which then draws the same numbers batch by batch (:class:`_ReplayRandom`), and
is left where the first pass left it. ``torch.distributed`` is not supported (the all-reduced sums are
not leaves of the local batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .blocks import FactorSum
from .recording import BatchSums

__all__ = ["SumLeaf", "sums_as_leaves", "contract", "check_consumed", "batchwise_gradients"]


@dataclass
class SumLeaf:
    """One accumulated sum made an autograd leaf: block ``block``'s ``side`` (``"A"`` or ``"grad"``),
    held as ``rows`` (``(G, m, d)``) or ``dense`` (``(G, d, d)``); ``side="loss"`` is the summed loss."""

    block: int
    side: str
    form: str
    tensor: Tensor


def sums_as_leaves(sums: List, loss: Optional[Tensor]) -> List[SumLeaf]:
    """Replace every tensor of the accumulated :class:`~marglik.curvature.blocks.BlockSums` (and the
    loss) by a detached copy that requires grad, in place; returns them in a fixed order."""
    leaves: List[SumLeaf] = []
    for j, block in enumerate(sums):
        for side in ("A", "grad"):
            f: FactorSum = getattr(block, side)
            if f.rows is not None:
                f.rows = f.rows.detach().requires_grad_(True)
                leaves.append(SumLeaf(j, side, "rows", f.rows))
            elif f.dense is not None:
                f.dense = f.dense.detach().requires_grad_(True)
                leaves.append(SumLeaf(j, side, "dense", f.dense))
    if loss is not None:
        leaves.append(SumLeaf(-1, "loss", "dense", loss))
    return leaves


def contract(leaves: List[SumLeaf], grads: List[Optional[Tensor]], batch: BatchSums,
             offsets: Dict[Tuple[int, str], int]) -> Tensor:
    """``sum_leaves <G_leaf, batch's part of the leaf>``: a scalar whose gradient w.r.t. anything the
    batch depends on is that of the function whose leaf gradients ``grads`` are.

    Args:
        leaves: from :func:`sums_as_leaves` (the totals of all batches).
        grads: the function's gradient w.r.t. each leaf (``None``: it does not depend on it).
        batch: one batch's sums, computed with a graph (:meth:`marglik.KFAC.batch_sums`).
        offsets: rows of each rows-form leaf consumed by earlier batches; advanced here.

    Raises:
        RuntimeError: the batch does not match the totals (a different input than in the first pass).
    """
    total: Tensor = batch.loss.new_zeros(())
    for leaf, g in zip(leaves, grads):
        if leaf.side == "loss":
            if g is not None:
                total = total + (g * batch.loss).sum()
            continue
        part: FactorSum = getattr(batch.blocks[leaf.block], leaf.side)
        if part.empty:
            continue
        if leaf.form == "rows":
            if part.rows is None:
                raise RuntimeError("a batch's factor sum is dense where the total kept rows: the second pass "
                                   "saw other inputs than the first")
            key = (leaf.block, leaf.side)
            start, m = offsets.get(key, 0), part.rows.shape[1]
            offsets[key] = start + m
            if g is not None:
                total = total + (g[:, start:start + m] * part.rows).sum()
            continue
        if g is not None:
            dense = part.dense if part.dense is not None else part.rows.transpose(-1, -2) @ part.rows
            total = total + (g * dense).sum()
    return total


def check_consumed(leaves: List[SumLeaf], offsets: Dict[Tuple[int, str], int]) -> None:
    """Every rows-form leaf's rows were matched by the batches of the second pass.

    Raises:
        RuntimeError: some rows were not (the second pass saw fewer or other batches).
    """
    for leaf in leaves:
        if leaf.form == "rows" and offsets.get((leaf.block, leaf.side), 0) != leaf.tensor.shape[1]:
            raise RuntimeError("the second pass matched a different number of factor rows than the first "
                               f"(block {leaf.block}, {leaf.side}): it saw other batches")


def batchwise_gradients(la: Any, raw: Sequence[Any], make_batch: Callable[[Any], Tuple[Any, Tensor]],
                        num_data: Optional[int], log_marglik: Callable[[Any], Tensor], wrt: Sequence[Tensor],
                        through: Sequence[Tensor]) -> Tuple[Tensor, List[Optional[Tensor]], List[Tensor]]:
    """Fit ``la`` and take the gradients of its log marginal likelihood, one batch's graph at a time.

    Args:
        la: an unfitted ``KronLaplace(differentiable=True)``.
        raw: what each batch is made from (e.g. images and their augmentation noise).
        make_batch: ``raw item -> (X, y)``, deterministic; called twice per item (once without a graph).
        num_data: the data-set size the fit represents.
        log_marglik: ``fitted la -> 0-d tensor``.
        wrt: tensors the log marglik depends on directly (e.g. the log prior precision).
        through: tensors the batches depend on (e.g. the augmentation ranges ``eta``).

    Returns:
        ``(log marglik (detached), its gradients w.r.t. wrt (None where unused), w.r.t. through)``;
        ``la`` is left fitted on the leaves.
    """
    replay = _ReplayRandom(la.kfac)
    with torch.no_grad():
        first = [make_batch(r) for r in raw]
    leaves = la.fit_leaves(first, num_data=num_data)
    del first
    replay.rewind()
    lml = log_marglik(la)
    g = torch.autograd.grad(lml, list(wrt) + [leaf.tensor for leaf in leaves], allow_unused=True)
    direct, leaf_grads = list(g[:len(wrt)]), list(g[len(wrt):])
    acc = [torch.zeros_like(t) for t in through]
    offsets: Dict[Tuple[int, str], int] = {}
    for r in raw:
        part = contract(leaves, leaf_grads, la.kfac.batch_sums(*make_batch(r)), offsets)
        if part.requires_grad:  # the batch's graph is freed when this grad returns
            for i, gi in enumerate(torch.autograd.grad(part, list(through), allow_unused=True)):
                if gi is not None:
                    acc[i] = acc[i] + gi
    check_consumed(leaves, offsets)
    replay.finish()
    return lml.detach(), direct, acc


class _ReplayRandom:
    """The random state a Monte-Carlo fit draws from, saved before the first pass, restored before the
    second (so that both draw the same labels or signs batch by batch), and set after the second pass
    to where the first pass had left it. No-op for ``type-2`` and ``empirical``."""

    def __init__(self, kfac: Any) -> None:
        self.active = getattr(kfac, "fisher_type", None) in ("mc", "mc-root")
        self.generator = getattr(kfac, "generator", None)
        device = next((p.device for p in kfac.model.parameters()), torch.device("cpu")) if self.active else None
        self.cuda = device is not None and device.type == "cuda"
        self.device = device
        self.start = self._get() if self.active else None
        self.after_first = None

    def _get(self) -> Any:
        if self.generator is not None:
            return self.generator.get_state()
        return (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None)

    def _set(self, state: Any) -> None:
        if self.generator is not None:
            self.generator.set_state(state)
            return
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def rewind(self) -> None:
        if self.active:
            self.after_first = self._get()
            self._set(self.start)

    def finish(self) -> None:
        if self.active:
            self._set(self.after_first)
