"""Independent dense references for testing :class:`marglik.KFAC`.

Everything here is computed with ``torch.func`` / plain autograd from the definitions and shares
no code with ``marglik.curvature``. Intended for tiny models in float64 (dense ``(P, P)``
matrices, full Jacobians of the whole batch).

Conventions (the same as marglik's):

* The curvature is that of the **summed** negative log-likelihood over the data set.
* Model output is ``(N, C)`` or ``(N, R, C)`` (class / output dimension last; ``R`` output
  positions, e.g. tokens or spatial locations). Every position is a separate loss term.
* ``likelihood``:
    - ``"classification"`` (aliases ``"ce"``, ``"cross_entropy"``, ``"categorical"``): cross
      entropy summed over all positions, labels ``y`` of shape ``(N,)`` / ``(N, R)``;
    - ``"regression"`` (aliases ``"mse"``, ``"gaussian"``): ``0.5 * ||y - f||^2`` summed;
    - ``"binary"`` (aliases ``"bce"``, ``"bernoulli"``): BCE-with-logits summed, ``y`` of the
      output's shape (a 1-d output ``(N,)`` is treated as ``(N, 1)``).
* Parameter ordering: ``[p for p in model.parameters() if p.requires_grad]`` (or the given
  ``params``), each flattened row-major, concatenated -- the order of ``Kron.to_dense()``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

# ----------------------------------------------------------------------------------------------
# likelihoods
# ----------------------------------------------------------------------------------------------

_ALIASES = {
    "classification": "classification",
    "ce": "classification",
    "cross_entropy": "classification",
    "crossentropy": "classification",
    "categorical": "classification",
    "regression": "regression",
    "mse": "regression",
    "gaussian": "regression",
    "binary": "binary",
    "bce": "binary",
    "bernoulli": "binary",
    "binary_classification": "binary",
}


def canonical_likelihood(likelihood: str) -> str:
    """Map a likelihood name (or alias) to ``classification`` / ``regression`` / ``binary``."""
    key = str(getattr(likelihood, "value", likelihood)).lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown likelihood {likelihood!r}")
    return _ALIASES[key]


def _as_positions(f: Tensor, y: Tensor, likelihood: str) -> Tuple[Tensor, Tensor]:
    """Flatten output to ``(M, C)`` (``M = N * R`` loss positions) and targets accordingly."""
    lik = canonical_likelihood(likelihood)
    if lik == "binary" and f.dim() == 1:
        f = f.unsqueeze(-1)
        y = y.reshape(f.shape)
    C = f.shape[-1]
    f2 = f.reshape(-1, C)
    if lik == "classification":
        y2 = y.reshape(-1)
    else:
        y2 = y.reshape(-1, C).to(f2.dtype)
    return f2, y2


def summed_loss(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """Summed negative log-likelihood (up to constants) of outputs ``f`` for targets ``y``."""
    lik = canonical_likelihood(likelihood)
    f2, y2 = _as_positions(f, y, lik)
    if lik == "classification":
        return F.cross_entropy(f2, y2, reduction="sum")
    if lik == "regression":
        return 0.5 * (y2 - f2).pow(2).sum()
    return F.binary_cross_entropy_with_logits(f2, y2, reduction="sum")


def output_hessian(f: Tensor, likelihood: str) -> Tensor:
    """Loss Hessian w.r.t. the output per position: ``(M, C, C)`` for ``f`` flattened to ``(M, C)``.

    CE: ``diag(p) - p p^T``; regression: ``I``; binary: ``diag(s (1 - s))``.
    """
    lik = canonical_likelihood(likelihood)
    if lik == "binary" and f.dim() == 1:
        f = f.unsqueeze(-1)
    C = f.shape[-1]
    f2 = f.reshape(-1, C)
    if lik == "classification":
        p = f2.softmax(-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    if lik == "regression":
        eye = torch.eye(C, dtype=f2.dtype, device=f2.device)
        return eye.expand(f2.shape[0], C, C).clone()
    s = f2.sigmoid()
    return torch.diag_embed(s * (1 - s))


# ----------------------------------------------------------------------------------------------
# parameters / functional helpers
# ----------------------------------------------------------------------------------------------


def _select_params(
    model: nn.Module, params: Optional[Sequence[Tensor]]
) -> Tuple[List[str], Dict[str, Tensor], Dict[str, Tensor]]:
    """Names of the selected params (in order), their detached values, and the fixed rest."""
    named = dict(model.named_parameters())
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    by_id = {id(p): n for n, p in named.items()}
    names = []
    for p in params:
        if id(p) not in by_id:
            raise ValueError("a given parameter is not a parameter of the model")
        names.append(by_id[id(p)])
    sel = {n: named[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in named.items() if n not in sel}
    fixed.update({n: b for n, b in model.named_buffers()})
    return names, sel, fixed


def _flat_jac(jac: Dict[str, Tensor], names: List[str], out_ndim: int) -> Tensor:
    """Concatenate a dict of Jacobians ``(*out, *p.shape)`` into ``(*out, P)``."""
    return torch.cat([jac[n].flatten(start_dim=out_ndim) for n in names], dim=-1)


def flat_params(model: nn.Module, params: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Selected parameters flattened and concatenated (the reference ordering)."""
    names, sel, _ = _select_params(model, params)
    return torch.cat([sel[n].reshape(-1) for n in names])


def jacobian(
    model: nn.Module, X: Tensor, params: Optional[Sequence[Tensor]] = None
) -> Tuple[Tensor, Tensor]:
    """Full Jacobian of the batch output: ``J`` of shape ``(*out.shape, P)`` and the output."""
    names, sel, fixed = _select_params(model, params)

    def fn(p):
        out = functional_call(model, {**fixed, **p}, (X,))
        return out, out

    jac, out = jacrev(fn, has_aux=True)(sel)
    return _flat_jac(jac, names, out.dim()), out.detach()


# ----------------------------------------------------------------------------------------------
# exact curvature references
# ----------------------------------------------------------------------------------------------


def exact_ggn(
    model: nn.Module,
    likelihood: str,
    X: Tensor,
    y: Tensor,
    params: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """Exact GGN ``sum_m J_m^T Λ_m J_m`` of the summed loss, ``(P, P)``.

    ``m`` runs over every loss position (examples times output positions); ``Λ_m`` is the loss
    Hessian w.r.t. the model output at that position (see :func:`output_hessian`). ``y`` is only
    used for shape checks (the GGN of these likelihoods does not depend on labels).
    """
    lik = canonical_likelihood(likelihood)
    J, f = jacobian(model, X, params)  # (*out, P)
    if lik == "binary" and f.dim() == 1:
        f = f.unsqueeze(-1)
        J = J.unsqueeze(-2)
    C, P = f.shape[-1], J.shape[-1]
    J2 = J.reshape(-1, C, P)
    Lam = output_hessian(f, lik)
    return torch.einsum("mcp,mcd,mdq->pq", J2, Lam, J2)


def per_example_gradients(
    model: nn.Module,
    likelihood: str,
    X: Tensor,
    y: Tensor,
    params: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """``(N, P)`` gradients of each example's loss (summed over its output positions)."""
    lik = canonical_likelihood(likelihood)
    names, sel, fixed = _select_params(model, params)

    def loss_one(p, x, t):
        out = functional_call(model, {**fixed, **p}, (x.unsqueeze(0),))
        return summed_loss(out, t.unsqueeze(0), lik)

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(sel, X, y)
    return _flat_jac(grads, names, 1)


def exact_empirical_fisher(
    model: nn.Module,
    likelihood: str,
    X: Tensor,
    y: Tensor,
    params: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """Empirical Fisher ``sum_n g_n g_n^T`` with ``g_n`` the gradient of example ``n``'s loss."""
    G = per_example_gradients(model, likelihood, X, y, params)
    return G.T @ G


def exact_hessian(
    model: nn.Module,
    likelihood: str,
    X: Tensor,
    y: Tensor,
    params: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """Hessian of the summed loss w.r.t. the flattened selected parameters, ``(P, P)``."""
    lik = canonical_likelihood(likelihood)
    names, sel, fixed = _select_params(model, params)
    shapes = [sel[n].shape for n in names]
    sizes = [sel[n].numel() for n in names]
    theta = torch.cat([sel[n].reshape(-1) for n in names])

    def loss_flat(th):
        p = {n: t.view(s) for n, t, s in zip(names, th.split(sizes), shapes)}
        return summed_loss(functional_call(model, {**fixed, **p}, (X,)), y, lik)

    return torch.func.hessian(loss_flat)(theta)


# ----------------------------------------------------------------------------------------------
# Kron helpers
# ----------------------------------------------------------------------------------------------


def block(dense: Tensor, kron, blk) -> Tensor:
    """Sub-block of a dense ``(P, P)`` matrix (in ``kron.params`` order) for one ``Kron`` block.

    ``blk`` is a block object, a block index, or a block (module) name. The returned matrix is in
    the block's ``to_dense()`` ordering (``[weight.flatten(), bias]``).
    """
    if isinstance(blk, int):
        blk = kron.blocks[blk]
    elif isinstance(blk, str):
        blk = {b.name: b for b in kron.blocks}[blk]
    idx = kron.block_indices(blk).to(dense.device)
    return dense[idx[:, None], idx[None, :]]


def block_diagonal_mask(kron) -> Tensor:
    """Boolean ``(P, P)`` mask of the entries covered by ``kron``'s blocks."""
    P = kron.num_params
    mask = torch.zeros(P, P, dtype=torch.bool)
    for blk in kron.blocks:
        idx = kron.block_indices(blk).cpu()
        mask[idx[:, None], idx[None, :]] = True
    return mask


def param_slices(model: nn.Module, params: Optional[Sequence[Tensor]] = None) -> Dict[str, slice]:
    """``param_name -> slice`` into the flattened reference ordering."""
    names, sel, _ = _select_params(model, params)
    out, off = {}, 0
    for n in names:
        out[n] = slice(off, off + sel[n].numel())
        off += sel[n].numel()
    return out


def module_indices(
    model: nn.Module, module_name: str, params: Optional[Sequence[Tensor]] = None
) -> Tensor:
    """Indices (reference ordering) of a module's selected weight then bias."""
    sl = param_slices(model, params)
    prefix = f"{module_name}." if module_name else ""
    idx = [
        torch.arange(sl[prefix + p].start, sl[prefix + p].stop)
        for p in ("weight", "bias")
        if prefix + p in sl
    ]
    return torch.cat(idx)


def kron_to_param_order(A: Tensor, B: Tensor, weight_shape, has_bias: bool) -> Tensor:
    """Dense ``B ⊗ A`` (augmented row-major ``[W, b]`` ordering) permuted to ``[W.flatten(), b]``.

    ``A`` is ``(din (+1), din (+1))`` with the bias as the last input coordinate, ``B`` is
    ``(dout, dout)``; ``weight_shape`` is ``(dout, ...)``.
    """
    dout = weight_shape[0]
    din = int(torch.Size(weight_shape[1:]).numel())
    da = din + int(has_bias)
    assert A.shape[-1] == da and B.shape[-1] == dout
    K = torch.kron(B, A)
    o = torch.arange(dout).view(dout, 1)
    cols = [o * din + torch.arange(din).view(1, din)]
    if has_bias:
        cols.append(dout * din + o)
    perm_aug_to_param = torch.cat(cols, 1).reshape(-1)  # aug position -> param position
    P = dout * da
    out = K.new_zeros(P, P)
    out[perm_aug_to_param[:, None], perm_aug_to_param[None, :]] = K
    return out


# ----------------------------------------------------------------------------------------------
# tiny test models
# ----------------------------------------------------------------------------------------------

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class DeepLinearExpand(nn.Module):
    """Stack of ``nn.Linear`` (no activations) applied to ``(N, R, D_in)`` -> ``(N, R, C)``.

    With the Gaussian likelihood KFAC-expand is exact for this model (every position is a loss
    term, output gradients do not depend on ``n, r``).
    """

    def __init__(self, D_in: int = 3, hidden: Sequence[int] = (4,), C: int = 2, bias: bool = True):
        super().__init__()
        dims = [D_in, *hidden, C]
        self.layers = nn.Sequential(
            *[nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:])]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class DeepLinearReduce(nn.Module):
    """Shared ``nn.Linear`` stack on ``(N, R, D_in)``, mean over ``R``, then a linear head.

    Output ``(N, C)``. With the Gaussian likelihood KFAC-reduce is exact for every layer (the
    head sees no weight sharing, ``R = 1``).
    """

    def __init__(
        self, D_in: int = 3, hidden: Sequence[int] = (4,), C: int = 2, bias: bool = True
    ):
        super().__init__()
        dims = [D_in, *hidden]
        self.shared = nn.Sequential(
            *[nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:])]
        )
        self.head = nn.Linear(dims[-1], C, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.shared(x).mean(dim=1))


class ConvExpand(nn.Module):
    """``ConvNd`` (any stride/padding/dilation/groups) then 1x1 ``ConvNd`` layers, no activations.

    Input ``(N, C_in, *spatial)``; output rearranged to ``(N, R, C)`` with ``R`` the number of
    output spatial positions. KFAC-expand is exact for it with the Gaussian likelihood.
    """

    def __init__(
        self,
        dim: int = 2,
        in_channels: int = 2,
        hidden: Sequence[int] = (3,),
        C: int = 2,
        kernel_size=2,
        bias: bool = True,
        **conv_kwargs,
    ):
        super().__init__()
        Conv = _CONV[dim]
        chans = [*hidden, C]
        layers = [Conv(in_channels, chans[0], kernel_size, bias=bias, **conv_kwargs)]
        layers += [Conv(a, b, 1, bias=bias) for a, b in zip(chans[:-1], chans[1:])]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)  # (N, C, *spatial)
        return out.flatten(2).transpose(1, 2)  # (N, R, C)


class ConvReduce(nn.Module):
    """``ConvNd`` then mean pooling over all spatial dims then an ``nn.Linear`` head -> ``(N, C)``.

    KFAC-reduce is exact for it with the Gaussian likelihood.
    """

    def __init__(
        self,
        dim: int = 2,
        in_channels: int = 2,
        hidden: int = 3,
        C: int = 2,
        kernel_size=2,
        bias: bool = True,
        **conv_kwargs,
    ):
        super().__init__()
        self.conv = _CONV[dim](in_channels, hidden, kernel_size, bias=bias, **conv_kwargs)
        self.head = nn.Linear(hidden, C, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x).flatten(2).mean(-1))


def deep_linear_expand(D_in: int = 3, hidden: Sequence[int] = (4,), C: int = 2, **kw) -> DeepLinearExpand:
    return DeepLinearExpand(D_in, hidden, C, **kw)


def deep_linear_reduce(D_in: int = 3, hidden: Sequence[int] = (4,), C: int = 2, **kw) -> DeepLinearReduce:
    return DeepLinearReduce(D_in, hidden, C, **kw)


def conv_expand(dim: int = 2, **kw) -> ConvExpand:
    return ConvExpand(dim, **kw)


def conv_reduce(dim: int = 2, **kw) -> ConvReduce:
    return ConvReduce(dim, **kw)


def make_targets(likelihood: str, out: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Random targets matching a model output (``(N, C)`` or ``(N, R, C)``)."""
    lik = canonical_likelihood(likelihood)
    if lik == "classification":
        return torch.randint(0, out.shape[-1], out.shape[:-1], generator=generator, device=out.device)
    if lik == "regression":
        return torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
    return torch.randint(0, 2, out.shape, generator=generator, device=out.device).to(out.dtype)
