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

Rows declared with :func:`marglik.example_index` (graph nodes) and ``T = N`` rows hold no copies:
there ``copies_approx`` changes nothing. Elementwise (diagonal) blocks are exact either way.
:attr:`Kron.meta` records ``copies_approx``.

Computation per batch: one forward pass with hooks recording each covered module's input and
output; the loss-Hessian square-root columns are back-propagated to all module outputs (one
backward per column, or one vmapped backward for all: ``batched_backward``). Only gradients
w.r.t. module outputs are computed, never parameter gradients. Input statistics are formed right
after the forward, and the engine then drops its references to module inputs and outputs, so each
is freed as soon as autograd no longer needs it. Three choices carry the speed (ablated in
``results/kfac_speed.md``): ``C - 1`` input-gradient-only backward passes for cross-entropy
(curvlinops runs ``C`` full ones); stride-1 convolution input factors from shifted correlations
instead of unfolded patches (:mod:`.layers.conv_gram`); and, on CPU, the forward in channels-last
layout (``channels_last``), where oneDNN's convolution backward is faster.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .kron import DiagonalBlock, Kron, KronBlock
from .layers import (
    ElementwiseRule, KroneckerRule, Rule, UnsupportedModuleError, copies_per_example, example_sum, find_rule,
)
from .likelihoods import check_output_and_targets, curvature_columns, summed_nll
from .options import FisherType, KFACApprox, Likelihood
from .sharing import current_example_index

IgnoreSpec = Union[str, type, nn.Module]


class CoveredModule(NamedTuple):
    """A module the engine covers: ``kind`` is ``"kron"`` (Kronecker factors, ``groups`` pairs)
    or ``"diag"`` (exact per-channel blocks); ``weight`` / ``bias`` are its trainable parameters."""

    name: str
    module: nn.Module
    kind: str
    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]
    groups: int


@dataclass
class _Call:
    """One call of a covered module during the recorded forward pass (``x`` / ``y`` are dropped
    as soon as the statistics / hooks no longer need them)."""

    x: Optional[Tensor]
    y: Optional[Tensor]
    index: Optional[Tensor]
    version: int
    xhat: Optional[Tensor] = None  # elementwise rules: the tensor multiplied by the weight


@dataclass
class _ModuleState:
    """Accumulated sums for one covered module over all batches seen."""

    name: str
    module: nn.Module
    rule: Rule
    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]
    calls: List[_Call] = field(default_factory=list)
    A_sum: Optional[Tensor] = None  # kron: (G, da, da)
    A_count: float = 0.0  # expand: positions; reduce: examples
    B_sum: Optional[Tensor] = None  # kron: (G, db, db)
    D_sum: Optional[Tensor] = None  # diag: (C, k, k)

    def add(self, attr: str, value: Tensor) -> None:
        cur = getattr(self, attr)
        setattr(self, attr, value if cur is None else cur + value)


def _batches(data: Any) -> Iterable[Tuple[Any, Tensor]]:
    """A DataLoader / iterable of ``(X, y)``, or one ``(X, y)`` tuple."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[1]):
        return [tuple(data)]  # a list of two batches has a tuple, not a tensor, second
    return data


class KFAC:
    """Kronecker-factored GGN / Fisher of a model, with K-FAC-expand or K-FAC-reduce.

    Args:
        model: the network. Every module holding trainable parameters must be covered by a rule
            (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.BatchNorm*``, ``nn.LayerNorm``,
            ``nn.GroupNorm``, ``nn.RMSNorm``, :class:`marglik.nn.Scale`, :class:`marglik.nn.Bias`) or
            listed in ``ignore_modules``; otherwise :class:`UnsupportedModuleError`.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        approx: ``"expand"`` or ``"reduce"`` (how shared axes enter the factors).
        copies_approx: ``"expand"`` or ``"reduce"``: how augmented copies flattened into the batch
            (``m N`` example-major rows) enter the factors, independently of ``approx``, which
            then governs the positions inside one copy (see the module docstring for the
            formulas). ``None`` (default): the same as ``approx``. ``"reduce"`` is exact for
            models averaging over copies (invariant models, learned augmentation); ``"expand"``
            where each copy feeds its own outputs.
        fisher_type: ``"type-2"`` (exact loss-Hessian square roots), ``"mc"`` (sampled labels),
            ``"empirical"`` (true labels).
        mc_samples: number of sampled labels per output position for ``"mc"`` (>= 1).
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
            than the loop (WRN-16-4, torch 2.14: ``results/kfac_speed.md``, row
            "backward mode").
        max_grad_memory: bytes of output gradients held at once when batching columns.
        distributed: all-reduce the factor sums over ``torch.distributed`` ranks in :meth:`fit`
            (``None``: whenever a process group with more than one rank is initialised). Each rank
            must then see a disjoint shard of the data.
        channels_last: run :meth:`fit`'s forward pass on a channels-last copy of a 4-D input, so
            every convolution and all their curvature backward passes use oneDNN's channels-last
            kernels (same values, other strides): on WRN-16-4, K-FAC-reduce 1.11-1.19x and expand
            1.10-1.24x faster on CPU (``results/kfac_speed.md``). ``"auto"`` (default): on CPU when
            the model has a covered ``nn.Conv2d``; if that first forward raises a ``RuntimeError``
            (model code calling ``.view`` on a convolution output, say), the module buffers and the
            random number generator are restored, the batch is rerun in the input's own layout and
            channels-last stays off for this instance (with a warning). ``True`` / ``False`` force
            it on / off. The model and the caller's tensors are never modified; :meth:`capture` (a
            forward you run yourself) is not affected. Code that reinterprets memory assuming
            contiguity (``as_strided``, raw ``data_ptr`` kernels) without failing would compute on
            wrong values under channels-last: pass ``channels_last=False`` for such models.

    A module called several times in one forward pass (weight tying) shares its weight across the
    calls: the calls' positions are concatenated along the shared axis.
    A module whose output is modified in place (``ReLU(inplace=True)``) cannot be recorded and
    raises an error; use out-of-place activations.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Union[str, Likelihood] = "classification",
        approx: Union[str, KFACApprox] = "expand",
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
    ) -> None:
        self.model = model
        self.likelihood = Likelihood.parse(likelihood, "likelihood")
        self.approx = KFACApprox.parse(approx, "K-FAC approximation")
        self.copies_approx = (
            self.approx if copies_approx is None else KFACApprox.parse(copies_approx, "copies_approx")
        )
        self.fisher_type = FisherType.parse(fisher_type, "fisher_type")
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
        self._states = self._discover()
        self.reset()
        if not self._states:
            raise ValueError("the model has no trainable parameters in supported modules")

    # ------------------------------------------------------------------ discovery
    def _ignored(self, name: str, module: nn.Module) -> bool:
        for spec in self.ignore_modules:
            if isinstance(spec, str) and spec == name:
                return True
            if isinstance(spec, type) and isinstance(module, spec):
                return True
            if isinstance(spec, nn.Module) and spec is module:
                return True
        return False

    def _discover(self) -> List[_ModuleState]:
        states: List[_ModuleState] = []
        owner: Dict[int, str] = {}
        for name, module in self.model.named_modules():
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not own or self._ignored(name, module):
                continue
            rule = find_rule(module)
            if rule is None:
                raise UnsupportedModuleError(
                    f"module {name or '<root>'!r} of type {type(module).__name__} has trainable parameters "
                    f"{sorted(own)} but no K-FAC rule; pass ignore_modules=[{name!r}] (or its type) to leave "
                    "them out of the curvature"
                )
            extra = set(own) - set(rule.param_names)
            if extra:
                raise UnsupportedModuleError(
                    f"module {name!r} ({type(module).__name__}) has unexpected trainable parameters {sorted(extra)}"
                )
            for p in own.values():
                if id(p) in owner:
                    raise UnsupportedModuleError(
                        f"parameter shared between modules {owner[id(p)]!r} and {name!r}: weight tying across "
                        "different modules is not supported (tie by calling one module twice instead)"
                    )
                owner[id(p)] = name
            states.append(
                _ModuleState(name, module, rule, own.get("weight"), own.get("bias"))
            )
        order = {id(p): i for i, p in enumerate(self.model.parameters())}
        states.sort(key=lambda s: min(order[id(p)] for p in (s.weight, s.bias) if p is not None))
        return states

    @property
    def covered(self) -> List[CoveredModule]:
        """The covered modules, in :meth:`Kron.to_dense` block order."""
        return [
            CoveredModule(
                s.name, s.module, s.rule.kind, s.weight, s.bias,
                s.rule.groups(s.module) if isinstance(s.rule, KroneckerRule) else 1,
            )
            for s in self._states
        ]

    @property
    def params(self) -> List[nn.Parameter]:
        """Covered trainable parameters in ``model.parameters()`` order (``Kron.to_dense`` order)."""
        covered = {id(p) for s in self._states for p in (s.weight, s.bias) if p is not None}
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
        """
        self.reset()
        it = _batches(data)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"K-FAC ({self.approx.value}, copies {self.copies_approx.value})", leave=False)
        for X, y in it:
            self.accumulate_batch(X, y)
        return self.result(num_data)

    def reset(self) -> None:
        """Forget all accumulated sums."""
        for s in self._states:
            s.A_sum = s.B_sum = s.D_sum = None
            s.A_count = 0.0
            s.calls = []
        self._num_seen = 0
        self._loss = None
        self._reduced = False

    def accumulate_batch(self, X: Any, y: Tensor) -> Tensor:
        """Forward one batch and add its contribution to the sums; returns the summed loss."""
        device = self._device()
        X = _to(X, device)
        y = y.to(device)
        record, out = self._forward(X)
        return record.accumulate(out, y)

    def _wants_channels_last(self, X: Any) -> bool:
        if not (torch.is_tensor(X) and X.dim() == 4 and X.is_floating_point()):
            return False
        if self.channels_last == "auto":
            return (
                self._channels_last_works is not False
                and X.device.type == "cpu"
                and any(isinstance(s.module, nn.Conv2d) for s in self._states)
            )
        return bool(self.channels_last)

    def _forward(self, X: Any) -> Tuple["_Recorder", Tensor]:
        """The recorded forward pass, in channels-last layout where :attr:`channels_last` says."""
        if not self._wants_channels_last(X):
            with self.capture() as record:
                out = _call(self.model, X)
            return record, out
        probing = self.channels_last == "auto" and self._channels_last_works is None
        saved = _side_effect_state(self.model) if probing else None
        try:
            with self.capture() as record:
                out = _call(self.model, X.contiguous(memory_format=torch.channels_last))
        except RuntimeError as err:
            if not probing:
                raise
            _restore_side_effect_state(self.model, saved)
            self._channels_last_works = False
            warnings.warn(
                f"the model failed on a channels-last input ({err}); K-FAC runs it in the input's own "
                "layout (pass channels_last=False to skip this attempt)"
            )
            with self.capture() as record:
                out = _call(self.model, X)
            return record, out
        self._channels_last_works = True
        return record, out

    @contextlib.contextmanager
    def capture(self) -> Iterator["_Recorder"]:
        """Record covered modules during a forward pass run inside the context.

        Use this to reuse a training forward pass (the K-FAC optimizer does)::

            with kfac.capture() as rec:
                out = model(X)
            rec.accumulate(out, y, retain_graph=True)   # adds to kfac's sums
            loss_fn(out, y).backward()
        """
        rec = _Recorder(self)
        handles = [s.module.register_forward_hook(rec.hook(s)) for s in self._states]
        try:
            yield rec
        finally:
            for h in handles:
                h.remove()

    def result(self, num_data: Optional[int] = None) -> Kron:
        """The curvature from the sums accumulated since :meth:`reset`."""
        if self._num_seen == 0:
            raise ValueError("no data was seen: the data is empty")
        self._all_reduce()
        seen = self._num_seen
        scale = 1.0 if num_data is None else num_data / seen
        if num_data is not None and num_data <= 0:
            raise ValueError(f"num_data must be positive, got {num_data}")
        blocks = []
        for s in self._states:
            if isinstance(s.rule, KroneckerRule):
                if s.A_sum is None:
                    raise RuntimeError(f"module {s.name!r} was never called in the forward pass")
                A = s.A_sum / max(s.A_count, 1.0)
                blocks.append(KronBlock(s.name, A, s.B_sum * scale, s.weight, s.bias))
            else:
                if s.D_sum is None:
                    raise RuntimeError(f"module {s.name!r} was never called in the forward pass")
                blocks.append(DiagonalBlock(s.name, s.D_sum * scale, s.weight, s.bias))
        loss = self._loss * scale if self._loss is not None else None
        return Kron(
            blocks,
            self.params,
            num_data=int(num_data if num_data is not None else seen),
            approx=self.approx.value,
            meta={"loss": loss, "fisher_type": self.fisher_type.value, "likelihood": self.likelihood.value,
                  "copies_approx": self.copies_approx.value},
        )

    # ------------------------------------------------------------------ internals
    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _all_reduce(self) -> None:
        if self._reduced:
            return
        use = self.distributed
        if use is None:
            use = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not use:
            return
        for s in self._states:
            for attr in ("A_sum", "B_sum", "D_sum"):
                t = getattr(s, attr)
                if t is not None:
                    dist.all_reduce(t)
            if isinstance(s.rule, KroneckerRule):
                c = torch.tensor([s.A_count], dtype=torch.float64, device=self._device())
                dist.all_reduce(c)
                s.A_count = float(c)
        n = torch.tensor([float(self._num_seen)], dtype=torch.float64, device=self._device())
        dist.all_reduce(n)
        self._num_seen = int(n.item())
        if self._loss is not None:
            dist.all_reduce(self._loss)
        self._reduced = True  # once per accumulation: result() may be called again


def _to(X: Any, device: torch.device) -> Any:
    if torch.is_tensor(X):
        return X.to(device)
    if isinstance(X, (tuple, list)):
        return type(X)(_to(x, device) for x in X)
    if isinstance(X, dict):
        return {k: _to(v, device) for k, v in X.items()}
    return X


def _side_effect_state(model: nn.Module) -> Tuple[Dict[str, Tensor], Tensor]:
    """What a failed forward may have changed: module buffers (BatchNorm statistics) and the
    CPU random number generator (dropout)."""
    return {n: b.detach().clone() for n, b in model.named_buffers()}, torch.get_rng_state()


def _restore_side_effect_state(model: nn.Module, saved: Tuple[Dict[str, Tensor], Tensor]) -> None:
    buffers, rng = saved
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    torch.set_rng_state(rng)


def _call(model: nn.Module, X: Any) -> Tensor:
    if isinstance(X, (tuple, list)):
        return model(*X)
    if isinstance(X, dict):
        return model(**X)
    return model(X)


class _Recorder:
    """Collects module calls during one forward pass and turns them into factor sums."""

    def __init__(self, kfac: KFAC) -> None:
        self.kfac = kfac
        for s in kfac._states:
            s.calls = []

    def hook(self, state: _ModuleState):
        def fn(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not args or not torch.is_tensor(args[0]):
                raise ValueError(f"module {state.name!r} was called without a positional tensor input")
            state.calls.append(_Call(args[0], output, current_example_index(), output._version))

        return fn

    def accumulate(self, out: Tensor, y: Tensor, retain_graph: bool = False) -> Tensor:
        """Add this batch's factor sums given the model output ``out`` and targets ``y``."""
        kfac = self.kfac
        states = [s for s in kfac._states if s.calls]
        try:
            y = check_output_and_targets(kfac.likelihood, out, y)
            for s in states:
                for c in s.calls:
                    if c.y._version != c.version:
                        raise RuntimeError(
                            f"the output of module {s.name!r} was modified in place after the module ran "
                            "(e.g. ReLU(inplace=True)); K-FAC needs its gradient: use out-of-place operations"
                        )
            N = out.shape[0]
            with self._stats_context():
                loss = summed_nll(kfac.likelihood, out, y)
                for s in states:
                    _add_input_stats(kfac, s, N)
                    for c in s.calls:
                        c.x = None  # input statistics done: do not keep the tensor alive
            S = curvature_columns(kfac.likelihood, kfac.fisher_type, out, y, kfac.mc_samples, kfac.generator)
            if not kfac.differentiable:
                S = S.detach()
            self._backward(out, S, states, N, retain_graph)
        finally:
            for s in kfac._states:
                s.calls = []
        kfac._num_seen += N
        loss = loss if kfac.differentiable else loss.detach()
        kfac._loss = loss if kfac._loss is None else kfac._loss + loss
        return loss

    def _backward(self, out: Tensor, S: Tensor, states: List[_ModuleState], N: int, retain_graph: bool) -> None:
        kfac = self.kfac
        calls = [(s, c) for s in states for c in s.calls]
        if not any(c.y.requires_grad for _, c in calls):
            raise RuntimeError("no recorded module output requires grad; are all parameters frozen?")
        batched = kfac.batched_backward
        if batched == "auto":
            batched = out.device.type == "cuda"
        keep = retain_graph or kfac.differentiable
        if batched:
            self._backward_batched(out, S, calls, states, N, keep)
        else:
            self._backward_hooked(out, S, calls, states, N, keep)

    def _stats_context(self):
        return contextlib.nullcontext() if self.kfac.differentiable else torch.no_grad()

    def _backward_hooked(self, out, S, calls, states, N, keep) -> None:
        """One backward per column; each module output's gradient is consumed by a tensor hook
        the moment autograd has it, so no gradient outlives its layer's statistics. The backward
        targets only the *source* outputs (those with no recorded output upstream): every other
        recorded output lies on a path from the model output to a source, so its hook fires."""
        kfac = self.kfac
        pending: Dict[int, Tensor] = {}

        def make_hook(s: _ModuleState, c: _Call):
            def hook(g: Tensor) -> None:
                with self._stats_context():
                    _add_grad_stats(kfac, s, c, g.unsqueeze(0), N, pending)

            return hook

        handles = [c.y.register_hook(make_hook(s, c)) for s, c in calls if c.y.requires_grad]
        sources = [calls[i][1].y for i in _source_outputs([c.y for _, c in calls])]
        for _, c in calls:  # the hooks live on the autograd nodes: only the sources stay referenced,
            c.y = None  # so each layer output is freed once the graph no longer needs it
        try:
            K = S.shape[0]
            for k in range(K):
                pending.clear()
                torch.autograd.grad(
                    out, sources, S[k], retain_graph=keep or k < K - 1,
                    create_graph=kfac.differentiable, allow_unused=True,
                )
                with self._stats_context():
                    _close_pending(states, pending)
        finally:
            for h in handles:
                h.remove()

    def _backward_batched(self, out, S, calls, states, N, keep) -> None:
        """Columns in chunks through one vmapped backward each (``is_grads_batched``)."""
        kfac = self.kfac
        outputs = [c.y for _, c in calls]
        K = S.shape[0]
        per_column = sum(o.numel() for o in outputs) * out.element_size()
        chunk = max(1, min(K, kfac.max_grad_memory // max(per_column, 1)))
        for start in range(0, K, chunk):
            cols = S[start : start + chunk].contiguous()
            grads = _column_grads(
                out, outputs, cols, batched=True, retain_graph=keep or start + chunk < K,
                create_graph=kfac.differentiable,
            )
            with self._stats_context():
                pending: Dict[int, Tensor] = {}
                for i, (s, c) in enumerate(calls):
                    g, grads[i] = grads[i], None  # drop each gradient as soon as it is used
                    if g is not None:
                        _add_grad_stats(kfac, s, c, g, N, pending)
                _close_pending(states, pending)


def _source_outputs(outputs: List[Tensor]) -> List[int]:
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


def _column_grads(
    out: Tensor, outputs: List[Tensor], cols: Tensor, batched: bool, retain_graph: bool, create_graph: bool
) -> List[Optional[Tensor]]:
    """Gradients of ``<out, cols[k]>`` w.r.t. every tensor in ``outputs``, each ``(K, *shape)``.

    ``batched=True`` uses one vmapped backward (``is_grads_batched``); otherwise one backward per
    column. Both only compute gradients w.r.t. module outputs, never parameter gradients.
    """
    if batched:
        try:
            return list(torch.autograd.grad(
                out, outputs, cols, retain_graph=retain_graph, create_graph=create_graph,
                allow_unused=True, is_grads_batched=True,
            ))
        except RuntimeError as err:  # an op without a vmap batching rule: fall back to the loop
            warnings.warn(f"batched backward unavailable ({err}); using one backward per column")
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


def _augment_with_bias(XtX: Optional[Tensor], xsum: Tensor, count: Tensor, has_weight: bool, has_bias: bool) -> Tensor:
    """Assemble ``A`` sums over ``[a, 1]`` from ``sum a a^T`` (``XtX``), ``sum a`` and ``sum 1``."""
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


def _over_copies(t: Tensor, dim: int, N: int, index: Optional[Tensor], name: str, mean: bool) -> Tensor:
    """Sum (``mean=False``) or average the example-major copies in ``t``'s ``dim`` (``m N`` rows)
    into ``N`` rows; ``t`` itself where the rows hold no copies (``m = 1``)."""
    m = copies_per_example(t.shape[dim], N, index, name)
    if m == 1:
        return t
    t = t.reshape(t.shape[:dim] + (N, m) + t.shape[dim + 1:])
    return t.mean(dim + 1) if mean else t.sum(dim + 1)


def _unit_sum(kfac: KFAC, t: Tensor, dim: int, N: int, index: Optional[Tensor], name: str) -> Tensor:
    """Rows of ``t`` along ``dim`` summed into the *units* of K-FAC-reduce: the ``N`` examples, or
    with ``copies_approx="expand"`` the ``m N`` (example, copy) pairs where the rows hold copies."""
    if kfac.copies_approx is KFACApprox.EXPAND and copies_per_example(t.shape[dim], N, index, name) > 1:
        return t
    return example_sum(t, dim, N, index, name)


def _add_input_stats(kfac: KFAC, s: _ModuleState, N: int) -> None:
    """Input-side statistics of all calls of one module in this batch."""
    rule = s.rule
    m = s.module
    has_w, has_b = s.weight is not None, s.bias is not None
    if isinstance(rule, ElementwiseRule):
        for c in s.calls:
            c.xhat = rule.normalized(m, c.x) if has_w else None
        return
    assert isinstance(rule, KroneckerRule)
    if kfac.approx is KFACApprox.EXPAND:
        for c in s.calls:
            x = c.x
            if kfac.copies_approx is KFACApprox.REDUCE:  # one position per (example, position)
                x = _over_copies(x, 0, N, c.index, s.name, mean=True)
            XtX, xsum, M = rule.expand_input_stats(m, x, gram=has_w)  # (G, din, din), (G, din)
            A = _augment_with_bias(XtX, xsum, xsum.new_tensor(float(M)), has_w, has_b)
            s.add("A_sum", A)
            s.A_count += M
        return
    # reduce: per-unit means over all positions of all calls (units: examples, or (example, copy)
    # pairs with copies_approx="expand")
    sums, counts = None, None
    for c in s.calls:
        rows, P = rule.reduce_inputs(m, c.x)  # (T, G, din)
        ex = _unit_sum(kfac, rows, 0, N, c.index, s.name)
        cnt = _unit_sum(kfac, rows.new_full((rows.shape[0],), float(P)), 0, N, c.index, s.name)
        if sums is not None and ex.shape[0] != sums.shape[0]:
            raise ValueError(
                f"module {s.name!r}: its calls in one forward pass hold different numbers of augmented copies "
                f"({sums.shape[0] // N} and {ex.shape[0] // N} per example); copies_approx='expand' with "
                "approx='reduce' needs the same number in every call"
            )
        sums = ex if sums is None else sums + ex
        counts = cnt if counts is None else counts + cnt
    U = sums.shape[0]
    mean = sums / counts.clamp_min(1.0).view(U, 1, 1)  # (U, G, din)
    present = (counts > 0).to(mean.dtype)  # the bias input's mean: 1 where the unit was seen
    if has_w and has_b:
        mean = torch.cat([mean, present.view(U, 1, 1).expand(U, mean.shape[1], 1)], dim=-1)
    if has_w:
        flat = mean.transpose(0, 1)  # (G, U, da)
        A = flat.transpose(1, 2) @ flat
    else:
        A = present.sum().reshape(1, 1, 1).expand(mean.shape[1], 1, 1).clone()
    s.add("A_sum", A)
    s.A_count += U


def _add_grad_stats(kfac: KFAC, s: _ModuleState, c: _Call, g: Tensor, N: int, pending: Dict[int, Tensor]) -> None:
    """Output-gradient statistics of one call; reduce-type sums wait in ``pending`` for all calls."""
    rule, m = s.rule, s.module
    if isinstance(rule, KroneckerRule):
        if kfac.approx is KFACApprox.EXPAND:
            if kfac.copies_approx is KFACApprox.REDUCE:
                g = _over_copies(g, 1, N, c.index, s.name, mean=False)
            s.add("B_sum", rule.expand_grad_gram(m, g))  # (G, dout, dout)
            return
        rows = rule.reduce_grads(m, g)  # (K, T, G, dout)
        ex = _unit_sum(kfac, rows, 1, N, c.index, s.name)
    else:
        parts = []
        if s.weight is not None:
            parts.append(rule.channel_sums(m, g * c.xhat.unsqueeze(0)))
        if s.bias is not None:
            parts.append(rule.channel_sums(m, g))
        rows = torch.stack(parts, dim=-1)  # (K, T, C, k)
        ex = example_sum(rows, 1, N, c.index, s.name)
    pending[id(s)] = ex if id(s) not in pending else pending[id(s)] + ex


def _close_pending(states: List[_ModuleState], pending: Dict[int, Tensor]) -> None:
    """Turn one column chunk's per-example gradient sums (summed over calls) into factor sums."""
    for s in states:
        if id(s) in pending:
            _close_reduce_grads(s, pending[id(s)])


def _close_reduce_grads(s: _ModuleState, ex: Tensor) -> None:
    """Outer products of per-unit gradient sums: ``(K, U, G|C, d)`` -> ``(G|C, d, d)``."""
    K, N = ex.shape[:2]
    flat = ex.reshape(K * N, ex.shape[2], ex.shape[3]).transpose(0, 1)  # (G, K*N, d)
    prod = flat.transpose(1, 2) @ flat
    s.add("B_sum" if isinstance(s.rule, KroneckerRule) else "D_sum", prod)
