"""Back-propagating curvature columns to recorded module outputs: two strategies.

Both compute, for every column ``S[k]`` (the model output's shape), the gradients of
``<out, S[k]>`` w.r.t. the recorded outputs, and hand each to ``on_grad(i, g)`` with ``g`` of shape
``(K', *outputs[i].shape)`` for a chunk of ``K'`` columns; ``on_chunk_end()`` follows each chunk.
Only gradients w.r.t. module outputs are computed, never parameter gradients.

* :func:`backward_per_column`: one backward per column; each output's gradient is consumed by a
  tensor hook the moment autograd has it, so no gradient outlives its layer's statistics.
* :func:`backward_vmapped`: columns in chunks through one vmapped backward each
  (``is_grads_batched``), at most ``max_grad_memory`` bytes of output gradients at once.

Which is faster depends on the device (``results/kfac_speed.md``, row "backward mode").
"""

from __future__ import annotations

import warnings
from typing import Callable, List, Optional

import torch
from torch import Tensor

__all__ = ["backward_per_column", "backward_vmapped", "source_outputs", "column_grads"]

OnGrad = Callable[[int, Tensor], None]
OnChunkEnd = Callable[[], None]


def backward_per_column(
    out: Tensor, S: Tensor, outputs: List[Optional[Tensor]], on_grad: OnGrad, on_chunk_end: OnChunkEnd,
    retain_graph: bool, create_graph: bool,
) -> None:
    """One backward per column, gradients consumed by tensor hooks (chunks of one column).

    The backward targets only the *source* outputs (no recorded output upstream): every other
    recorded output lies on a path from ``out`` to a source, so its hook fires. The entries of
    ``outputs`` are set to ``None`` once the hooks are in place, so that (with no other reference
    held by the caller) each layer output is freed once the graph no longer needs it.

    Args:
        out: the model output.
        S: ``(K, *out.shape)`` curvature columns.
        outputs: the recorded module outputs (cleared by this function).
        on_grad: called with ``(i, g)``, ``g`` of shape ``(1, *outputs[i].shape)``.
        on_chunk_end: called after each column.
        retain_graph: keep the graph after the last column.
        create_graph: differentiable gradients.
    """
    def make_hook(i: int):
        def hook(g: Tensor) -> None:
            on_grad(i, g.unsqueeze(0))

        return hook

    handles = [o.register_hook(make_hook(i)) for i, o in enumerate(outputs) if o.requires_grad]
    sources = [outputs[i] for i in source_outputs(outputs)]
    for i in range(len(outputs)):  # the hooks live on the autograd nodes: only the sources stay referenced
        outputs[i] = None
    try:
        K = S.shape[0]
        for k in range(K):
            torch.autograd.grad(
                out, sources, S[k], retain_graph=retain_graph or k < K - 1,
                create_graph=create_graph, allow_unused=True,
            )
            on_chunk_end()
    finally:
        for h in handles:
            h.remove()


def backward_vmapped(
    out: Tensor, S: Tensor, outputs: List[Tensor], on_grad: OnGrad, on_chunk_end: OnChunkEnd,
    retain_graph: bool, create_graph: bool, max_grad_memory: int,
) -> None:
    """Columns in chunks through one vmapped backward each.

    Args:
        out: the model output.
        S: ``(K, *out.shape)`` curvature columns.
        outputs: the recorded module outputs.
        on_grad: called with ``(i, g)``, ``g`` of shape ``(K', *outputs[i].shape)`` (outputs
            without a gradient are skipped).
        on_chunk_end: called after each chunk.
        retain_graph: keep the graph after the last chunk.
        create_graph: differentiable gradients.
        max_grad_memory: bytes of output gradients held at once.
    """
    K = S.shape[0]
    per_column = sum(o.numel() for o in outputs) * out.element_size()
    chunk = max(1, min(K, max_grad_memory // max(per_column, 1)))
    for start in range(0, K, chunk):
        cols = S[start : start + chunk].contiguous()
        grads = column_grads(
            out, outputs, cols, batched=True, retain_graph=retain_graph or start + chunk < K,
            create_graph=create_graph,
        )
        for i in range(len(grads)):
            g, grads[i] = grads[i], None  # drop each gradient as soon as it is used
            if g is not None:
                on_grad(i, g)
        on_chunk_end()


def source_outputs(outputs: List[Tensor]) -> List[int]:
    """Indices of outputs with no other recorded output upstream in the autograd graph."""
    node_of = {o.grad_fn: i for i, o in enumerate(outputs) if o.grad_fn is not None}
    sources = []
    for i, o in enumerate(outputs):
        if o.grad_fn is None:
            continue
        stack = [f for f, _ in o.grad_fn.next_functions if f is not None]
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
    out: Tensor, outputs: List[Tensor], cols: Tensor, batched: bool, retain_graph: bool, create_graph: bool
) -> List[Optional[Tensor]]:
    """Gradients of ``<out, cols[k]>`` w.r.t. every tensor in ``outputs``, each ``(K, *shape)``.

    ``batched=True`` uses one vmapped backward (``is_grads_batched``), falling back to one backward
    per column (with a warning) for ops without a vmap batching rule.
    """
    if batched:
        try:
            return list(torch.autograd.grad(
                out, outputs, cols, retain_graph=retain_graph, create_graph=create_graph,
                allow_unused=True, is_grads_batched=True,
            ))
        except RuntimeError as err:  # an op without a vmap batching rule: fall back to the loop
            warnings.warn(f"batched backward unavailable ({err}); using one backward per column", stacklevel=2)
    K = cols.shape[0]
    per = [
        torch.autograd.grad(
            out, outputs, cols[k], retain_graph=retain_graph or k < K - 1,
            create_graph=create_graph, allow_unused=True,
        )
        for k in range(K)
    ]
    if K == 1:  # a view, no copy
        return [None if g is None else g.unsqueeze(0) for g in per[0]]
    return [
        None if all(p[i] is None for p in per)
        else torch.stack([p[i] if p[i] is not None else torch.zeros_like(outputs[i]) for p in per])
        for i in range(len(outputs))
    ]
