"""laplace-torch curvature backends powered by :class:`marglik.KFAC`.

Use them wherever laplace-torch takes a backend::

    from laplace import Laplace
    from marglik.laplace_torch import MarglikGGN

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                 backend=MarglikGGN, backend_kwargs={"approx": "reduce"})
    la.fit(train_loader)
    la.optimize_prior_precision()

:meth:`kron` (``hessian_structure="kron"``) uses marglik's K-FAC, for ``subset_of_weights="all"``
and ``"last_layer"`` (laplace-torch's default). For the last layer laplace-torch hands the backend
its ``FeatureExtractor`` (the whole network) and the last layer's parameters as ``params``; the
K-FAC engine runs on the whole network with every other module in ``ignore_modules``
(:func:`modules_outside`), so the head's input factor and output gradients are recorded where the
head is applied (at every token of a token model: expand and reduce then differ). The ``full`` /
``diag`` structures come from laplace-torch's ``torch.func`` code in ``GGNInterface`` /
``EFInterface``, with two changes: for a subnetwork (``SubnetLaplace``: full or diag only) the
Jacobians and per-example gradients are taken over the tensors the subnetwork touches
(:mod:`marglik.laplace_torch_subnet`), and for the last layer the parameter names are those of the
``FeatureExtractor`` (laplace-torch's own names match nothing there and give a zero EF).
:class:`MarglikGGNReduce` / :class:`MarglikEFReduce` default to ``approx="reduce"`` for callers that
take a class and no kwargs (``laplace.marglik_training``).

Conversion to laplace-torch's :class:`laplace.utils.matrix.Kron`. laplace-torch keeps one entry per
trainable parameter tensor (``Kron.init_from_model``): ``[B, A]`` for a weight (``B ⊗ A`` over the
row-major weight, ``B`` over outputs) and ``[M]`` (a dense ``(p, p)`` matrix) for 1-d parameters.
``KronLaplace.fit`` calls ``kron(X, y, N)`` once per batch and **adds the factors separately**
(``A_total = sum_b A_b``, ``B_total = sum_b B_b``). To reproduce laplace-torch's own backends
(``CurvlinopsGGN``) and the full-data K-FAC, each batch returns ``B_b`` = the batch's summed
output-gradient factor and ``A_b`` = the batch's normalised input factor times ``M_b / N``
(``M_b`` the batch size), so that ``sum_b A_b`` is the data-set average; 1-d blocks are plain sums
and are not rescaled. marglik's blocks are mapped as follows:

* ``KronBlock`` with weight and bias (joint ``B ⊗ A`` over ``[W, b]``): weight ``[B, A[:-1, :-1]]``
  and bias ``[B * A[-1, -1]]`` -- the weight-bias cross terms are dropped (laplace-torch's
  structure, identical to curvlinops' ``separate_weight_and_bias=True``);
* ``DiagonalBlock`` (norm layers, ``Scale``/``Bias``): ``[diag(weight curvature)]`` and
  ``[diag(bias curvature)]`` (the per-channel weight-bias coupling is dropped);
* grouped convolutions (``G > 1``) cannot be represented and raise ``NotImplementedError``.

The returned loss is marglik's summed NLL: cross-entropy, or ``0.5 ||y - f||^2`` for regression --
laplace-torch's ``factor * lossfunc``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from laplace.curvature import EFInterface, GGNInterface
from laplace.utils import Kron as LaplaceKron
from torch import Tensor, nn

from .curvature import KFAC, DiagonalBlock, Kron, KronBlock
from .curvature.options import KFACApprox
from .laplace_torch_subnet import subnet_gradients, subnet_jacobians

__all__ = ["MarglikGGN", "MarglikEF", "MarglikGGNReduce", "MarglikEFReduce", "to_laplace_kron", "modules_outside"]


def to_laplace_kron(kron: Kron, params: List[nn.Parameter], a_scale: float = 1.0) -> LaplaceKron:
    """Convert a marglik :class:`Kron` to laplace-torch's ``Kron`` (see the module docstring).

    Args:
        kron: marglik curvature.
        params: the parameters laplace-torch's ``Kron`` is laid out over (its ``params``), each of
            which must be covered by ``kron``.
        a_scale: factor applied to every weight's ``A`` (``M_b / N`` for batch-wise accumulation).
    """
    role: Dict[int, Tuple[str, Any]] = {}
    for blk in kron.blocks:
        for p in blk.params:
            role[id(p)] = ("weight" if p is blk.weight else "bias", blk)
    kfacs: List[List[Tensor]] = []
    for p in params:
        if id(p) not in role:
            raise ValueError("a parameter laplace-torch expects is not covered by the K-FAC curvature")
        what, blk = role[id(p)]
        if isinstance(blk, KronBlock):
            if blk.groups != 1:
                raise NotImplementedError(
                    f"block {blk.name!r} has {blk.groups} Kronecker groups (a grouped convolution, or the packed "
                    "q/k/v projections of nn.MultiheadAttention), block-diagonal factors "
                    "which laplace-torch's Kron cannot represent; use marglik.KronLaplace instead"
                )
            A, B = blk.A[0].detach(), blk.B[0].detach()
            if what == "weight":
                din = p[0].numel()
                kfacs.append([B, A[:din, :din] * a_scale])
            else:
                kfacs.append([B * A[-1, -1]])
        else:
            assert isinstance(blk, DiagonalBlock)
            D = blk.blocks.detach()
            i = 0 if what == "weight" else D.shape[-1] - 1
            kfacs.append([torch.diag_embed(D[:, i, i])])
    return LaplaceKron(kfacs)


def modules_outside(model: nn.Module, params: List[nn.Parameter]) -> List[nn.Module]:
    """The modules of ``model`` whose own trainable parameters are all outside ``params``.

    They are passed to :class:`marglik.KFAC` as ``ignore_modules``, so that the engine records only
    the layers laplace-torch lays its ``Kron`` over (all of them, or the last layer).

    Args:
        model: the network laplace-torch hands to the backend (for a last-layer Laplace its
            ``FeatureExtractor``, which holds the whole network).
        params: the parameters of the Laplace approximation (the backend's ``params``).

    Returns:
        The modules to leave out, in ``named_modules()`` order.

    Raises:
        NotImplementedError: a module has trainable parameters both inside and outside ``params``
            (a block cannot be split).
    """
    inside = {id(p) for p in params}
    out: List[nn.Module] = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        hits = sum(id(p) in inside for p in own)
        if own and hits == 0:
            out.append(module)
        elif 0 < hits < len(own):
            raise NotImplementedError(
                f"module {name!r} has trainable parameters both inside and outside the Laplace approximation; "
                "marglik's Kronecker blocks cover a module's parameters together"
            )
    return out


def _named_in(model: nn.Module, params: List[nn.Parameter]) -> Dict[str, nn.Parameter]:
    """``params`` keyed by their names in ``model`` (for ``torch.func.functional_call(model, ...)``)."""
    inside = {id(p) for p in params}
    return {n: p for n, p in model.named_parameters() if id(p) in inside}


class _MarglikKron:
    """What :class:`MarglikGGN` and :class:`MarglikEF` share: ``kron`` by :class:`marglik.KFAC`
    (all weights or the last layer), subnetwork ``jacobians`` / ``gradients`` over the touched tensors."""

    _fisher_type: str
    approx: KFACApprox
    copies_approx: Optional[KFACApprox]
    num_samples: int

    def _setup_kfac(
        self, approx: str, fisher_type: str, max_grad_memory: int, copies_approx: Optional[str] = None
    ) -> None:
        """Options shared by both backends; engines are cached per ``(approx, copies_approx, mc_samples)``.

        For a last-layer Laplace, laplace-torch's ``CurvatureInterface`` keys ``params_dict`` by the
        last layer's own names (``weight``, ``bias``) but calls ``functional_call`` on the whole
        ``FeatureExtractor``, where those names match nothing: its ``torch.func`` gradients (the EF's
        ``full`` / ``diag``) come out zero. The names are re-keyed as the ``FeatureExtractor`` spells them.
        """
        if self.last_layer:
            self.params_dict = _named_in(self.model, self.params)
        self.approx = KFACApprox.parse(approx, "K-FAC approximation")
        self.copies_approx = None if copies_approx is None else KFACApprox.parse(copies_approx, "copies_approx")
        self._fisher_type = fisher_type
        self.max_grad_memory = max_grad_memory
        self._kfacs: Dict[tuple, KFAC] = {}

    def _kfac(self, approx: KFACApprox, copies_approx: Optional[KFACApprox], mc_samples: int) -> KFAC:
        key = (approx, copies_approx, mc_samples)
        if key not in self._kfacs:
            self._kfacs[key] = KFAC(
                self.model,
                likelihood=self.likelihood,
                approx=approx,
                copies_approx=copies_approx,
                fisher_type=self._fisher_type,
                mc_samples=mc_samples,
                max_grad_memory=self.max_grad_memory,
                ignore_modules=modules_outside(self.model, self.params),
            )
        return self._kfacs[key]

    def jacobians(self, x: Any, enable_backprop: bool = False) -> Tuple[Tensor, Tensor]:
        """laplace-torch's ``jacobians``; for a subnetwork, over the tensors it touches only
        (:func:`marglik.laplace_torch_subnet.subnet_jacobians`).

        Args:
            x: input batch of ``M`` examples.
            enable_backprop: keep the graph.

        Returns:
            ``(Js, f)``: Jacobians ``(M, C, P)`` (``P``: the subnetwork's size when there is one)
            and outputs ``(M, C)``.
        """
        if self.subnetwork_indices is None:
            return super().jacobians(x, enable_backprop)  # type: ignore[misc]
        return subnet_jacobians(self.model, self.params_dict, self.buffers_dict, x, self.subnetwork_indices,
                                enable_backprop)

    def gradients(self, x: Any, y: Tensor) -> Tuple[Tensor, Tensor]:
        """laplace-torch's per-example ``gradients``; for a subnetwork, over the tensors it touches only.

        Args:
            x: inputs ``(M, ...)``.
            y: targets ``(M, ...)``.

        Returns:
            ``(Gs, loss)``: gradients ``(M, P)`` of laplace-torch's unscaled ``lossfunc`` and its sum.
        """
        if self.subnetwork_indices is None:
            return super().gradients(x, y)  # type: ignore[misc]
        return subnet_gradients(self.model, self.params_dict, self.buffers_dict, self.lossfunc, x, y,
                                self.subnetwork_indices)

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> Tuple[Tensor, LaplaceKron]:
        """K-FAC of one batch, scaled for laplace-torch's batch-wise summation over ``N`` examples.

        Args:
            x: input batch (a tensor, or a mapping passed as ``model(x)``).
            y: targets ``(M, ...)``.
            N: total number of training examples.
            kwargs: ``kfac_approx`` / ``approx`` (``"expand"`` / ``"reduce"``), ``copies_approx``
                (``"expand"`` / ``"reduce"`` / ``None``: as ``approx``) and ``mc_samples``
                override the constructor's choices (laplace-torch passes ``asdl_fisher_kwargs``).

        Returns ``(loss, kron)``: the batch's summed NLL (0-d, detached) and a laplace-torch
        ``Kron`` over ``self.params``.
        """
        if self.subnetwork_indices is not None:
            raise NotImplementedError(
                "a subnetwork (an index subset of the parameters) has no Kronecker structure; laplace-torch's "
                "SubnetLaplace takes hessian_structure='full' or 'diag'"
            )
        kwargs = dict(kwargs)
        approx = kwargs.pop("kfac_approx", kwargs.pop("approx", self.approx))
        copies_approx = kwargs.pop("copies_approx", self.copies_approx)
        mc_samples = int(kwargs.pop("mc_samples", self.num_samples))
        if kwargs:
            raise TypeError(f"unexpected keyword arguments for {type(self).__name__}.kron: {sorted(kwargs)}")
        if N <= 0:
            raise ValueError(f"N must be positive, got {N}")
        kfac = self._kfac(
            KFACApprox.parse(approx, "K-FAC approximation"),
            None if copies_approx is None else KFACApprox.parse(copies_approx, "copies_approx"),
            mc_samples,
        )
        kfac.reset()
        loss = kfac.accumulate_batch((x,), y)  # model(x) even for mapping inputs
        kron = kfac.result()
        M = kron.num_data
        return loss.detach(), to_laplace_kron(kron, self.params, a_scale=M / N)


class MarglikGGN(_MarglikKron, GGNInterface):
    """laplace-torch GGN backend whose ``kron`` is :class:`marglik.KFAC` (type-2, or MC Fisher).

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y: as in
            laplace-torch's ``GGNInterface`` (``kron``: all weights or the last layer; a subnetwork
            takes ``full`` / ``diag``).
        stochastic: MC Fisher (``fisher_type="mc"``) instead of the exact GGN (``"type-2"``).
        num_samples: MC samples for ``stochastic=True``.
        approx: ``"expand"`` (default, as laplace-torch's backends) or ``"reduce"``.
        max_grad_memory: see :class:`marglik.KFAC`.
        copies_approx: augmented copies flattened into the batch, ``"expand"`` / ``"reduce"``, or
            ``None`` (default: as ``approx``); see :class:`marglik.KFAC`.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: Optional[torch.LongTensor] = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        approx: str = "expand",
        max_grad_memory: int = 2 * 1024**3,
        copies_approx: Optional[str] = None,
    ) -> None:
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y,
            stochastic=stochastic, num_samples=num_samples,
        )
        self._setup_kfac(approx, "mc" if stochastic else "type-2", max_grad_memory, copies_approx)


class MarglikEF(_MarglikKron, EFInterface):
    """laplace-torch empirical-Fisher backend whose ``kron`` is :class:`marglik.KFAC` (``"empirical"``).

    The K-FAC factors are those of the empirical Fisher of marglik's summed NLL; for regression
    that is ``0.5 ||y - f||^2`` (gradients ``f - y``), whereas laplace-torch's own EF backends and
    the inherited ``full`` / ``diag`` give twice that (they square the gradients of ``MSELoss``).
    Classification agrees with laplace-torch's ``CurvlinopsEF``.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: Optional[torch.LongTensor] = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        approx: str = "expand",
        max_grad_memory: int = 2 * 1024**3,
        copies_approx: Optional[str] = None,
    ) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        self.num_samples = 1
        self._setup_kfac(approx, "empirical", max_grad_memory, copies_approx)


class MarglikGGNReduce(MarglikGGN):
    """:class:`MarglikGGN` with ``approx="reduce"`` as its default.

    For callers that take a backend class but no ``backend_kwargs``, such as laplace-torch's
    ``marglik_training(..., backend=MarglikGGNReduce)``. Arguments as :class:`MarglikGGN`.
    """

    def __init__(self, *args: Any, approx: str = "reduce", **kwargs: Any) -> None:
        super().__init__(*args, approx=approx, **kwargs)


class MarglikEFReduce(MarglikEF):
    """:class:`MarglikEF` with ``approx="reduce"`` as its default (see :class:`MarglikGGNReduce`)."""

    def __init__(self, *args: Any, approx: str = "reduce", **kwargs: Any) -> None:
        super().__init__(*args, approx=approx, **kwargs)
