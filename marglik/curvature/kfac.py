"""K-FAC-expand and K-FAC-reduce (Eschenhagen et al., NeurIPS 2023) for weight-sharing layers.

Scaling convention. :meth:`KFAC.fit` approximates the GGN (``fisher_type="type-2"``) or Fisher
(``"mc"``, ``"empirical"``) of the **summed** negative log-likelihood over the whole data set:
cross-entropy with ``reduction="sum"`` (summed over every output position when the model outputs
``(N, R, C)``), ``0.5 * ||y - f||^2`` for regression, BCE-with-logits for binary -- the same
quantity laplace-torch's backends return from ``kron(X, y, N)``.

For a layer with inputs ``a[n, r]`` (a 1 appended when it has a bias) and output gradients
``g[k, n, r]`` of the curvature columns ``k`` (see :mod:`marglik.curvature.likelihoods`), over all
``N`` examples and their ``R_n`` shared positions (tokens, pixels, nodes; augmented copies, see below):

* expand: ``A = 1/(sum_n R_n) sum_{n,r} a a^T``, ``B = sum_{k,n,r} g g^T``;
* reduce: ``a_n = mean_r a[n, r]``, ``g_n = sum_r g[k, n, r]``,
  ``A = 1/N sum_n a_n a_n^T``, ``B = sum_{k,n} g_n g_n^T``.

Then ``B ⊗ A`` approximates the layer's GGN block. Derivation: the block is
``sum_{n,k} (sum_r g ⊗ a)(sum_r g ⊗ a)^T``. Expand drops the cross terms ``r != r'`` and factorises
the remaining sum over ``sum_n R_n`` terms as ``(sum g g^T) ⊗ (mean a a^T)``; exact for deep linear
networks with one loss term per position, where ``g`` at ``r`` only carries the loss at ``r``.
Reduce uses ``sum_r g[r] ⊗ a[r] = g_n ⊗ a_n`` when ``g`` does not vary over ``r`` -- exact for deep
linear networks that average over the shared axis before the loss -- and factorises over ``N``
terms. ``tests/test_kfac_exact.py`` proves both against the exact GGN in float64.

Augmented copies get their own choice, ``copies_approx`` (default: the same as ``approx``). A layer
input with ``T = m N`` rows holds ``m`` example-major copies of every example (rule 3 of
:mod:`marglik.curvature.sharing`); write its rows ``a[n, c, r]`` (copy ``c < m``, position ``r < R``
inside one copy: pixels, tokens; ``g`` likewise). ``approx`` then governs the positions ``r`` and
``copies_approx`` the copies ``c``:

* expand / expand and reduce / reduce: the copies are positions like any other (``R_n = m R``),
  exactly the formulas above;
* ``approx="expand", copies_approx="reduce"`` (LILA's K-FAC-expand, Immer et al. 2022): reduce over
  the copies first, per position, then expand over positions:
  ``a[n, r] = mean_c a[n, c, r]``, ``g[k, n, r] = sum_c g[k, n, c, r]``,
  ``A = 1/(N R) sum_{n,r} a a^T``, ``B = sum_{k,n,r} g g^T``.
  Exact for deep linear networks whose output *averages the copies at every position* before a
  loss with one term per position (``f[n, r] = mean_c h(x[n, c])[r]``): then
  ``g[k, n, c, r] = g[k, n, r] / m`` does not depend on ``c``, so
  ``sum_c g[c, r] ⊗ a[c, r] = (sum_c g[c, r]) ⊗ (mean_c a[c, r])`` and the expand argument
  applies to the ``N R`` (example, position) terms. Expanding over the copies instead keeps only
  the ``c = c'`` terms of ``sum_{c,c'}``: wrong by the dropped cross-copy terms;
* ``approx="reduce", copies_approx="expand"``: every (example, copy) pair is a unit of
  K-FAC-reduce: ``a[n, c] = mean_r a[n, c, r]``, ``g[k, n, c] = sum_r g[k, n, c, r]``,
  ``A = 1/(N m) sum_{n,c} a a^T``, ``B = sum_{k,n,c} g g^T``. Exact for deep linear networks in
  which *each copy feeds its own outputs* (a pair folded into the batch, one loss term per copy)
  after pooling its positions: the columns ``k`` of one copy have no gradient in the others, so
  the cross-copy terms vanish, and reduce's argument applies per copy over ``N m`` units.

Per-layer flavours (``approx="auto"`` or a mapping, :mod:`.flavours`): each block is formed with its own
``(approx, copies_approx)`` as above; the all-reduce and the batchwise gradient act on its sums alike.

Rows declared with :func:`marglik.example_index` (graph nodes) and ``T = N`` rows hold no copies:
there ``copies_approx`` changes nothing. Elementwise (diagonal) blocks are exact either way.
:attr:`Kron.meta` records ``copies_approx``.

Computation per batch: one forward pass with hooks recording each covered module's input and
output (:mod:`.recording`); the loss-Hessian square-root columns are back-propagated to all module
outputs (one backward per column, or one vmapped backward for all: ``batched_backward``,
:mod:`.backward`). Only gradients w.r.t. module outputs are computed, never parameter gradients.
Input statistics are formed right after the forward (:mod:`.statistics`), and the engine then
drops its references to module inputs and outputs, so each is freed as soon as autograd no longer
needs it. Three choices carry the speed (ablated in ``results/kfac_speed.md``): ``C - 1``
input-gradient-only backward passes for cross-entropy (curvlinops runs ``C`` full ones); stride-1
convolution input factors from shifted correlations instead of unfolded patches
(:mod:`.layers.conv_gram`); and, on CPU, the forward in channels-last layout (``channels_last``,
:mod:`.channels_last`), where oneDNN's convolution backward is faster.

Module map: :mod:`.blocks` (what is covered, the sums per block), :mod:`.statistics` (the
formulas, as functions of tensors), :mod:`.backward` (the two backward strategies),
:mod:`.recording` (hooks and one batch -> sums), :mod:`.distributed` (sums over ranks),
:mod:`.channels_last`, :mod:`.module_selection` (``ignore_modules``), :mod:`.model_inputs`,
:mod:`.flavours` (per-layer flavours).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .blocks import BlockSums, CoveredModule
from .channels_last import SideEffects, wants_channels_last
from .distributed import all_reduce_block_sums, default_distributed
from .flavours import ApproxSpec, FlavourAssignment, assign_flavours, parse_value
from .kron import DiagonalBlock, Kron, KronBlock
from .layers import UnsupportedModuleError, find_rule
from .model_inputs import as_batches, call_model, to_device
from .module_selection import IgnoreSpec, ignored_modules
from .options import BlockKind, FisherType, KFACApprox, Likelihood
from .recording import BatchSums, Recorder, StatsOptions, recording
from .row_factor import FactorForm
from .statistics import count_divisor

if TYPE_CHECKING:
    from .batchwise import SumLeaf

__all__ = ["KFAC", "CoveredModule", "IgnoreSpec"]


class KFAC:
    """Kronecker-factored GGN / Fisher of a model, with K-FAC-expand or K-FAC-reduce.

    Args:
        model: the network. Every module holding trainable parameters must be covered by a rule
            (``nn.Linear``, ``nn.MultiheadAttention`` -- hence ``nn.TransformerEncoder/DecoderLayer``
            -- ``nn.Conv1d/2d/3d``, ``nn.BatchNorm*``, ``nn.LayerNorm``, ``nn.GroupNorm``,
            ``nn.RMSNorm``, torchvision ConvNeXt's ``LayerNorm2d``, :class:`marglik.nn.Scale`,
            :class:`marglik.nn.Bias`, raw batch-broadcast parameters such as torchvision ViT's class
            token and positional embedding and ConvNeXt's layer scale, :mod:`.layers.leaf`, and the
            relative-position bias tables of torchvision's Swin and MaxViT attention,
            :mod:`.layers.relpos`) or listed in ``ignore_modules``; otherwise
            :class:`UnsupportedModuleError`. Ignoring an ``nn.MultiheadAttention`` also ignores its
            ``out_proj``, ignoring Swin's attention its ``qkv`` / ``proj``.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        approx: ``"expand"`` or ``"reduce"`` (how shared axes enter the factors), the rule ``"auto"``
            (expand on convolutions, reduce elsewhere), or ``{module name | type | type name | "*":
            flavour}`` per layer (:func:`~marglik.curvature.flavours.assign_flavours`; :attr:`flavours`).
        fisher_type: ``"type-2"`` (exact loss-Hessian square roots), ``"mc"`` (sampled labels),
            ``"mc-root"`` (the roots times random signs: like ``"mc"`` one backward column per
            sample, and unbiased for the derivative of the GGN too, see
            :mod:`marglik.curvature.likelihoods`), ``"empirical"`` (true labels).
        mc_samples: number of sampled labels (``"mc"``) or sign vectors (``"mc-root"``) per output
            position (>= 1).
        differentiable: keep the autograd graph from the factors to the inputs and parameters
            (e.g. to learn augmentation parameters by marginal likelihood). Default ``False`` runs
            the factor arithmetic under ``no_grad``.
        ignore_modules: module names, types or instances whose parameters are left out of the
            curvature (and of :meth:`Kron.to_dense`).
        generator: random generator for ``"mc"`` label sampling.
        batched_backward: back-propagate the curvature columns in one vmapped backward
            (``torch.autograd.grad(..., is_grads_batched=True)``, in chunks of at most
            ``max_grad_memory`` bytes of output gradients) or one column at a time. ``"auto"``
            (default) batches on CUDA only: on CPU the vmapped convolution backward is slower
            than the loop (``results/kfac_speed.md``, row "backward mode").
        max_grad_memory: bytes of output gradients held at once when batching columns.
        distributed: all-reduce the factor sums over ``torch.distributed`` ranks in :meth:`fit`
            (``None``: whenever a process group with more than one rank is initialised). Each rank
            must then see a disjoint shard of the data.
        channels_last: run :meth:`fit`'s forward pass on a channels-last copy of a 4-D input, so
            every convolution and all their curvature backward passes use oneDNN's channels-last
            kernels (same values, other strides; faster on CPU, ``results/kfac_speed.md``).
            ``"auto"`` (default): on CPU when the model has a covered ``nn.Conv2d``; if that first
            forward raises a ``RuntimeError`` (model code calling ``.view`` on a convolution
            output, say), the module buffers and the random number generator are restored, the
            batch is rerun in the input's own layout and channels-last stays off for this instance
            (with a warning). ``True`` / ``False`` force it on / off. The model and the caller's
            tensors are never modified; :meth:`capture` (a forward you run yourself) is not
            affected. Code that reinterprets memory assuming contiguity (``as_strided``, raw
            ``data_ptr`` kernels) without failing would compute on wrong values under
            channels-last: pass ``channels_last=False`` for such models.
        copies_approx: ``"expand"`` or ``"reduce"``: how augmented copies flattened into the batch
            (``m N`` example-major rows) enter the factors, independently of ``approx``, which
            then governs the positions inside one copy (see the module docstring for the
            formulas). ``None`` (default): the same as ``approx`` (block by block for a per-layer
            ``approx``). ``"reduce"`` is exact for
            models averaging over copies (invariant models, learned augmentation); ``"expand"``
            where each copy feeds its own outputs.
        factor_form: ``"auto"`` (default): a factor built from few rows against its dimension
            (at most ``ROWS_MAX_FRACTION = 0.5`` of it: K-FAC-reduce's input factor on a small fit,
            say) is returned as those rows (:class:`~marglik.curvature.row_factor.RowFactor`), which
            the posterior decomposes in ``O(d m^2)`` instead of ``O(d^3)``; decided per factor after
            every batch, dense once the rows pass the bound. ``"dense"``: always the dense sum.
            Either way :attr:`KronBlock.A` / :attr:`KronBlock.B` are the dense factors (formed on
            access) and the values are the same.

    Raises:
        ValueError: an option is out of range, a per-layer ``approx`` key matches no covered layer,
            or the model has no trainable parameters in supported modules.
        UnsupportedModuleError: a module with trainable parameters has no rule and is not ignored,
            or a parameter is shared between modules.
        TypeError: an ``ignore_modules`` entry is not a name, type or module.

    A module called several times in one forward pass (weight tying) shares its weight across the
    calls: the calls' positions are concatenated along the shared axis.
    A module whose output is modified in place later in the forward (``ReLU(inplace=True)``, a
    residual ``out += identity``) is recorded exactly, with the model unchanged: the gradient is
    taken w.r.t. the output's autograd edge captured when the module returned
    (:mod:`.recording`, "In-place operations"). A module whose *input* is modified in place after
    it ran raises a ``RuntimeError`` naming it. While recording (:meth:`fit`, :meth:`capture`),
    PyTorch's fused transformer fast path (``torch.backends.mha``) is switched off -- it bypasses
    the attention's forward, and is already off whenever grad is enabled and a parameter requires
    grad -- and ``nn.MultiheadAttention`` runs an equivalent forward with explicit projections
    (:mod:`.layers.attention`); both are restored afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Union[str, Likelihood] = "classification",
        approx: ApproxSpec = "expand",
        fisher_type: Union[str, FisherType] = "type-2",
        mc_samples: int = 1,
        differentiable: bool = False,
        ignore_modules: Optional[Sequence[IgnoreSpec]] = None,
        generator: Optional[torch.Generator] = None,
        batched_backward: Union[bool, str] = "auto",
        max_grad_memory: int = 2 * 1024**3,
        distributed: Optional[bool] = None,
        channels_last: Union[bool, str] = "auto",
        copies_approx: Union[None, str, KFACApprox] = None,
        factor_form: Union[str, FactorForm] = "auto",
    ) -> None:
        self.model = model
        self.likelihood = Likelihood.parse(likelihood, "likelihood")
        if not isinstance(approx, Mapping):
            parse_value(approx, "K-FAC approximation")  # a clear error before discovery
        self._copies_given = None if copies_approx is None else KFACApprox.parse(copies_approx, "copies_approx")
        self.fisher_type = FisherType.parse(fisher_type, "fisher_type")
        self.factor_form = FactorForm.parse(factor_form, "factor_form")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        self.mc_samples = mc_samples
        self.differentiable = differentiable
        self.generator = generator
        if batched_backward not in (True, False, "auto"):
            raise ValueError(f"batched_backward must be True, False or 'auto', got {batched_backward!r}")
        self.batched_backward = batched_backward
        self.max_grad_memory = int(max_grad_memory)
        self.distributed = distributed
        if channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last must be True, False or 'auto', got {channels_last!r}")
        self.channels_last = channels_last
        self._channels_last_works: Optional[bool] = None  # "auto": learnt from the first batch
        self.ignore_modules = list(ignore_modules or [])
        self._blocks = self._discover()
        if not self._blocks:
            raise ValueError("the model has no trainable parameters in supported modules")
        self._assignment: FlavourAssignment = assign_flavours(approx, self._blocks)
        #: the flavour of every Kronecker block, or ``None`` when they differ (see :attr:`flavours`)
        self.approx: Optional[KFACApprox] = self._assignment.uniform(self._blocks)
        #: ``"expand"`` / ``"reduce"``, ``"auto"`` or ``"per-layer"``: how ``approx`` was given
        self.approx_label: str = self._assignment.label
        #: the copies' flavour; ``None`` given: each block's own (``approx``'s) flavour
        self.copies_approx: Optional[KFACApprox] = (
            self._copies_given if self._copies_given is not None or self.approx is None else self.approx
        )
        self.reset()

    # ------------------------------------------------------------------ discovery
    def _discover(self) -> List[CoveredModule]:
        blocks: List[CoveredModule] = []
        owner: Dict[int, str] = {}
        ignored = {id(m) for m in ignored_modules(self.model, self.ignore_modules)}
        for name, module in self.model.named_modules():
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not own or id(module) in ignored:
                continue
            rule = find_rule(module)
            if rule is None:
                raise UnsupportedModuleError(
                    f"module {name or '<root>'!r} of type {type(module).__name__} has trainable parameters "
                    f"{sorted(own)} but no K-FAC rule; pass ignore_modules=[{name!r}] (or its type) to leave "
                    "them out of the curvature"
                )
            bindings = rule.bindings(name, module, own)
            for p in own.values():
                if id(p) in owner:
                    raise UnsupportedModuleError(
                        f"parameter shared between modules {owner[id(p)]!r} and {name!r}: weight tying across "
                        "different modules is not supported (tie by calling one module twice instead)"
                    )
                owner[id(p)] = name
            for b in bindings:
                block_name = ".".join(part for part in (name, b.tag) if part)
                kind = b.rule.kind
                groups = b.groups if kind is BlockKind.KRON else 1
                blocks.append(CoveredModule(block_name, module, kind, b.weight, b.bias, groups, b.rule))
        order = {id(p): i for i, p in enumerate(self.model.parameters())}
        blocks.sort(key=lambda s: min(order[id(p)] for p in s.params))
        return blocks

    @property
    def covered(self) -> List[CoveredModule]:
        """The covered blocks, in :meth:`Kron.to_dense` block order."""
        return list(self._blocks)

    @property
    def flavours(self) -> Dict[str, KFACApprox]:
        """Each covered block's flavour over its positions (block name -> :class:`KFACApprox`)."""
        return dict(self._assignment.flavours)

    def flavour_of(self, block: CoveredModule) -> Tuple[KFACApprox, KFACApprox]:
        """``(approx, copies_approx)`` of one covered block: its flavour over positions and over copies."""
        approx = self._assignment.of(block)
        return approx, approx if self._copies_given is None else self._copies_given

    @property
    def params(self) -> List[nn.Parameter]:
        """Covered trainable parameters in ``model.parameters()`` order (``Kron.to_dense`` order)."""
        covered = {id(p) for s in self._blocks for p in s.params}
        return [p for p in self.model.parameters() if id(p) in covered]

    # ------------------------------------------------------------------ public API
    def fit(self, data: Any, num_data: Optional[int] = None, progress: bool = False) -> Kron:
        """Accumulate the factors over ``data`` and return the :class:`Kron` curvature.

        Args:
            data: a DataLoader or iterable of ``(X, y)`` batches, or a single ``(X, y)`` tuple.
                ``X`` may be a tuple (passed as ``model(*X)``) or dict (``model(**X)``).
            num_data: data-set size the curvature should represent. ``None``: the number of
                examples seen. If given and different, the sums are rescaled by
                ``num_data / seen`` (a stochastic estimate from a subset of the data).
            progress: show a tqdm progress bar.

        Returns:
            The curvature (see :meth:`result`).

        Raises:
            ValueError: the data is empty, or outputs / targets / rows do not fit.
            RuntimeError: a covered module was never called, or its input was modified in place after it ran.
        """
        self.reset()
        it = as_batches(data)
        if progress:
            from tqdm.auto import tqdm

            copies = "as approx" if self.copies_approx is None else self.copies_approx.value
            it = tqdm(it, desc=f"K-FAC ({self.approx_label}, copies {copies})", leave=False)
        for X, y in it:
            self.accumulate_batch(X, y)
        return self.result(num_data)

    def reset(self) -> None:
        """Forget all accumulated sums."""
        self._sums: List[BlockSums] = [BlockSums(form=self.factor_form) for _ in self._blocks]
        self._num_seen = 0
        self._loss: Optional[Tensor] = None
        self._reduced = False

    def accumulate_batch(self, X: Any, y: Tensor) -> Tensor:
        """Forward one batch and add its contribution to the sums.

        Args:
            X: the model input (tensor, tuple or dict; see :meth:`fit`).
            y: the targets.

        Returns:
            The batch's summed negative log-likelihood.
        """
        batch = self.batch_sums(X, y)
        self._add(batch)
        return batch.loss

    def batch_sums(self, X: Any, y: Tensor) -> BatchSums:
        """One batch's factor sums and loss, *not* added to the totals (with an autograd graph when
        :attr:`differentiable`): what :meth:`accumulate_batch` adds, and the second pass of a batchwise
        gradient (:mod:`.batchwise`)."""
        device = self._device()
        record, out = self._forward(to_device(X, device))
        return record._recorder.accumulate(out, y.to(device))

    def sums_as_leaves(self) -> List["SumLeaf"]:
        """Make the accumulated sums and loss autograd leaves, in place (see :mod:`.batchwise`);
        :meth:`result` then builds the curvature on them.

        Raises:
            RuntimeError: under ``torch.distributed`` (the all-reduced sums are not the local batches').
        """
        from .batchwise import sums_as_leaves

        if default_distributed() if self.distributed is None else self.distributed:
            raise RuntimeError("a batchwise gradient is not supported under torch.distributed")
        if self._loss is not None:
            self._loss = self._loss.detach().requires_grad_(True)
        return sums_as_leaves(self._sums, self._loss)

    def _forward(self, X: Any) -> Tuple["_Capture", Tensor]:
        """The recorded forward pass, in channels-last layout where :attr:`channels_last` says."""
        has_conv2d = any(isinstance(s.module, nn.Conv2d) for s in self._blocks)
        if not wants_channels_last(X, self.channels_last, self._channels_last_works, has_conv2d):
            with self.capture() as record:
                out = call_model(self.model, X)
            return record, out
        probing = self.channels_last == "auto" and self._channels_last_works is None
        saved = SideEffects(self.model) if probing else None
        try:
            with self.capture() as record:
                out = call_model(self.model, X.contiguous(memory_format=torch.channels_last))
        except RuntimeError as err:
            if not probing:
                raise
            saved.restore()
            self._channels_last_works = False
            warnings.warn(
                f"the model failed on a channels-last input ({err}); K-FAC runs it in the input's own "
                "layout (pass channels_last=False to skip this attempt)",
                stacklevel=3,
            )
            with self.capture() as record:
                out = call_model(self.model, X)
            return record, out
        self._channels_last_works = True
        return record, out

    def _stats_options(self) -> StatsOptions:
        uniform = self.approx is not None and all(self.flavour_of(b)[1] is self.copies_approx for b in self._blocks)
        return StatsOptions(
            self.likelihood, self.approx or KFACApprox.REDUCE, self.copies_approx or KFACApprox.REDUCE,
            self.fisher_type, self.mc_samples, self.generator, self.differentiable, self.batched_backward,
            self.max_grad_memory, self.factor_form,
            block_flavours=None if uniform else {b.name: self.flavour_of(b) for b in self._blocks},
        )

    @contextlib.contextmanager
    def capture(self) -> Iterator["_Capture"]:
        """Record covered modules during a forward pass run inside the context.

        Use this to reuse a training forward pass (the K-FAC optimizer does)::

            with kfac.capture() as rec:
                out = model(X)
            rec.accumulate(out, y, retain_graph=True)   # adds to kfac's sums
            loss_fn(out, y).backward()

        Yields:
            A handle whose ``accumulate(out, y, retain_graph=False)`` adds the batch's factor sums
            to this engine's and returns the batch's summed loss.
        """
        recorder = Recorder(self._blocks, self._stats_options())
        with recording(self.model, self._blocks, recorder):
            yield _Capture(self, recorder)

    def _add(self, batch: BatchSums) -> None:
        """Add one batch's sums to the running totals."""
        self._sums = [total + new for total, new in zip(self._sums, batch.blocks)]
        self._num_seen += batch.num_examples
        self._loss = batch.loss if self._loss is None else self._loss + batch.loss

    def result(self, num_data: Optional[int] = None) -> Kron:
        """The curvature from the sums accumulated since :meth:`reset`.

        Args:
            num_data: data-set size to represent (``None``: the examples seen); the sums are
                rescaled by ``num_data / seen``.

        Returns:
            A :class:`Kron` with one block per covered block (``A`` normalised, ``B`` / ``D``
            scaled), ``meta`` holding the loss, ``fisher_type``, ``likelihood``, ``copies_approx``
            (``None``: per block, as its flavour) and ``flavours`` (block name -> flavour);
            :attr:`Kron.approx` is the flavour shared by all blocks, else ``"auto"`` / ``"per-layer"``.

        Raises:
            ValueError: no data was seen, or ``num_data`` is not positive.
            RuntimeError: a covered module was never called in the forward pass.
        """
        if self._num_seen == 0:
            raise ValueError("no data was seen: the data is empty")
        self._all_reduce()
        seen = self._num_seen
        scale = 1.0 if num_data is None else num_data / seen
        if num_data is not None and num_data <= 0:
            raise ValueError(f"num_data must be positive, got {num_data}")
        blocks = []
        for s, sums in zip(self._blocks, self._sums):
            if (sums.A if s.kind is BlockKind.KRON else sums.grad).empty:
                raise RuntimeError(f"module {s.name!r} was never called in the forward pass")
            if s.kind is BlockKind.KRON:
                A = sums.A.factor(1.0 / count_divisor(sums.A_count))
                blocks.append(KronBlock(s.name, A, sums.grad.factor(scale), s.weight, s.bias))
            else:
                blocks.append(DiagonalBlock(s.name, sums.grad.dense * scale, s.weight, s.bias))
        loss = self._loss * scale if self._loss is not None else None
        return Kron(
            blocks,
            self.params,
            num_data=int(num_data if num_data is not None else seen),
            approx=self.approx.value if self.approx is not None else self.approx_label,
            meta={"loss": loss, "fisher_type": self.fisher_type.value, "likelihood": self.likelihood.value,
                  "copies_approx": None if self.copies_approx is None else self.copies_approx.value,
                  "flavours": {n: f.value for n, f in self._assignment.flavours.items()}},
        )

    # ------------------------------------------------------------------ internals
    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _all_reduce(self) -> None:
        if self._reduced:
            return
        use = default_distributed() if self.distributed is None else self.distributed
        if not use:
            return
        kron = [s.kind is BlockKind.KRON for s in self._blocks]
        self._sums, self._num_seen, self._loss = all_reduce_block_sums(
            self._sums, kron, self._num_seen, self._loss, self._device(), self.factor_form
        )
        self._reduced = True  # once per accumulation: result() may be called again


class _Capture:
    """What :meth:`KFAC.capture` yields: the recorder of one forward pass, bound to its engine."""

    def __init__(self, kfac: KFAC, recorder: Recorder) -> None:
        self._kfac, self._recorder = kfac, recorder

    def accumulate(self, out: Tensor, y: Tensor, retain_graph: bool = False) -> Tensor:
        """:meth:`Recorder.accumulate` (same arguments and errors), its sums added to the engine's;
        returns the batch's summed loss."""
        batch = self._recorder.accumulate(out, y, retain_graph)
        self._kfac._add(batch)
        return batch.loss
