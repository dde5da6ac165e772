"""Factor statistics of one block and one batch, as functions of tensors.

The formulas are in :mod:`marglik.curvature.kfac`. Here a call of a block's module in the forward
pass is a :class:`ModuleCall`: its input ``x`` (rows first), the row-to-example ``index``
(:func:`marglik.example_index`) and, for attention's q / k / v, the Kronecker ``group`` it feeds.
``N`` is the batch's number of examples; a layer input with ``T = m N`` rows holds ``m``
example-major augmented copies of every example. The *units* of K-FAC-reduce are the ``N``
examples, or the ``m N`` (example, copy) pairs with ``copies_approx="expand"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .blocks import CoveredModule
from .layers import copies_per_example, example_sum
from .options import KFACApprox
from .row_factor import FactorForm, concat_rows, keep_rows

__all__ = [
    "ModuleCall", "augment_with_bias", "count_divisor", "in_group", "over_copies", "unit_sum",
    "expand_input_sum", "reduce_input_rows", "diag_input_features", "expand_grad_sum",
    "reduce_grad_units", "diag_grad_units", "unit_rows", "unit_outer", "block_input_dim", "block_output_dim",
]


@dataclass
class ModuleCall:
    """One call of a covered module during a recorded forward pass.

    ``x`` (the input) is dropped as soon as the input statistics are formed; ``x_version`` is its
    version counter at recording (an input modified in place afterwards is an error). The output
    is held only as ``edge``, its autograd gradient edge taken when the module returned
    (:mod:`marglik.curvature.recording`): gradients w.r.t. the edge are w.r.t. the output's value
    at that moment, whatever in-place operations run on the tensor afterwards. ``y_shape`` /
    ``y_dtype``: the output's shape and dtype (a gradient's shape is ``(K, *y_shape)``).
    """

    x: Optional[Tensor]
    edge: Optional[GradientEdge]
    y_shape: torch.Size
    y_dtype: torch.dtype
    index: Optional[Tensor]
    x_version: int
    xhat: Optional[Tensor] = None  # diagonal blocks: the tensor multiplied by the weight
    group: Optional[int] = None  # a call feeding only Kronecker group ``group`` (MHA's q / k / v)


def augment_with_bias(XtX: Optional[Tensor], xsum: Tensor, count: Tensor, has_weight: bool, has_bias: bool) -> Tensor:
    """``A`` sums over ``[a, 1]`` from ``sum a a^T`` (``XtX``, ``(G, d, d)``), ``sum a`` (``(G, d)``)
    and ``sum 1`` (``count``); ``(G, d + 1, d + 1)`` with a bias, ``(G, 1, 1)`` for bias-only blocks."""
    G = xsum.shape[0]
    if not has_weight:
        return count.reshape(1, 1, 1).expand(G, 1, 1).clone()
    if not has_bias:
        return XtX
    d = XtX.shape[-1]
    A = XtX.new_empty(G, d + 1, d + 1)  # filled in place: no concatenation copies of (d, d)
    A[:, :d, :d] = XtX
    A[:, :d, d] = xsum
    A[:, d, :d] = xsum
    A[:, d, d] = count
    return A


def count_divisor(count: Union[float, Tensor]) -> Union[float, Tensor]:
    """An ``A`` count clamped to >= 1, shaped to divide ``(G, da, da)`` sums."""
    if torch.is_tensor(count):
        return count.clamp_min(1.0).view(-1, 1, 1)
    return max(count, 1.0)


def in_group(t: Tensor, group: Optional[int], G: int, dim: int) -> Tensor:
    """Place a single-group statistic (size 1 along ``dim``) at slot ``group`` of ``G`` slots
    (zeros elsewhere); identity for calls feeding every group (``group is None``)."""
    if group is None:
        return t
    parts = [torch.zeros_like(t)] * G
    parts[group] = t
    return torch.cat(parts, dim=dim)


def over_copies(t: Tensor, dim: int, N: int, index: Optional[Tensor], name: str, mean: bool) -> Tensor:
    """Sum (``mean=False``) or average the example-major copies in ``t``'s ``dim`` (``m N`` rows)
    into ``N`` rows; ``t`` itself where the rows hold no copies (``m = 1``)."""
    m = copies_per_example(t.shape[dim], N, index, name)
    if m == 1:
        return t
    t = t.reshape(t.shape[:dim] + (N, m) + t.shape[dim + 1:])
    return t.mean(dim + 1) if mean else t.sum(dim + 1)


def unit_sum(t: Tensor, dim: int, N: int, index: Optional[Tensor], name: str, copies_approx: KFACApprox) -> Tensor:
    """Rows of ``t`` along ``dim`` summed into the units of K-FAC-reduce: the ``N`` examples, or
    with ``copies_approx="expand"`` the ``m N`` (example, copy) pairs where the rows hold copies."""
    if copies_approx is KFACApprox.EXPAND and copies_per_example(t.shape[dim], N, index, name) > 1:
        return t
    return example_sum(t, dim, N, index, name)


def expand_input_sum(
    block: CoveredModule, calls: Sequence[ModuleCall], N: int, copies_approx: KFACApprox,
    form: FactorForm = FactorForm.DENSE,
) -> Tuple[Optional[Tensor], Optional[Tensor], Union[float, Tensor]]:
    """K-FAC-expand input side of one batch: ``sum_{n,r} a a^T`` over all calls and the count.

    A call with few positions against the factor's dimension (:func:`keep_rows` under ``form``)
    contributes its positions' inputs as rows instead of their Gram.

    Returns:
        ``(A, rows, count)``: the dense sum ``(G, da, da)`` of the other calls (or ``None``), the
        rows ``(G, M, da)`` (or ``None``) and the number of positions (``(G,)`` per group when a
        call feeds a single group).
    """
    rule, m, G = block.rule, block.module, block.groups
    has_w, has_b = block.weight is not None, block.bias is not None
    grouped = any(c.group is not None for c in calls)
    A_sum: Optional[Tensor] = None
    rows: Optional[Tensor] = None
    count: Union[float, Tensor] = 0.0
    for c in calls:
        x = c.x
        if copies_approx is KFACApprox.REDUCE:  # one position per (example, position)
            x = over_copies(x, 0, N, c.index, block.name, mean=True)
        M = rule.input_rows_count(m, x) if has_w else None
        if M is not None and keep_rows(M, block_input_dim(block), form):
            X = rule.expand_inputs(m, x).transpose(1, 2)  # (G, M, din)
            if has_b:
                X = torch.cat([X, X.new_ones(X.shape[:-1] + (1,))], dim=-1)
            rows = concat_rows(rows, in_group(X, c.group, G, 0))
        else:
            XtX, xsum, M = rule.expand_input_stats(m, x, gram=has_w)  # (G, din, din), (G, din)
            A = in_group(augment_with_bias(XtX, xsum, xsum.new_tensor(float(M)), has_w, has_b), c.group, G, 0)
            A_sum = A if A_sum is None else A_sum + A
        if grouped:  # per-group position counts
            ref = rows if rows is not None else A_sum
            counts = ref.detach().new_zeros(G)
            counts[slice(None) if c.group is None else c.group] = float(M)
            count = counts + count
        else:
            count += M
    return A_sum, rows, count


def block_input_dim(block: CoveredModule) -> int:
    """``da``: the input factor's dimension of a Kronecker block (``din`` plus 1 for a bias)."""
    if block.weight is None:
        return 1
    return block.weight[0].numel() + (block.bias is not None)


def reduce_input_rows(
    block: CoveredModule, calls: Sequence[ModuleCall], N: int, copies_approx: KFACApprox
) -> Tuple[Tensor, int]:
    """K-FAC-reduce input side of one batch: the rows ``a_u`` of ``sum_u a_u a_u^T`` over the ``U`` units.

    Each unit's input ``a_u`` is its mean over all positions of all calls, per group for group
    calls (with a 1 appended for the bias where the unit was seen).

    Returns:
        ``(rows, U)``: ``(G, U, da)`` (a bias-only block: ``(G, U, 1)``, 1 where the unit was
        seen) and the number of units.

    Raises:
        ValueError: calls of one forward pass hold different numbers of copies under
            ``copies_approx="expand"``.
    """
    rule, m, G, name = block.rule, block.module, block.groups, block.name
    has_w, has_b = block.weight is not None, block.bias is not None
    sums, counts = None, None
    for c in calls:
        rows, P = rule.reduce_inputs(m, c.x)  # (T, G|1, din)
        if not has_w:  # a bias-only block needs the counts alone (its calls' inputs may differ in width)
            rows = rows[..., :0]
        ex = in_group(unit_sum(rows, 0, N, c.index, name, copies_approx), c.group, G, 1)  # (U, G, din)
        cnt = unit_sum(rows.new_full((rows.shape[0], 1), float(P)), 0, N, c.index, name, copies_approx)  # (U, 1)
        cnt = in_group(cnt, c.group, G, 1) if c.group is not None else cnt.expand(cnt.shape[0], G)
        if sums is not None and ex.shape[0] != sums.shape[0]:
            raise ValueError(
                f"module {name!r}: its calls in one forward pass hold different numbers of augmented copies "
                f"({sums.shape[0] // N} and {ex.shape[0] // N} per example); copies_approx='expand' with "
                "approx='reduce' needs the same number in every call"
            )
        sums = ex if sums is None else sums + ex
        counts = cnt if counts is None else counts + cnt
    U = sums.shape[0]
    mean = sums / counts.clamp_min(1.0).unsqueeze(-1)  # (U, G, din)
    present = (counts > 0).to(mean.dtype)  # (U, G): the bias input's mean, 1 where the unit was seen
    if has_w and has_b:
        mean = torch.cat([mean, present.unsqueeze(-1)], dim=-1)
    if has_w:
        return mean.transpose(0, 1), U  # (G, U, da)
    return present.T.unsqueeze(-1), U


def diag_input_features(block: CoveredModule, x: Tensor) -> Optional[Tensor]:
    """The tensor a diagonal block's weight multiplies (shape of the output); ``None`` without weight."""
    return block.rule.normalized(block.module, x) if block.weight is not None else None


def expand_grad_sum(
    block: CoveredModule, call: ModuleCall, g: Tensor, N: int, copies_approx: KFACApprox,
    form: FactorForm = FactorForm.DENSE,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """K-FAC-expand output side of one call: ``sum_{k,n,r} g g^T``.

    ``g``: the output gradients ``(K, *y.shape)`` of ``K`` curvature columns.

    Returns:
        ``(B, rows)``: the dense sum ``(G, dout, dout)``, or (``None`` and) the ``K M`` gradient
        rows ``(G, K M, dout)`` when they are few against ``dout`` (:func:`keep_rows` under ``form``).
    """
    if copies_approx is KFACApprox.REDUCE:
        g = over_copies(g, 1, N, call.index, block.name, mean=False)
    rule, G = block.rule, block.groups
    dout = block_output_dim(block)
    if rule.rows_capable and keep_rows(g.numel() // (G * dout), dout, form):
        return None, in_group(rule.expand_grads(block.module, g).transpose(1, 2), call.group, G, 0)
    return in_group(rule.expand_grad_gram(block.module, g), call.group, G, 0), None


def block_output_dim(block: CoveredModule) -> int:
    """``db``: the output factor's dimension of a Kronecker block (outputs per group)."""
    p = block.weight if block.weight is not None else block.bias
    return p.shape[0] // block.groups


def reduce_grad_units(block: CoveredModule, call: ModuleCall, g: Tensor, N: int, copies_approx: KFACApprox) -> Tensor:
    """K-FAC-reduce output gradients of one call summed per unit: ``(K, U, G, dout)``.

    Sum these over the block's calls before :func:`unit_outer`.
    """
    rows = block.rule.reduce_grads(block.module, g)  # (K, T, G, dout)
    return in_group(unit_sum(rows, 1, N, call.index, block.name, copies_approx), call.group, block.groups, 2)


def diag_grad_units(block: CoveredModule, call: ModuleCall, g: Tensor, N: int) -> Tensor:
    """A diagonal block's per-example parameter gradients of one call: ``(K, N, C, k)``.

    Sum these over the block's calls before :func:`unit_outer`.
    """
    rule, m = block.rule, block.module
    parts = []
    if block.weight is not None:
        parts.append(rule.channel_sums(m, g * call.xhat.unsqueeze(0)))
    if block.bias is not None:
        parts.append(rule.channel_sums(m, g))
    rows = torch.stack(parts, dim=-1)  # (K, T, C, k)
    return example_sum(rows, 1, N, call.index, block.name)


def unit_rows(ex: Tensor) -> Tensor:
    """The per-unit sums of every column as rows: ``(K, U, G, d)`` -> ``(G, K U, d)``."""
    K, U = ex.shape[:2]
    return ex.reshape(K * U, ex.shape[2], ex.shape[3]).transpose(0, 1)


def unit_outer(ex: Tensor) -> Tensor:
    """Outer products of per-unit sums summed over columns and units: ``(K, U, G|C, d)`` -> ``(G|C, d, d)``."""
    K, U = ex.shape[:2]
    flat = ex.reshape(K * U, ex.shape[2], ex.shape[3]).transpose(0, 1)  # (G, K*U, d)
    return flat.transpose(1, 2) @ flat
