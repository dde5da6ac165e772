"""Curvature backends of the tuning loop: marglik's own K-FAC, or a peer through laplace-torch.

``curvature.backend`` picks who computes the curvature of the Laplace log marginal likelihood,
``curvature.structure`` its structure. Everything else -- data, batches, ``num_data`` rescaling,
prior structure, the hyperparameter optimiser -- is the tuning loop's and identical for all, so
a W&B group compares only the curvature.

=============  =======================================  =======================================
backend        ``structure=kron``                       ``structure=diag``
=============  =======================================  =======================================
``marglik``    :class:`marglik.KronLaplace`, expand or  not offered (see below)
               reduce (``curvature.approx``)
``curvlinops`` laplace-torch ``KronLaplace`` with       laplace-torch ``DiagLaplace`` with
               ``CurvlinopsGGN``/``EF``: curvlinops'    ``CurvlinopsGGN``/``EF`` (its diagonal is
               ``KFACLinearOperator``, expand or        laplace-torch's ``torch.func`` GGN /
               reduce                                   per-example gradients)
``asdl``       ``AsdlGGN``/``EF``: K-FAC-expand only    ``AsdlGGN``/``EF``
``backpack``   ``BackPackGGN``: KFLR (type-2) / KFAC    ``BackPackGGN``/``EF``: DiagGGNExact /
               (mc); no EF                              DiagGGNMC / SumGradSquared
=============  =======================================  =======================================

Conventions (all checked in ``tests/test_tuning_backends.py``): laplace-torch keeps separate
weight and bias blocks, so its Kronecker peers are compared with marglik's joint weight+bias
blocks only up to those cross terms; ``curvature.separate_bias=true`` gives marglik the peers'
block structure (``null``, the default, is joint for marglik and separate for the peers; ``false``
with a peer is an error, laplace-torch has no joint blocks). On layers without weight sharing (an MLP) curvlinops, ASDL
and BackPACK give exactly marglik's expand (= reduce) factors. On convolutions ASDL and curvlinops
``expand`` give marglik's expand factors; BackPACK's KFLR/KFAC give ``(R A_expand) ⊗ B_reduce``
(``R`` output positions; see ``tests/test_backpack_kflr.py``).

``structure=diag`` with ``backend=marglik`` is an error, by decision: marglik's engine computes
Kronecker factors only, and laplace-torch's diagonal for marglik's backend class would be
``GGNInterface.diag`` (``torch.func`` Jacobians) -- the very code ``backend=curvlinops
structure=diag`` already runs, so it would duplicate a peer under marglik's name.

The subset estimator (``hyper.marglik_batches``) is reproduced for the peers: laplace-torch fits
the ``M`` seen examples as if they were the data set (``A`` a mean over them), then the summed
loss and the curvature (``B``, the 1-d blocks, or the diagonal) are multiplied by ``N / M`` --
marglik's ``num_data`` rescaling.

Learned augmentation needs factors differentiable w.r.t. the augmentation parameters, which only
marglik computes: a peer with ``hyper.augmentation=true`` is a configuration error.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..compat import check_torchvision, import_laplace
from ..errors import UserError
from .choices import Choice
from .flavour_config import approx_spec

__all__ = [
    "BackendUnsupportedError",
    "CurvatureBackend",
    "CurvatureStructure",
    "PeerLaplace",
    "build_laplace",
    "check_curvature_config",
    "check_backend_runs",
    "curvature_label",
    "resolved_separate_bias",
    "sequential_view",
]


class CurvatureBackend(Choice):
    """``curvature.backend``."""

    marglik = "marglik"
    curvlinops = "curvlinops"
    asdl = "asdl"
    backpack = "backpack"


class CurvatureStructure(Choice):
    """``curvature.structure``."""

    kron = "kron"
    diag = "diag"


def _parse(enum: type, value: Any, what: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{what} must be one of {'|'.join(m.value for m in enum)}, got {value!r}") from None


def check_curvature_config(curvature: Any, augmentation: bool) -> None:
    """Reject combinations a backend cannot compute; needs no model (called by ``Config.validate``).

    Args:
        curvature: the ``curvature`` section (``backend``, ``structure``, ``approx``,
            ``fisher_type``, ``mc_samples``).
        augmentation: ``hyper.augmentation``.

    Raises:
        ValueError: naming the option and why.
    """
    backend = _parse(CurvatureBackend, curvature.backend, "curvature.backend")
    structure = _parse(CurvatureStructure, curvature.structure, "curvature.structure")
    b = backend.value
    if backend is not CurvatureBackend.marglik and getattr(curvature, "separate_bias", None) is False:
        raise ValueError(
            f"curvature.separate_bias=false (joint weight+bias Kronecker blocks) is marglik's structure; "
            f"laplace-torch's peers (backend={b}) always keep weight and bias apart: set curvature.separate_bias=true "
            "or null, or use backend=marglik"
        )
    if backend is CurvatureBackend.marglik:
        if structure is CurvatureStructure.diag:
            raise ValueError(
                "curvature.structure=diag is not offered by backend=marglik (its engine computes Kronecker "
                "factors only); use curvature.backend=curvlinops|asdl|backpack for a diagonal GGN"
            )
        return
    if augmentation:
        raise ValueError(
            f"hyper.augmentation=true needs curvature factors differentiable w.r.t. the augmentation, which only "
            f"curvature.backend=marglik computes; set hyper.augmentation=false to use backend={b}"
        )
    kron = structure is CurvatureStructure.kron
    if kron and curvature.approx == "reduce" and backend in (CurvatureBackend.asdl, CurvatureBackend.backpack):
        why = ("ASDL implements only K-FAC-expand" if backend is CurvatureBackend.asdl else
               "BackPACK's KFLR/KFAC have one fixed convention (expand on linear layers; (R A_expand) x B_reduce "
               "on convolutions)")
        raise ValueError(
            f"curvature.backend={b} has no K-FAC-reduce ({why}); set curvature.approx=expand, or use "
            "backend=marglik|curvlinops for reduce"
        )
    if kron and backend is CurvatureBackend.backpack and curvature.fisher_type == "empirical":
        raise ValueError(
            "curvature.backend=backpack has no Kronecker-factored empirical Fisher (laplace-torch's BackPackEF.kron "
            "is unavailable); use fisher_type=type-2|mc or structure=diag"
        )
    if curvature.fisher_type == "mc" and curvature.mc_samples != 1 and not (
        kron and backend is CurvatureBackend.curvlinops
    ):
        raise ValueError(
            f"curvature.mc_samples={curvature.mc_samples}: laplace-torch's {b} {structure.value} backend draws one "
            "MC sample; set curvature.mc_samples=1 (only backend=marglik and curvlinops kron take more)"
        )


def resolved_separate_bias(curvature: Any) -> bool:
    """Whether a layer's weight and bias get separate Kronecker blocks (``curvature.separate_bias``
    with ``null`` resolved: joint for ``backend=marglik``, separate for laplace-torch's peers).

    Args:
        curvature: the ``curvature`` section (a config object or its dict).

    Returns:
        ``True``: separate ``W`` and ``b`` blocks; ``False``: one joint ``[W, b]`` block.
    """
    get = curvature.get if isinstance(curvature, dict) else lambda k, d=None: getattr(curvature, k, d)
    value = get("separate_bias", None)
    if value is None:
        return str(get("backend", "marglik")) != CurvatureBackend.marglik.value
    return bool(value)


def curvature_label(curvature: Dict[str, Any]) -> str:
    """Short name of the curvature of a run, e.g. ``marglik-expand-reduce`` (K-FAC-expand on
    positions, reduce on augmented copies), ``curvlinops-kron-expand``,
    ``asdl-diag``; used as the W&B ``job_type`` and default run name. marglik's label ends in
    ``-sepbias`` with separate weight and bias blocks (``curvature.separate_bias=true``; the peers'
    blocks are always separate, their label does not say it). Missing keys take the defaults
    (``marglik``, ``kron``).

    Args:
        curvature: the ``curvature`` section of a config dict.

    Returns:
        The label.
    """
    backend = curvature.get("backend", "marglik")
    structure = curvature.get("structure", "kron")
    if backend == "marglik":  # K-FAC on positions, then on augmented copies (null: as on positions)
        label = f"marglik-{curvature['approx']}-{curvature.get('copies_approx') or curvature['approx']}"
        return label + ("-sepbias" if resolved_separate_bias(curvature) else "")
    if structure == "diag":
        return f"{backend}-diag"
    return f"{backend}-kron-{curvature['approx']}"


def sequential_view(model: nn.Module) -> nn.Sequential:
    """The model as an ``nn.Sequential`` sharing its modules (BackPACK's requirement).

    ``model`` itself if it is one, else ``model.as_sequential()`` (:class:`marglik.models.MLP` and
    :class:`marglik.models.SmallCNN` have it; it computes the single-image forward pass).

    Args:
        model: the network.

    Returns:
        A sequential view whose parameters are ``model``'s.

    Raises:
        BackendUnsupportedError: the model has no sequential form (a ``ValueError``).
        ValueError: its parameters differ from the view's.
    """
    if isinstance(model, nn.Sequential):
        return model
    make = getattr(model, "as_sequential", None)
    view = make() if callable(make) else None
    if view is None:
        raise BackendUnsupportedError(
            f"curvature.backend=backpack needs an nn.Sequential model (BackPACK backpropagates its quantities "
            f"module by module), and {type(model).__name__} has no sequential form (as_sequential); use "
            "model=mlp|cnn or backend=curvlinops|asdl"
        )
    mine = [id(p) for p in model.parameters() if p.requires_grad]
    theirs = [id(p) for p in view.parameters() if p.requires_grad]
    if mine != theirs:
        raise ValueError(f"{type(model).__name__}.as_sequential() does not hold the model's parameters in order")
    return view


_PEER_LAYERS = (nn.Linear, nn.Conv2d)


def _check_peer_layers(model: nn.Module, backend: str) -> None:
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            ok = isinstance(module, _PEER_LAYERS) and getattr(module, "groups", 1) == 1
            if not ok:
                raise BackendUnsupportedError(
                    f"curvature.backend={backend}: module {name!r} ({type(module).__name__}) has parameters, but the "
                    "tuning loop runs laplace-torch's peers only on models whose parameters live in nn.Linear / "
                    "ungrouped nn.Conv2d (the layers curvlinops, ASDL and BackPACK all cover); use backend=marglik"
                )


class _Batches:
    """The batches as laplace-torch's ``fit`` wants a loader: iterable, with ``len(.dataset)``."""

    def __init__(self, batches: List[Tuple[Tensor, Tensor]]) -> None:
        self.batches = batches
        self.dataset = range(sum(len(y) for _, y in batches))

    def __iter__(self):
        return iter(self.batches)


class PeerLaplace:
    """A laplace-torch ``Laplace(subset_of_weights="all")`` behind :class:`marglik.KronLaplace`'s
    interface as the tuning loop uses it (``fit(batches, num_data)``, ``log_marginal_likelihood``,
    ``n_layers``).

    Args:
        model: the network (for ``backend="backpack"`` its :func:`sequential_view` is used).
        backend: ``"curvlinops"``, ``"asdl"`` or ``"backpack"``.
        structure: ``"kron"`` or ``"diag"``.
        approx: ``"expand"`` / ``"reduce"`` (kron; reduce only with curvlinops).
        fisher_type: ``"type-2"`` (``*GGN``), ``"mc"`` (``*GGN(stochastic=True)``) or
            ``"empirical"`` (``*EF``).
        mc_samples: MC samples (curvlinops kron only; 1 elsewhere).
        prior_precision: 0-d (scalar) or ``(L,)`` (layerwise, one per trainable parameter tensor).

    Raises:
        ValueError: an unknown backend, structure or fisher type; ``backend="marglik"``.
        BackendUnsupportedError: a layer or model form the peer cannot handle (a ``ValueError``).
        IncompatibleInstallError: torchvision (imported by laplace-torch) does not match torch.
    """

    def __init__(
        self,
        model: nn.Module,
        backend: str,
        structure: str,
        approx: str = "expand",
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        prior_precision: Any = 1.0,
    ) -> None:
        # laplace-torch imports torchvision (through torchmetrics): a mismatch is not the peer's fault
        Laplace = import_laplace().Laplace

        self.backend = _parse(CurvatureBackend, backend, "backend")
        self.structure = _parse(CurvatureStructure, structure, "structure")
        if self.backend is CurvatureBackend.marglik:
            raise ValueError("PeerLaplace runs the peers; backend=marglik is marglik.KronLaplace")
        self.model = sequential_view(model) if self.backend is CurvatureBackend.backpack else model
        _check_peer_layers(self.model, self.backend.value)
        self._backend_cls, backend_kwargs = self._backend_class(fisher_type)
        fisher_kwargs: Dict[str, Any] = {}
        if self.backend is CurvatureBackend.curvlinops and self.structure is CurvatureStructure.kron:
            fisher_kwargs["kfac_approx"] = approx
            if fisher_type == "mc":
                fisher_kwargs["mc_samples"] = int(mc_samples)
        self.la = Laplace(
            self.model, "classification", subset_of_weights="all", hessian_structure=self.structure.value,
            backend=self._backend_cls, backend_kwargs=backend_kwargs, asdl_fisher_kwargs=fisher_kwargs,
            prior_precision=prior_precision,
        )
        self.n_layers = self.la.n_layers
        self.n_data = 0

    def _backend_class(self, fisher_type: str) -> Tuple[type, Dict[str, Any]]:
        lc = import_laplace().curvature

        classes = {
            CurvatureBackend.curvlinops: (lc.CurvlinopsGGN, lc.CurvlinopsEF),
            CurvatureBackend.asdl: (lc.AsdlGGN, lc.AsdlEF),
            CurvatureBackend.backpack: (lc.BackPackGGN, lc.BackPackEF),
        }[self.backend]
        if fisher_type == "empirical":
            return classes[1], {}
        if fisher_type not in ("type-2", "mc"):
            raise ValueError(f"fisher_type must be type-2|mc|empirical, got {fisher_type!r}")
        return classes[0], {"stochastic": fisher_type == "mc"}

    def fit(self, batches: Iterable[Tuple[Tensor, Tensor]], num_data: Optional[int] = None) -> "PeerLaplace":
        """Fit on ``batches`` (a list of ``(X, y)``) and rescale to ``num_data`` examples.

        laplace-torch sums the loss and ``B`` (or the diagonal) over the batches and averages ``A``
        over the ``M`` examples seen; with ``num_data = N`` the loss and ``B`` / the 1-d blocks /
        the diagonal are multiplied by ``N / M`` (marglik's subset estimator).

        Args:
            batches: ``(X, y)`` batches, ``M`` examples in all.
            num_data: the data-set size ``N`` to represent (``None``: ``M``).

        Returns:
            ``self``.

        Raises:
            ValueError: ``batches`` hold no example.
            RuntimeError: BackPACK cannot hook a model ASDL has run on (the message says the fix).
        """
        batches = list(batches)
        loader = _Batches(batches)
        seen = len(loader.dataset)
        if seen == 0:
            raise ValueError("the training data is empty")
        try:
            self.la.fit(loader)
        except RuntimeError as e:
            if "regular backward hooks and full backward hooks" not in str(e):
                raise
            raise RuntimeError(
                "BackPACK cannot hook a model on which ASDL has run (ASDL registers torch's legacy backward hooks, "
                "and torch then refuses full backward hooks on those modules): give each backend its own copy of "
                "the model (copy.deepcopy)"
            ) from e
        finally:
            if self.backend is CurvatureBackend.backpack:
                _remove_backpack_hooks(self.model)
        N = seen if num_data is None else int(num_data)
        scale = N / seen
        la = self.la
        if scale != 1.0:
            la.loss = la.loss * scale
            if self.structure is CurvatureStructure.kron:
                for factors in la.H_facs.kfacs:
                    factors[0] = factors[0] * scale  # B of [B, A], or the single factor of a 1-d block
                la.H = la.H_facs.decompose(damping=la.damping)
            else:
                la.H = la.H * scale
        la.n_data = N
        self.n_data = N
        return self

    def log_marginal_likelihood(self, prior_precision: Optional[Tensor] = None) -> Tensor:
        """laplace-torch's Laplace log marginal likelihood.

        Args:
            prior_precision: 0-d or ``(L,)`` (``None``: the one given at construction).

        Returns:
            A 0-d tensor, differentiable w.r.t. ``prior_precision``.
        """
        return self.la.log_marginal_likelihood(prior_precision=prior_precision)


def _remove_backpack_hooks(model: nn.Module) -> None:
    """Undo ``backpack.extend``: its hooks would otherwise stay on the model during MAP training."""
    from backpack import memory_cleanup
    from backpack.context import CTX

    CTX.remove_hooks()
    for module in model.modules():
        if getattr(module, "_backpack_extend", False):
            module._backpack_extend = False
        memory_cleanup(module)


def build_laplace(curvature: Any, model: nn.Module, prior_precision: Tensor, differentiable: bool):
    """The Laplace approximation the tuning loop fits (classification likelihood).

    Args:
        curvature: the ``curvature`` section of a config (``backend``, ``structure``, ``approx``,
            ``copies_approx``, ``fisher_type``, ``mc_samples``).
        model: the network.
        prior_precision: 0-d or ``(L,)``.
        differentiable: keep the fit differentiable (gradients to the augmentation parameters;
            marglik backend only).

    Returns:
        An unfitted :class:`marglik.KronLaplace` for ``backend=marglik``, else a :class:`PeerLaplace`.

    Raises:
        ValueError: an unknown backend.
    """
    backend = _parse(CurvatureBackend, curvature.backend, "curvature.backend")
    if backend is CurvatureBackend.marglik:
        from ..laplace import KronLaplace

        return KronLaplace(
            model, likelihood="classification", approx=approx_spec(curvature),
            copies_approx=curvature.copies_approx, fisher_type=curvature.fisher_type,
            mc_samples=curvature.mc_samples, prior_precision=prior_precision, differentiable=differentiable,
            separate_bias=resolved_separate_bias(curvature),
            factor_form=getattr(curvature, "factor_form", "auto"),
        )
    return PeerLaplace(
        model, backend.value, curvature.structure, approx=curvature.approx, fisher_type=curvature.fisher_type,
        mc_samples=curvature.mc_samples, prior_precision=prior_precision,
    )


class BackendUnsupportedError(UserError, ValueError):
    """A laplace-torch peer (``curvature.backend``) that cannot run the model; the message names
    the backend, the model, the reason and a combination that runs."""


def _trial_fit(curvature: Any, model: nn.Module, batch: Tuple[Tensor, Tensor]) -> Optional[str]:
    """Fit the peer on ``batch``; ``None`` if it gives a finite log marginal likelihood, else why not
    (a :class:`BackendUnsupportedError`, whose message is complete, propagates).

    The model's mode and gradients are restored; the global RNGs are forked (a Monte-Carlo estimate's
    sampling must not shift the run's random stream)."""
    was_training = model.training
    device = batch[0].device
    try:  # a probe: the libraries' warnings about it (deprecations, hooks) are not the user's business
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = build_laplace(curvature, model, torch.ones((), device=device), differentiable=False)
            la.fit([batch])
            value = la.log_marginal_likelihood()
    except BackendUnsupportedError:  # a layer or model form the peer does not take: it says why and what runs
        raise
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return None if torch.isfinite(value) else "non-finite log marginal likelihood on a trial batch"


def _mlp_runs(curvature: Any, model: nn.Module, batch: Tuple[Tensor, Tensor]) -> bool:
    """Whether the same peer runs ``model=mlp`` (a small MLP) on the same data."""
    from ..models import MLP

    x = batch[0]
    with torch.no_grad():
        num_classes = model(x).shape[-1]
    mlp = MLP(x[0].numel(), num_classes, hidden=[8]).to(x.device)
    try:
        return _trial_fit(curvature, mlp, batch) is None
    except BackendUnsupportedError:
        return False


def check_backend_runs(curvature: Any, model: nn.Module, batch: Tuple[Tensor, Tensor]) -> None:
    """Fit the peer once on a tiny batch before training, so that a model a peer cannot run fails
    at start-up with a message naming the backend, the model and a combination that runs (no-op
    for ``backend=marglik``). When the peer fails, it is tried on a small MLP: if that runs, the
    message says that ``model=mlp`` works with this backend. For ``backend=marglik`` only the
    engine's module discovery runs (no forward): a module without a K-FAC rule fails here, before
    training, not at the first marginal-likelihood update.

    Args:
        curvature: the ``curvature`` section of a config.
        model: the network (its mode and gradients are restored afterwards).
        batch: a tiny ``(X, y)`` batch on the model's device.

    Raises:
        BackendUnsupportedError: the peer cannot build or fit a Laplace approximation of ``model``.
        UnsupportedModuleError: ``backend=marglik`` and a module of ``model`` has no K-FAC rule.
        IncompatibleInstallError: torchvision (which laplace-torch imports) does not match torch;
            raised before the peer is tried, so that it is not blamed.
    """
    if _parse(CurvatureBackend, curvature.backend, "curvature.backend") is CurvatureBackend.marglik:
        from ..curvature import KFAC

        KFAC(model)  # discovery only: raises UnsupportedModuleError naming an uncovered module
        return
    check_torchvision()
    problem = _trial_fit(curvature, model, batch)
    if problem is None:
        return
    label = curvature_label({"backend": curvature.backend, "structure": curvature.structure,
                             "approx": curvature.approx})
    name = type(model).__name__
    if name != "MLP" and _mlp_runs(curvature, model, batch):
        fix = f"model=mlp runs with {label}; or keep {name} with curvature.backend=marglik"
    else:
        fix = f"use curvature.backend=marglik for {name}"
    raise BackendUnsupportedError(f"curvature.backend={curvature.backend} ({label}) cannot run {name}: {problem}; {fix}")
