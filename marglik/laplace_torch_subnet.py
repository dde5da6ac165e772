"""Jacobians and per-example gradients of a laplace-torch subnetwork, over the tensors it touches.

laplace-torch's ``SubnetLaplace`` (``subset_of_weights="subnetwork"``, ``hessian_structure="full"``
or ``"diag"``) takes a vector of indices into the concatenated trainable parameters and asks the
backend for ``jacobians`` / ``gradients`` restricted to them. laplace-torch's ``torch.func``
implementations differentiate with respect to *every* parameter and then index: ``(M, C, P)``
Jacobians for a subnetwork of ``p << P`` entries. Here only the parameter tensors that hold at
least one subnetwork index are differentiated (the others are held fixed in ``functional_call``),
so the memory is ``(M, C, P_touched)`` -- the same numbers (tests compare them with laplace-torch's
Curvlinops and ASDL backends and the exact GGN / EF), and for a subnetwork inside a few layers
(``ModuleNameSubnetMask``, ``ParamNameSubnetMask``, ``LastLayerSubnetMask``) a fraction of the cost.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

__all__ = ["subnet_positions", "subnet_jacobians", "subnet_gradients"]


def subnet_positions(sizes: List[int], indices: Tensor) -> Tuple[List[int], Tensor]:
    """Which tensors the subnetwork touches, and where its indices fall in their concatenation.

    Args:
        sizes: ``numel`` of each parameter tensor, in the order of the concatenated vector.
        indices: ``(p,)`` subnetwork indices into that vector (any order, no duplicates).

    Returns:
        ``(touched, positions)``: the touched tensors' numbers (ascending) and ``(p,)`` positions
        of ``indices`` in the concatenation of the touched tensors alone (same order as ``indices``).

    Raises:
        ValueError: an index lies outside ``[0, sum(sizes))``.
    """
    idx = torch.as_tensor(indices, dtype=torch.long).cpu()
    ends = torch.tensor(sizes, dtype=torch.long).cumsum(0)
    if idx.numel() and (idx.min() < 0 or idx.max() >= int(ends[-1])):
        raise ValueError(f"subnetwork indices must lie in [0, {int(ends[-1])})")
    tensor_of = torch.bucketize(idx, ends, right=True)  # the tensor holding each index
    touched = sorted(set(tensor_of.tolist()))
    starts = ends - torch.tensor(sizes, dtype=torch.long)
    local = torch.zeros(len(sizes), dtype=torch.long)
    offset = 0
    for t in touched:
        local[t] = offset
        offset += sizes[t]
    return touched, idx - starts[tensor_of] + local[tensor_of]


def _touched(params: Mapping[str, nn.Parameter], indices: Tensor) -> Tuple[Dict[str, Tensor], Tensor]:
    names = list(params)
    touched, pos = subnet_positions([params[n].numel() for n in names], indices)
    return {names[t]: params[names[t]] for t in touched}, pos


def subnet_jacobians(
    model: nn.Module, params: Mapping[str, nn.Parameter], buffers: Mapping[str, Tensor], x: Any,
    indices: Tensor, enable_backprop: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Output Jacobians with respect to the subnetwork entries.

    Args:
        model: the network (called as ``model(x)``).
        params: the trainable parameters by name, in the order of the concatenated vector
            (laplace-torch's ``params_dict``).
        buffers: the model's buffers by name.
        x: an input batch of ``M`` examples.
        indices: ``(p,)`` subnetwork indices.
        enable_backprop: keep the graph (laplace-torch's argument).

    Returns:
        ``(Js, f)``: Jacobians ``(M, C, p)`` (columns in the order of ``indices``) and outputs ``(M, C)``.
    """
    sub, pos = _touched(params, indices)

    def fn(p: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        out = torch.func.functional_call(model, (p, dict(buffers)), x)
        return out, out

    J, f = torch.func.jacrev(fn, has_aux=True)(sub)
    Js = torch.cat([J[n].flatten(start_dim=f.dim()) for n in sub], dim=-1)[..., pos.to(f.device)]
    return (Js, f) if enable_backprop else (Js.detach(), f.detach())


def subnet_gradients(
    model: nn.Module, params: Mapping[str, nn.Parameter], buffers: Mapping[str, Tensor],
    lossfunc: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, indices: Tensor,
) -> Tuple[Tensor, Tensor]:
    """Per-example gradients of ``lossfunc`` with respect to the subnetwork entries.

    Args:
        model: the network.
        params: the trainable parameters by name, in the order of the concatenated vector.
        buffers: the model's buffers by name.
        lossfunc: summed loss ``(output, target) -> 0-d`` (laplace-torch's ``lossfunc``, unscaled).
        x: inputs ``(M, ...)``.
        y: targets ``(M, ...)``.
        indices: ``(p,)`` subnetwork indices.

    Returns:
        ``(Gs, loss)``: gradients ``(M, p)`` and the summed loss (0-d).
    """
    sub, pos = _touched(params, indices)

    def loss_one(p: Dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tuple[Tensor, Tensor]:
        out = torch.func.functional_call(model, (p, dict(buffers)), (xi[None],))
        loss = lossfunc(out, yi[None])
        return loss, loss

    G, losses = torch.func.vmap(torch.func.grad(loss_one, has_aux=True), in_dims=(None, 0, 0))(sub, x, y)
    Gs = torch.cat([G[n].flatten(start_dim=1) for n in sub], dim=1)[:, pos.to(x.device)]
    return Gs, losses.sum(0)
