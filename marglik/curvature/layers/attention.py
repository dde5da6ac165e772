"""``nn.MultiheadAttention``: its query, key and value projections as three Linear layers over tokens.

PyTorch's attention applies its packed ``in_proj_weight`` (``(3E, E)``, rows ``[W_q; W_k; W_v]``)
and ``in_proj_bias`` inside ``F.multi_head_attention_forward``, and ``out_proj.weight`` too, so no
module call exposes the projections' inputs and outputs. While the engine records, this rule
replaces the module's ``forward`` by an equivalent one built from explicit projections:

1. ``q = x_q W_q^T + b_q``, ``k = x_k W_k^T + b_k``, ``v = x_v W_v^T + b_v`` on batch-first
   token tensors ``(N, L|S, E)`` (``F.linear`` on slices of the packed parameters), each recorded
   as one call of a Linear layer over tokens feeding its own Kronecker group;
2. the attention itself by PyTorch's own ``F.multi_head_attention_forward`` on the projected
   tensors with identity projection weights and no biases (multiplying by an identity matrix is
   exact in floating point), so masks (``key_padding_mask``, ``attn_mask``, ``is_causal``),
   ``average_attn_weights``, ``add_zero_attn`` and dropout in training mode behave as in the
   module's own forward. It always takes PyTorch's ``need_weights=True`` branch (explicit
   ``bmm`` / ``softmax`` / ``F.dropout``; the weights are returned only when asked for): the
   ``need_weights=False`` branch calls ``scaled_dot_product_attention``, whose CPU kernel has no
   double backward (needed by ``KFAC(differentiable=True)``, e.g. augmentation learning) and no
   vmap rule (the batched backward). Values are equal up to rounding; in training mode with
   attention dropout the mask is drawn by ``F.dropout`` (the same distribution as PyTorch's
   ``need_weights=False`` path, other random numbers);
3. ``out_proj`` called as a module (an ``nn.Linear``, covered by the Linear rule) on the
   batch-first attention output.

Blocks. With ``kdim == vdim == embed_dim`` (packed weights) one :class:`KronBlock` named after the
module, with ``G = 3`` groups over ``[in_proj_weight, in_proj_bias]``: group 0 is the query, 1 the
key, 2 the value projection, each with its own input factor (from its own input tokens, so
self- and cross-attention alike) and output factor -- exactly the factors of three ``nn.Linear``
projections with copied weights (``tests/test_attention.py``). With separate ``q/k/v_proj_weight``
(``kdim`` / ``vdim`` differ) the weights are blocks ``<name>.q``, ``<name>.k``, ``<name>.v`` and the
packed bias one bias-only block ``<name>.in_proj_bias`` with 3 groups: the weight-bias cross terms
of each projection are dropped (the block structure of :meth:`Kron.split_bias`).

Expand and reduce over tokens are those of ``nn.Linear``. ``add_bias_kv=True`` (parameters
``bias_k`` / ``bias_v``) is not supported: an error at discovery (ignore the module to leave it
out). Unbatched (2-D) inputs raise while recording.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Binding, UnsupportedModuleError
from .linear import LinearRule


class _RestoreForward:
    """Handle that removes the instance-level ``forward`` override."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


class MultiheadAttentionRule(LinearRule):
    """Rule for ``nn.MultiheadAttention`` (see the module docstring)."""

    module_types = (nn.MultiheadAttention,)
    param_names = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")

    def bindings(self, name: str, module: nn.MultiheadAttention, own: Dict[str, nn.Parameter]) -> List[Binding]:
        if "bias_k" in own or "bias_v" in own:
            raise UnsupportedModuleError(
                f"module {name!r}: nn.MultiheadAttention with add_bias_kv=True (parameters bias_k / bias_v) is not "
                f"supported by K-FAC; pass ignore_modules=[{name!r}] or build it with add_bias_kv=False"
            )
        extra = set(own) - set(self.param_names)
        if extra:
            raise UnsupportedModuleError(
                f"module {name!r} ({type(module).__name__}) has unexpected trainable parameters {sorted(extra)}"
            )
        bias = own.get("in_proj_bias")
        if module._qkv_same_embed_dim:
            return [Binding("", own.get("in_proj_weight"), bias, 3, self)]
        out = [Binding(t, own.get(f"{t}_proj_weight"), None, 1, self) for t in "qkv"]
        out = [b for b in out if b.weight is not None]
        if bias is not None:
            out.append(Binding("in_proj_bias", None, bias, 3, self))
        return out

    def attach(self, module: nn.MultiheadAttention, states: Sequence[Any], recorder: Any) -> List[Any]:
        if "forward" in module.__dict__:
            raise RuntimeError("an nn.MultiheadAttention already has an instance-level forward override")
        module.forward = _recording_forward(module, states, recorder)  # type: ignore[method-assign]
        return [_RestoreForward(module)]


def _projection_weights(module: nn.MultiheadAttention) -> List[Tensor]:
    E = module.embed_dim
    if module._qkv_same_embed_dim:
        return list(module.in_proj_weight.split(E, dim=0))
    return [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]


def _recording_forward(module: nn.MultiheadAttention, states: Sequence[Any], recorder: Any):
    """``module.forward`` with explicit, recorded q/k/v projections (same signature and outputs)."""

    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if query.dim() != 3:
            raise ValueError(
                "K-FAC records nn.MultiheadAttention on batched (3-d) inputs only, "
                f"got a {query.dim()}-d query"
            )
        E = module.embed_dim
        weights = _projection_weights(module)
        biases = list(module.in_proj_bias.split(E)) if module.in_proj_bias is not None else [None] * 3
        projected = []
        for g, x in enumerate((query, key, value)):
            xb = x if module.batch_first else x.transpose(0, 1)  # (N, T, E_in): rows are examples
            y = F.linear(xb, weights[g], biases[g])
            for s in states:
                if s.groups == 3:  # the packed block (or the packed bias alone): group g
                    recorder.record(s, xb, y, group=g)
                elif s.weight is weights[g]:  # separate q/k/v_proj_weight
                    recorder.record(s, xb, y)
            projected.append(y.transpose(0, 1))  # sequence-first for F.multi_head_attention_forward
        eye = torch.eye(E, dtype=query.dtype, device=query.device)
        attn, weights_out = F.multi_head_attention_forward(
            projected[0], projected[1], projected[2], E, module.num_heads,
            None, None, module.bias_k, module.bias_v, module.add_zero_attn, module.dropout,
            eye, None,
            training=module.training, key_padding_mask=key_padding_mask, need_weights=True,
            attn_mask=attn_mask, use_separate_proj_weight=True,
            q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        out = module.out_proj(attn.transpose(0, 1))  # (N, L, E): out_proj's rows are examples too
        return (out if module.batch_first else out.transpose(0, 1)), (weights_out if need_weights else None)

    return forward
