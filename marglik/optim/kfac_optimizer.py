"""K-FAC preconditioned SGD with K-FAC-expand or K-FAC-reduce factors (Eschenhagen et al. 2023).

Usage -- one forward pass per step; the factors come from that same forward::

    opt = KFACOptimizer(model, lr=0.3, damping=1e-2, kl_clip=2e-3, momentum=0.0, approx="expand")
    for X, y in loader:
        opt.zero_grad()
        with opt.track():                 # records layer inputs/outputs (only when a factor update is due)
            out = model(X)
        opt.update_factors(out, y)        # sampled-label backward -> factor EMAs; BEFORE loss.backward()
        loss = F.cross_entropy(out, y)    # mean over the batch
        loss.backward()
        opt.step()

``update_factors`` is a no-op on steps where no factor update is due (``factor_update_every``),
and ``track()`` then records nothing, so those steps cost exactly a first-order step plus the
preconditioning matmuls. ``step(closure)`` is supported in the usual torch way: the closure must
do the above (track, forward, update_factors, backward) itself and return the loss.

What is preconditioned (the ``"kfac"`` parameter group, ``param_groups[0]``):

* every module the engine covers with a Kronecker rule (``nn.Linear``, ``nn.Conv1d/2d/3d``,
  ``nn.MultiheadAttention``'s q/k/v projections (three groups of its packed ``in_proj``) and its
  ``out_proj``, the ``nn.Linear`` layers of a transformer on ``(N, T, D)`` tokens and node-wise
  ``nn.Linear`` of a graph network under :func:`marglik.example_index`): the update of the
  augmented matrix ``M = [W, b]`` (bias = last input column) is
  ``(B ⊗ A + damping)^-1 vec(grad M)`` with the rule of ``damping_rule``;
* raw parameters the engine covers (torchvision ``VisionTransformer.class_token``,
  ``Encoder.pos_embedding``; :mod:`marglik.curvature.layers.leaf`): their exact GGN/Fisher block
  is a bias-only Kronecker block ``B ⊗ 1`` and gets the same update with ``A = 1`` (parameters
  above ``LEAF_DENSE_MAX`` entries: the exact diagonal, updated like a norm layer's blocks);
* norm layers and :class:`marglik.nn.Scale` / :class:`marglik.nn.Bias` when
  ``precondition_norms=True`` (default): the engine's *exact* per-channel ``k x k`` GGN/Fisher
  blocks ``D``, update ``(D + damping I)^-1 grad`` per channel.

Everything else falls back to a first-order update (the ``"fallback"`` group,
``param_groups[1]`` when non-empty): SGD with momentum (``fallback="sgd"``) or AdamW
(``fallback="adamw"``, torch's functional ``torch.optim.adamw.adamw``), learning rate
``fallback_lr`` (default ``lr``). That is

* modules passed in ``ignore_modules`` (names, types or instances; an ignored
  ``nn.MultiheadAttention`` takes its ``out_proj`` with it, since the attention never calls it as
  a module),
* modules without an engine rule that :func:`marglik.curvature.module_selection.is_first_order`
  marks -- the types in ``FIRST_ORDER_TYPES`` (``nn.Embedding``, ``nn.EmbeddingBag``) and classes
  with the attribute ``marglik_first_order = True`` (the model zoo's raw-parameter holders
  :class:`marglik.models.PositionalEmbedding` / :class:`marglik.models.ClassToken` set it) --
  when ``auto_fallback=True`` (default),
* norm layers / Scale / Bias when ``precondition_norms=False``.

Any other module holding trainable parameters without an engine rule (a custom module with a raw
``nn.Parameter``, ``nn.MultiheadAttention(add_bias_kv=True)``, ``nn.Bilinear``, RNNs, ...) raises
:class:`marglik.UnsupportedModuleError` naming the module and the fix.

Scaling. The engine returns factors of the **summed** loss over the batch (``B ⊗ A`` with
``A`` a mean over positions/examples and ``B`` a sum over examples). The optimizer divides ``B``
(and the norm blocks) by the batch size ``N``, so its curvature is that of the loss **averaged
over the N examples** of the batch (summed over output positions within an example) --
``F.cross_entropy(out, y)`` for classification, ``0.5 * ((out - y) ** 2).sum(-1).mean()`` for
regression. Another scaling of the loss only rescales the effective lr and damping. Factors are
exponential moving averages, ``F <- factor_ema * F + (1 - factor_ema) * F_batch`` (the first
update takes ``F_batch``).

Damping (``damping`` = ``lambda``, per example, schedulable via ``param_groups[0]["damping"]``):

* ``damping_rule="pi"``: factored Tikhonov damping (Martens & Grosse 2015),
  ``(B + sqrt(lambda)/pi I) ⊗ (A + pi sqrt(lambda) I)`` with
  ``pi = sqrt((tr A / dim A) / (tr B / dim B))``; inverses by Cholesky.
* ``damping_rule="eigen"``: exact damping ``(B ⊗ A + lambda I)^-1`` in the Kronecker eigenbasis
  (eigendecompositions of ``A`` and ``B``).

Inverses / eigendecompositions are cached in the optimizer state and recomputed every
``inverse_update_every`` steps (and whenever the damping changed or no cache exists).

Update of a preconditioned parameter with preconditioned gradient ``u``: optional KL clipping
(Ba et al. 2017) ``u <- min(1, sqrt(kl_clip / (lr^2 sum <u, g>))) u`` over the whole group,
momentum ``buf <- momentum * buf + u``, decoupled weight decay ``p <- p (1 - lr * weight_decay)``
and ``p <- p - lr * buf``. ``max_grad_norm`` clips the raw gradients of all parameters (joint
2-norm) before anything else.

Practical settings (``scripts/bench_optimizer.py``, ``results/optimizer_steps_to_target*.md``: a
torchvision ViT on warped digits and a GIN on a graph task, mc Fisher, every optimiser tuned by the
same coordinate search): KL clipping is what keeps K-FAC stable -- without it both models diverged
in the first steps (at the chosen ``lr`` and ``momentum``). While the clip binds, the update is
``sqrt(kl_clip / <u, g>) u`` whatever ``lr`` is (on the ViT, K-FAC-expand reached the target at the
same step for ``lr`` 0.03-0.3), so a learning-rate schedule alone does not anneal it: scale ``param_groups[0]["kl_clip"]`` by the square of the
schedule's factor too (the benchmark does). Chosen there: ``kl_clip`` 1e-5 (ViT) / 1e-4 (GNN),
``momentum`` 0.8-0.9, ``damping`` 3e-4..1e-3, factors and inverses every 10-30 steps. A factor or
inverse update costs up to about two plain steps, so periods of 10-30 keep the per-step overhead
small; dense blocks of large raw parameters (the ViT's positional embedding, ``p x p``) dominate
the inverse update (per-step costs in the results' ``step_costs``).

This module holds the optimizer itself (parameter groups, factor tracking, the step); the block
inverses and the preconditioned gradient are :mod:`marglik.optim.preconditioner`, the momentum and
fallback updates :mod:`marglik.optim.updates`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..curvature.blocks import CoveredModule
from ..curvature.kfac import KFAC
from ..curvature.layers import UnsupportedModuleError, find_rule
from ..curvature.module_selection import FIRST_ORDER_TYPES, IgnoreSpec, ignored_modules, is_first_order
from ..curvature.options import BlockKind, FisherType, KFACApprox, Likelihood
from .preconditioner import DAMPING_RULES, DampingRule, precondition, update_inverse
from .updates import FALLBACKS, Fallback, fallback_update, momentum_update

__all__ = ["KFACOptimizer", "DampingRule", "Fallback", "DAMPING_RULES", "FALLBACKS", "FIRST_ORDER_TYPES"]


class KFACOptimizer(torch.optim.Optimizer):
    """K-FAC-expand / K-FAC-reduce preconditioned momentum SGD (see the module docstring).

    Args:
        model: the network; its trainable parameters are optimised.
        lr: learning rate of the preconditioned group (> 0).
        damping: Tikhonov damping ``lambda`` added to the per-example curvature (> 0).
        approx: ``"expand"`` or ``"reduce"``: how weight-sharing axes (tokens, nodes, pixels)
            enter the factors.
        fisher_type: ``"mc"`` (labels sampled from the model; default), ``"mc-root"`` (the loss
            Hessian's root times random signs; one column too), ``"type-2"`` (exact GGN, ``C``
            backward columns) or ``"empirical"`` (true labels).
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"`` (see
            :class:`marglik.KFAC`).
        factor_update_every: recompute factors on steps ``0, k, 2k, ...``.
        inverse_update_every: recompute inverses on steps ``0, k, 2k, ...``.
        factor_ema: EMA decay of the factors in ``[0, 1)`` (0: use the latest batch only).
        weight_decay: decoupled weight decay (``p *= 1 - lr * weight_decay``), all parameters.
        momentum: heavy-ball momentum on the preconditioned update, in ``[0, 1)``.
        damping_rule: ``"pi"`` (factored Tikhonov) or ``"eigen"`` (exact, eigenbasis).
        kl_clip: KL clipping threshold (``None``: off); stored in ``param_groups[0]["kl_clip"]``
            (schedulable like ``lr`` and ``damping``).
        max_grad_norm: clip the joint gradient norm of all parameters first (``None``: off).
        mc_samples: sampled labels or sign vectors per output for ``fisher_type="mc"`` / ``"mc-root"``.
        ignore_modules: modules (names, types, instances) to update first-order.
        auto_fallback: send modules without an engine rule that are first-order by type
            (``FIRST_ORDER_TYPES``) or marker (``marglik_first_order = True``) to the fallback
            without listing them.
        precondition_norms: precondition norm layers / Scale / Bias with their exact diagonal
            blocks (else: fallback).
        fallback: ``"sgd"`` (momentum ``momentum``) or ``"adamw"`` for non-preconditioned params.
        fallback_lr: learning rate of the fallback group (default ``lr``).
        fallback_betas, fallback_eps: AdamW constants of the fallback.
        generator: torch generator for label sampling.

    Raises:
        TypeError: ``model`` is not a module, or an ``ignore_modules`` entry is not a name, type
            or module.
        ValueError: an option is out of range.
        UnsupportedModuleError: a module with trainable parameters has no engine rule and is not
            sent to the fallback, or a parameter is complex.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        damping: float = 1e-3,
        approx: str = "expand",
        fisher_type: str = "mc",
        likelihood: str = "classification",
        factor_update_every: int = 1,
        inverse_update_every: int = 10,
        factor_ema: float = 0.95,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        damping_rule: Union[str, DampingRule] = "pi",
        kl_clip: Optional[float] = None,
        max_grad_norm: Optional[float] = None,
        mc_samples: int = 1,
        ignore_modules: Optional[Sequence[IgnoreSpec]] = None,
        auto_fallback: bool = True,
        precondition_norms: bool = True,
        fallback: Union[str, Fallback] = "sgd",
        fallback_lr: Optional[float] = None,
        fallback_betas: Tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"KFACOptimizer takes the model (an nn.Module), got {type(model).__name__}")
        _check_positive("lr", lr)
        _check_positive("damping", damping)
        if fallback_lr is not None:
            _check_positive("fallback_lr", fallback_lr)
        for name, v in (("factor_update_every", factor_update_every), ("inverse_update_every", inverse_update_every)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 <= factor_ema < 1.0:
            raise ValueError(f"factor_ema must lie in [0, 1), got {factor_ema!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        damping_rule = DampingRule.parse(damping_rule, "damping_rule")
        fallback = Fallback.parse(fallback, "fallback")
        for name, v in (("kl_clip", kl_clip), ("max_grad_norm", max_grad_norm)):
            if v is not None:
                _check_positive(name, v)
        if not all(0.0 <= b < 1.0 for b in fallback_betas):
            raise ValueError(f"fallback_betas must lie in [0, 1), got {fallback_betas!r}")
        KFACApprox.parse(approx, "K-FAC approximation")  # clear errors before discovery
        FisherType.parse(fisher_type, "fisher_type")
        Likelihood.parse(likelihood, "likelihood")

        self.model = model
        self.damping_rule = damping_rule
        self.factor_update_every = factor_update_every
        self.inverse_update_every = inverse_update_every
        self.factor_ema = float(factor_ema)
        self.max_grad_norm = max_grad_norm
        self.fallback = fallback
        self.fallback_betas = tuple(float(b) for b in fallback_betas)
        self.fallback_eps = float(fallback_eps)

        ignore = self._engine_ignores(model, list(ignore_modules or []), auto_fallback, precondition_norms)
        for p in model.parameters():
            if p.requires_grad and p.is_complex():
                raise UnsupportedModuleError("complex parameters are not supported by KFACOptimizer")
        try:
            self.kfac = KFAC(
                model, likelihood=likelihood, approx=approx, fisher_type=fisher_type, mc_samples=mc_samples,
                ignore_modules=ignore, generator=generator,
                # dense factors: the EMA over updates fills a factor's rank after d / m updates, so
                # rows (marglik.curvature.row_factor) would be multiplied out at once; the inverses
                # are amortised over inverse_update_every steps anyway
                factor_form="dense",
            )
        except UnsupportedModuleError as err:
            raise UnsupportedModuleError(
                f"{err}. KFACOptimizer preconditions nn.Linear, nn.ConvNd, norm layers and marglik.nn.Scale/"
                "Bias; every other parameter-holding module must go to the first-order fallback via "
                "ignore_modules (or be one of KFACOptimizer's FIRST_ORDER_TYPES)"
            ) from None
        self.layers: List[CoveredModule] = self.kfac.covered  # the preconditioned blocks
        covered = {id(p) for layer in self.layers for p in layer.params}
        kfac_params = [p for p in model.parameters() if id(p) in covered]
        fallback_params = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]

        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        groups: List[Dict[str, Any]] = [dict(params=kfac_params, kind="kfac", kl_clip=kl_clip)]
        if fallback_params:
            fb_lr = fallback_lr if fallback_lr is not None else lr
            groups.append(dict(params=fallback_params, kind="fallback", lr=fb_lr))
        super().__init__(groups, defaults)
        self._recording: Optional[Any] = None  # the engine recorder of the current tracked forward
        self._tracked = False

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _engine_ignores(
        model: nn.Module, specs: List[IgnoreSpec], auto_fallback: bool, precondition_norms: bool
    ) -> List[nn.Module]:
        """Module instances the engine must skip (their parameters become fallback parameters)."""
        ignored = ignored_modules(model, specs)
        seen = {id(m) for m in ignored}
        for module in model.modules():
            if id(module) in seen or not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            rule = find_rule(module)
            if rule is None:
                first_order = auto_fallback and is_first_order(module)
            else:  # norm layers, Scale / Bias and raw parameters have blocks other than Kronecker ones
                first_order = rule.kind is not BlockKind.KRON and not precondition_norms
            if first_order:
                seen.add(id(module))
                ignored.append(module)
        return ignored

    # ------------------------------------------------------------------ factor tracking
    @property
    def steps(self) -> int:
        """Number of :meth:`step` calls so far (persisted in the state dict)."""
        return int(self._global_state().get("step", 0))

    def _global_state(self) -> Dict[str, Any]:
        return self.state[self.param_groups[0]["params"][0]]

    @property
    def factors_due(self) -> bool:
        """Whether the coming step refreshes the factors (``steps % factor_update_every == 0``)."""
        return self.steps % self.factor_update_every == 0

    @contextlib.contextmanager
    def track(self, force: bool = False) -> Iterator[None]:
        """Context for the training forward pass: records the covered layers if a factor update is
        due this step; follow with :meth:`update_factors` before ``backward``.

        Args:
            force: record even when no factor update is due.

        Yields:
            ``None``.
        """
        if not (force or self.factors_due):
            self._recording, self._tracked = None, False
            yield None
            return
        self.kfac.reset()
        with self.kfac.capture() as rec:
            yield None
        self._recording, self._tracked = rec, True

    def update_factors(self, out: Tensor, y: Tensor) -> bool:
        """Turn the tracked forward into factor EMAs.

        Runs the engine's sampled-label (mc) / Hessian-square-root (type-2) backward to the layer
        outputs with ``retain_graph=True``; it never touches ``.grad``. Call it before
        ``loss.backward()``.

        Args:
            out: the model output of the tracked forward (``(N, C)``, or ``(N, R, C)`` with one
                loss term per position).
            y: the targets (used by ``fisher_type="empirical"`` and for validation).

        Returns:
            Whether factors were updated (``False`` when no factor update was due).

        Raises:
            RuntimeError: the forward's graph was already freed (``loss.backward()`` ran first).
        """
        rec = self._recording
        if rec is None:
            return False
        self._recording, self._tracked = None, False
        try:
            rec.accumulate(out, y, retain_graph=True)
        except RuntimeError as err:
            if "second time" in str(err) or "freed" in str(err):
                raise RuntimeError(
                    "update_factors(out, y) needs the autograd graph of the forward pass: call it before "
                    "loss.backward() (or backward with retain_graph=True)"
                ) from err
            raise
        kron = self.kfac.result()
        N = float(kron.num_data)
        beta = self.factor_ema
        for layer, block in zip(self.layers, kron.blocks):
            st = self.state[layer.key]
            new = {"A": block.A, "B": block.B / N} if layer.kind is BlockKind.KRON else {"D": block.blocks / N}
            first = "factor_updates" not in st
            for k, v in new.items():
                v = v.detach()
                st[k] = v.clone() if first else st[k].mul_(beta).add_(v, alpha=1.0 - beta)
            st["factor_updates"] = st.get("factor_updates", 0) + 1
        return True

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """Apply one update from the current ``.grad`` (see the module docstring).

        Args:
            closure: optional; re-runs the tracked forward, :meth:`update_factors` and the backward,
                and returns the loss.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: a tracked forward was not followed by :meth:`update_factors`, no factors
                exist yet for some layer, or a gradient is sparse.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._tracked:
            self._recording, self._tracked = None, False
            raise RuntimeError(
                "a forward pass was tracked with opt.track() but update_factors(out, y) was not called before "
                "step(); call it after the forward and before loss.backward()"
            )
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        "KFACOptimizer does not support sparse gradients (e.g. nn.Embedding(sparse=True))"
                    )
        missing = [layer.name for layer in self.layers if "factor_updates" not in self.state[layer.key]]
        if missing:
            raise RuntimeError(
                f"no curvature factors yet for {missing}: run the forward pass inside opt.track() and call "
                "opt.update_factors(out, y) before loss.backward() (at least on the first step)"
            )
        if self.max_grad_norm is not None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

        gstate = self._global_state()
        step = int(gstate.get("step", 0))
        for group in self.param_groups:
            if group["kind"] == "kfac":
                self._kfac_group_step(group, step)
            else:
                self._fallback_group_step(group)
        gstate["step"] = step + 1
        return loss

    def _kfac_group_step(self, group: Dict[str, Any], step: int) -> None:
        lr, damping = group["lr"], group["damping"]
        mom, wd = group["momentum"], group["weight_decay"]
        kl_clip = group.get("kl_clip")
        _check_positive("damping", damping)
        due = step % self.inverse_update_every == 0
        updates: List[Tuple[nn.Parameter, Tensor]] = []
        vg = 0.0
        for layer in self.layers:
            if all(p.grad is None for p in layer.params):
                continue
            st = self.state[layer.key]
            stale = st.get("inv_damping") != float(damping) or st.get("inv_rule") != DAMPING_RULES.index(
                self.damping_rule
            )
            if due or stale:
                update_inverse(st, layer.kind, damping, self.damping_rule)
            for p, u in zip(layer.params, precondition(st, layer, damping, self.damping_rule)):
                updates.append((p, u))
                if kl_clip is not None and p.grad is not None:
                    vg += float((u * p.grad).sum())
        nu = 1.0
        if kl_clip is not None and vg > 0:
            nu = min(1.0, math.sqrt(kl_clip / (lr**2 * vg)))
        for p, u in updates:
            if nu != 1.0:
                u = u * nu
            momentum_update(p, u, self.state[p], lr, mom, wd)

    def _fallback_group_step(self, group: Dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is None:  # no state entry either (torch's optimizer state is a defaultdict)
                continue
            fallback_update(p, self.state[p], self.fallback, group["lr"], group["momentum"], group["weight_decay"],
                            self.fallback_betas, self.fallback_eps)

    def __repr__(self) -> str:
        g = self.param_groups[0]
        n_fb = sum(p.numel() for gr in self.param_groups[1:] for p in gr["params"])
        return (
            f"KFACOptimizer(approx={self.kfac.approx.value!r}, fisher_type={self.kfac.fisher_type.value!r}, "
            f"lr={g['lr']}, damping={g['damping']}, damping_rule={self.damping_rule.value!r}, "
            f"layers={len(self.layers)}, fallback={self.fallback.value!r} on {n_fb} parameters)"
        )


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")

