"""Back-propagating curvature columns to recorded module outputs: two strategies.

A recorded output is a :class:`Target`: the autograd gradient edge of the module's output, taken
when the module returned (:mod:`.recording`), with the output's shape and dtype. Gradients w.r.t.
an edge are gradients w.r.t. the output's value *as the module returned it*: an in-place operation
on the tensor afterwards (``ReLU(inplace=True)``, a residual ``out += identity``) rebases the
tensor onto a new autograd node but leaves the edge, and the gradient flowing into it, unchanged.

Both strategies compute, for every column ``S[k]`` (the model output's shape), the gradients of
``<out, S[k]>`` w.r.t. the targets, and hand each to ``on_grad(i, g)`` with ``g`` of shape
``(K', *targets[i].shape)`` for a chunk of ``K'`` columns; ``on_chunk_end()`` follows each chunk.
Only gradients w.r.t. module outputs are computed, never parameter gradients.

* :func:`backward_per_column`: one backward per column; each target's gradient is consumed by a
  hook on its autograd node the moment autograd has it, so no gradient outlives its layer's
  statistics.
* :func:`backward_vmapped`: columns in chunks through one vmapped backward each
  (``is_grads_batched``), at most ``max_grad_memory`` bytes of output gradients at once.

Which is faster depends on the device (``results/kfac_speed.md``, row "backward mode").
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = ["Target", "backward_per_column", "backward_vmapped", "source_targets", "column_grads"]

OnGrad = Callable[[int, Tensor], None]
OnChunkEnd = Callable[[], None]


class Target:
    """A recorded module output to differentiate against: its gradient ``edge``, ``shape`` and ``dtype``."""

    __slots__ = ("edge", "shape", "dtype")

    def __init__(self, edge: GradientEdge, shape: torch.Size, dtype: torch.dtype) -> None:
        self.edge, self.shape, self.dtype = edge, shape, dtype



def backward_per_column(
    out: Tensor, S: Tensor, targets: List[Target], on_grad: OnGrad, on_chunk_end: OnChunkEnd,
    retain_graph: bool, create_graph: bool,
) -> None:
    """One backward per column, gradients consumed by hooks on the targets' autograd nodes.

    The backward targets only the *source* targets (no recorded output upstream): every other
    target's node lies on a path from ``out`` to a source, so autograd runs it and the pre-hook
    registered on it sees its incoming gradient; the sources' gradients are what ``grad`` returns.

    Args:
        out: the model output.
        S: ``(K, *out.shape)`` curvature columns.
        targets: the recorded module outputs.
        on_grad: called with ``(i, g)``, ``g`` of shape ``(1, *targets[i].shape)``.
        on_chunk_end: called after each column.
        retain_graph: keep the graph after the last column.
        create_graph: differentiable gradients.
    """
    sources = source_targets(targets)
    is_source = set(sources)

    def make_hook(i: int, nr: int):
        def hook(grad_outputs):
            g = grad_outputs[nr]
            if g is not None:
                on_grad(i, g.unsqueeze(0))

        return hook

    handles = [
        t.edge.node.register_prehook(make_hook(i, t.edge.output_nr))
        for i, t in enumerate(targets) if i not in is_source
    ]
    edges = [targets[i].edge for i in sources]
    try:
        K = S.shape[0]
        for k in range(K):
            grads = torch.autograd.grad(
                out, edges, S[k], retain_graph=retain_graph or k < K - 1,
                create_graph=create_graph, allow_unused=True,
            )
            for i, g in zip(sources, grads):
                if g is not None:
                    on_grad(i, g.unsqueeze(0))
            del grads
            on_chunk_end()
    finally:
        for h in handles:
            h.remove()


def backward_vmapped(
    out: Tensor, S: Tensor, targets: List[Target], on_grad: OnGrad, on_chunk_end: OnChunkEnd,
    retain_graph: bool, create_graph: bool, max_grad_memory: int,
) -> None:
    """Columns in chunks through one vmapped backward each.

    Args:
        out: the model output.
        S: ``(K, *out.shape)`` curvature columns.
        targets: the recorded module outputs.
        on_grad: called with ``(i, g)``, ``g`` of shape ``(K', *targets[i].shape)`` (targets
            without a gradient are skipped).
        on_chunk_end: called after each chunk.
        retain_graph: keep the graph after the last chunk.
        create_graph: differentiable gradients.
        max_grad_memory: bytes of output gradients held at once.
    """
    K = S.shape[0]
    per_column = sum(math.prod(t.shape) for t in targets) * out.element_size()
    chunk = max(1, min(K, max_grad_memory // max(per_column, 1)))
    for start in range(0, K, chunk):
        cols = S[start : start + chunk].contiguous()
        grads = column_grads(
            out, targets, cols, batched=True, retain_graph=retain_graph or start + chunk < K,
            create_graph=create_graph,
        )
        for i in range(len(grads)):
            g, grads[i] = grads[i], None  # drop each gradient as soon as it is used
            if g is not None:
                on_grad(i, g)
        on_chunk_end()


def source_targets(targets: List[Target]) -> List[int]:
    """Indices of targets with no other target's node upstream in the autograd graph."""
    node_of = {t.edge.node: i for i, t in enumerate(targets)}
    sources = []
    for i, t in enumerate(targets):
        stack = [f for f, _ in t.edge.node.next_functions if f is not None]
        seen = set()
        downstream = False
        while stack:
            f = stack.pop()
            if f in seen:
                continue
            seen.add(f)
            if node_of.get(f, i) != i:
                downstream = True
                break
            stack.extend(g for g, _ in f.next_functions if g is not None)
        if not downstream:
            sources.append(i)
    return sources


def column_grads(
    out: Tensor, targets: List[Target], cols: Tensor, batched: bool, retain_graph: bool, create_graph: bool
) -> List[Optional[Tensor]]:
    """Gradients of ``<out, cols[k]>`` w.r.t. every target, each ``(K, *shape)``.

    ``batched=True`` uses one vmapped backward (``is_grads_batched``), falling back to one backward
    per column (with a warning) for ops without a vmap batching rule.
    """
    edges = [t.edge for t in targets]
    if batched:
        try:
            return list(torch.autograd.grad(
                out, edges, cols, retain_graph=retain_graph, create_graph=create_graph,
                allow_unused=True, is_grads_batched=True,
            ))
        except RuntimeError as err:  # an op without a vmap batching rule: fall back to the loop
            warnings.warn(f"batched backward unavailable ({err}); using one backward per column", stacklevel=2)
    K = cols.shape[0]
    per = [
        torch.autograd.grad(
            out, edges, cols[k], retain_graph=retain_graph or k < K - 1,
            create_graph=create_graph, allow_unused=True,
        )
        for k in range(K)
    ]
    if K == 1:  # a view, no copy
        return [None if g is None else g.unsqueeze(0) for g in per[0]]
    return [
        None if all(p[i] is None for p in per)
        else torch.stack([
            p[i] if p[i] is not None else cols.new_zeros(t.shape, dtype=t.dtype) for p in per
        ])
        for i, t in enumerate(targets)
    ]
