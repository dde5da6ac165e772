"""The WRN-16-4 marginal-likelihood steps the WRN benchmarks time (a library module, no entry point).

Shared by ``scripts/bench_wrn_cost.py`` (cost against augmented copies) and
``scripts/bench_marglik_step.py`` (one step against laplace-torch, with its breakdown and floor):

* :func:`marglik_step`: what the tuning loop does per hyperstep -- augment into ``S`` copies
  (optional), ``KronLaplace.fit`` (type-2, differentiable when augmenting), log marginal likelihood at
  a layerwise prior, gradient w.r.t. the log prior (and ``eta``);
* :func:`peer_step`: the same without augmentation in laplace-torch with its curvlinops backend;
* references: :func:`train_step` (a plain MAP step on the same batch: the activations),
  :func:`ggn_backward_step` (the class-wise backward passes to the *parameters* with their graphs:
  the activations of a differentiable GGN) and :func:`floor_step` (what a type-2 K-FAC fit cannot
  avoid: the forward and ``K = C - 1`` backward passes to the covered layers' outputs, with their
  graphs and the gradient through them to ``eta`` when augmenting; no factors).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import marglik
from marglik.augment import AffineAugmentation
from marglik.curvature.likelihoods import curvature_columns

from benchlib import random_batch, sync, wide_resnet

#: flavour -> (approx over pixels, copies_approx over augmented copies)
FLAVOURS: Dict[str, Tuple[str, str]] = {
    "expand": ("expand", "expand"),
    "mixed": ("expand", "reduce"),
    "reduce": ("reduce", "reduce"),
}


#: the contender that is a plain training step (the activation reference, not a marglik step)
TRAIN_STEP = "train-step"
#: the K differentiable backward passes of a type-2 GGN alone (the activations of a differentiable fit)
GGN_BACKWARD = "ggn-backward"


def build_model(device: torch.device, width: int, depth: int, seed: int = 0) -> nn.Module:
    """WRN-``depth``-``width`` without normalisation, small random init on the zero-initialised layers."""
    return wide_resnet(depth, width, device, seed, reinit_zero=True).eval()


def build_data(batch: int, image: int, device: torch.device, seed: int = 1):
    return random_batch(batch, image, device, torch.Generator().manual_seed(seed))


def _augment(X, S: int, seed: int = 0) -> Tuple[AffineAugmentation, torch.Tensor]:
    """``S`` augmented copies ``(B, S, C, H, W)`` of ``X`` (all six generators at ``eta = 0.1``)."""
    aug = AffineAugmentation(n_samples=S).to(X.device)
    with torch.no_grad():
        aug.eta.fill_(0.1)
    return aug, aug(X, generator=torch.Generator(device=X.device).manual_seed(seed))


def as_batches(X, y, batch_size: Optional[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(X, y)`` in consecutive batches of ``batch_size`` (``None``: one batch)."""
    if batch_size is None or batch_size >= len(y):
        return [(X, y)]
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def marglik_step(model, X, y, S: int, flavour: str, num_data: Optional[int], augment: bool = True,
                 batch_size: Optional[int] = None, factor_form: str = "auto",
                 timer: Optional[Dict[str, float]] = None) -> float:
    """One marglik step (augment, fit on batches of ``batch_size``, log marglik, gradient); returns the
    log marglik. ``timer``: adds the seconds of the fit (forward, backward passes, factor products, the
    decomposition) under ``"fit"``, of the decomposition alone (timed again on the fitted factors,
    outside the step) under ``"decompose"`` and of the log marglik and its gradient under
    ``"logdet_grad"``."""
    approx, copies = FLAVOURS[flavour]
    n_layers = sum(1 for _ in model.parameters())
    log_prior = torch.zeros(n_layers, device=X.device, requires_grad=True)
    hyper = [log_prior]
    if augment:
        aug, Xa = _augment(X, S)
        hyper.append(aug.eta)
    else:
        Xa = X
    la = marglik.KronLaplace(model, "classification", approx=approx, copies_approx=copies,
                             prior_precision=1.0, differentiable=augment, factor_form=factor_form)
    t0 = time.perf_counter()
    la.fit(as_batches(Xa, y, batch_size), num_data=num_data)
    sync(X.device)
    t1 = time.perf_counter()
    lml = la.log_marginal_likelihood(prior_precision=log_prior.exp())
    torch.autograd.grad(lml, hyper)
    sync(X.device)
    t2 = time.perf_counter()
    if timer is not None:
        timer["fit"] = timer.get("fit", 0.0) + t1 - t0
        timer["logdet_grad"] = timer.get("logdet_grad", 0.0) + t2 - t1
        t3 = time.perf_counter()
        marglik.DecomposedKron(la.kron)
        sync(X.device)
        timer["decompose"] = timer.get("decompose", 0.0) + time.perf_counter() - t3
        timer["row_factors"] = sum(isinstance(F, marglik.curvature.RowFactor) for b in la.kron.blocks
                                   if isinstance(b, marglik.KronBlock) for F in (b.A_factor, b.B_factor))
        timer["factors"] = 2 * sum(isinstance(b, marglik.KronBlock) for b in la.kron.blocks)
    return float(lml.detach())


def train_step(model, X, y, S: int) -> float:
    """The reference for "the activations": one MAP training step on the same augmented batch
    (augment into S copies, forward, mean cross-entropy of the copy-averaged logits, backward to the
    weights and ``eta``), no curvature. A marglik step cannot need less memory than this, because
    its fit back-propagates through the same forward pass; what it needs beyond this is the cost of
    the curvature itself."""
    aug, Xa = _augment(X, S)  # (B, S, C, H, W)
    logits = model(Xa.flatten(0, 1)).unflatten(0, Xa.shape[:2]).mean(1)
    loss = nn.functional.cross_entropy(logits, y)
    torch.autograd.grad(loss, [*model.parameters(), aug.eta])
    return float(loss)


def ggn_backward_step(model, X, y, S: int) -> float:
    """The reference for "the activations of a differentiable curvature": the backward passes a
    type-2 GGN needs (one per class, through the same augmented forward pass, each keeping its graph
    for a second differentiation, as a fit with ``differentiable=True`` must), then a gradient of
    their summed squares to ``eta``. No factors, no eigendecompositions. Memory that a marglik step
    needs beyond this grows with the copies only if the curvature itself stores per-copy data."""
    aug, Xa = _augment(X, S)
    logits = model(Xa.flatten(0, 1)).unflatten(0, Xa.shape[:2]).mean(1)  # (B, K)
    params = list(model.parameters())
    total = logits.new_zeros(())
    for k in range(logits.shape[1]):
        grads = torch.autograd.grad(logits[:, k].sum(), params, create_graph=True)
        total = total + sum((g * g).sum() for g in grads)
    torch.autograd.grad(total, [aug.eta])
    return float(total)


def peer_step(model, X, y, approx: str, num_data: Optional[int] = None, batch_size: Optional[int] = None) -> float:
    """laplace-torch + curvlinops: fit, log marglik, gradient w.r.t. the layerwise log prior."""
    from laplace import KronLaplace as LTKronLaplace
    from laplace.curvature import CurvlinopsGGN

    n_layers = sum(1 for _ in model.parameters())
    log_prior = torch.zeros(n_layers, device=X.device, requires_grad=True)
    from torch.utils.data import DataLoader, TensorDataset

    # laplace-torch passes KronLaplace's ``asdl_fisher_kwargs`` on to every backend's ``kron``;
    # curvlinops' operator reads ``kfac_approx`` from them. It sets N = len(dataset): the batch.
    la = LTKronLaplace(model, "classification", backend=CurvlinopsGGN, asdl_fisher_kwargs={"kfac_approx": approx})
    la.fit(DataLoader(TensorDataset(X, y), batch_size=batch_size or len(y)))
    lml = la.log_marginal_likelihood(prior_precision=log_prior.exp())
    torch.autograd.grad(lml, [log_prior])
    return float(lml)




def floor_step(model, X, y, S: int = 1, augment: bool = False, batch_size: Optional[int] = None,
               timer: Optional[Dict[str, float]] = None) -> float:
    """What a type-2 K-FAC fit cannot avoid: per batch, the forward pass (through the augmentation
    when augmenting; channels-last on CPU without augmentation, as the engine runs it) and ``K = C - 1`` backward passes of the loss-Hessian square-root columns to the
    outputs of the covered ``nn.Conv2d`` / ``nn.Linear`` layers (no parameter gradients, no factor
    arithmetic); when augmenting, with their graphs kept and a gradient of their summed squares to
    ``eta`` (the second-order backward the augmentation gradient needs). ``timer`` gets ``"forward"``,
    ``"backward"`` (and ``"eta_grad"``)."""
    aug, Xa = _augment(X, S) if augment else (None, X)
    if not augment and X.device.type == "cpu":  # as the engine runs a 4-D input on CPU (channels_last="auto")
        Xa = Xa.contiguous(memory_format=torch.channels_last)
    total = torch.zeros((), device=X.device)
    t = {"forward": 0.0, "backward": 0.0, "eta_grad": 0.0}
    for Xb, yb in as_batches(Xa, y, batch_size):
        outputs: List[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out))
                 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        sync(X.device)
        t0 = time.perf_counter()
        try:
            if augment:
                logits = model(Xb.flatten(0, 1)).unflatten(0, Xb.shape[:2]).mean(1)
            else:
                logits = model(Xb)
        finally:
            for h in hooks:
                h.remove()
        cols = curvature_columns(marglik.Likelihood.CLASSIFICATION, marglik.FisherType.TYPE2, logits, yb, 1, None)
        if not augment:
            cols = cols.detach()
        sync(X.device)
        t1 = time.perf_counter()
        for k in range(cols.shape[0]):
            grads = torch.autograd.grad(logits, outputs, grad_outputs=cols[k], retain_graph=True,
                                        create_graph=augment)
            if augment:
                total = total + sum(g.square().sum() for g in grads)
        sync(X.device)
        t["forward"] += t1 - t0
        t["backward"] += time.perf_counter() - t1
    if augment:
        t2 = time.perf_counter()
        torch.autograd.grad(total, [aug.eta])
        sync(X.device)
        t["eta_grad"] = time.perf_counter() - t2
    if timer is not None:
        for k, v in t.items():
            timer[k] = timer.get(k, 0.0) + v
    return float(total.detach())


def time_round_robin(fns: Dict[str, Callable], args, repeats: int, warmup: int, device) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn(*args)
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn(*args)
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


