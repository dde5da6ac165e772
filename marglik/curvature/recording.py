"""Recording covered modules during a forward pass, and turning one batch into factor sums.

:func:`recording` installs the layer rules' hooks on a model; each call of a covered module lands
in a :class:`Recorder`, whose :meth:`Recorder.accumulate` forms the batch's input statistics,
back-propagates the curvature columns (:mod:`.backward`) and returns the batch's
:class:`BatchSums` -- the recorder keeps no state beyond the calls of its one forward pass.

In-place operations. Models as shipped modify module outputs in place: torchvision's
``ReLU(inplace=True)`` after a norm, ``out += identity`` in residual blocks, ``Hardswish(inplace=True)``.
An in-place op rebases the tensor onto a new autograd node, so a gradient w.r.t. the *tensor*
taken after the forward would be w.r.t. the modified value. The recorder therefore keeps, of a
module's output, only its autograd gradient edge (``torch.autograd.graph.get_gradient_edge``),
taken in the forward hook the moment the module returns: the edge names the module's own backward
node, which later in-place operations do not replace, and ``torch.autograd.grad`` w.r.t. the edge
gives the gradient w.r.t. the output's value as the module returned it -- exact, with no copy. The
model, its outputs and buffers are untouched: nothing is cloned or switched out of place. A
module's *input* modified in place after the module ran (which torchvision's classifiers never do)
would change the input statistics; that is detected by the input's version counter and raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from . import statistics as st
from .backward import Target, backward_per_column, backward_vmapped
from .blocks import BlockSums, CoveredModule
from .layers import find_rule
from .likelihoods import check_output_and_targets, curvature_columns, summed_nll
from .module_selection import uses_children_functionally
from .options import BlockKind, FisherType, KFACApprox, Likelihood
from .row_factor import FactorForm
from .sharing import current_example_index

__all__ = ["StatsOptions", "BatchSums", "Recorder", "recording"]


@dataclass(frozen=True)
class StatsOptions:
    """The engine options that fix how one batch becomes factor sums (see :class:`marglik.KFAC`)."""

    likelihood: Likelihood
    approx: KFACApprox
    copies_approx: KFACApprox
    fisher_type: FisherType
    mc_samples: int
    generator: Optional[torch.Generator]
    differentiable: bool
    batched_backward: Union[bool, str]
    max_grad_memory: int
    factor_form: FactorForm = FactorForm.AUTO
    #: per block name, ``(approx, copies_approx)`` where blocks differ (:mod:`.flavours`); ``None``: all as above
    block_flavours: Optional[Dict[str, Tuple[KFACApprox, KFACApprox]]] = None

    def flavour(self, block: CoveredModule) -> Tuple[KFACApprox, KFACApprox]:
        """``(approx, copies_approx)`` of ``block``."""
        if self.block_flavours is None:
            return self.approx, self.copies_approx
        return self.block_flavours[block.name]


class BatchSums(NamedTuple):
    """Factor sums of one batch: ``blocks[i]`` for the recorder's ``i``-th block, the summed loss
    and the number of examples."""

    blocks: List[BlockSums]
    loss: Tensor
    num_examples: int


class Recorder:
    """Collects the calls of covered modules during one forward pass and forms the batch's sums.

    Args:
        blocks: the covered blocks (the rules' hooks pass one of them to :meth:`record`).
        options: how the sums are formed.
    """

    def __init__(self, blocks: Sequence[CoveredModule], options: StatsOptions) -> None:
        self.blocks = list(blocks)
        self.options = options
        self._calls: Dict[int, List[st.ModuleCall]] = {id(b): [] for b in self.blocks}

    def record(self, block: CoveredModule, x: Tensor, y: Tensor, group: Optional[int] = None) -> None:
        """Record one call of a block: input ``x`` (rows first), output ``y`` (whose gradient the
        statistics need); ``group``: the call feeds only that Kronecker group of the block.

        Called when the module returns, before anything downstream runs: ``y`` is kept only as its
        autograd gradient edge (:class:`~.backward.Target`), so in-place operations on ``y`` later
        in the forward (``ReLU(inplace=True)``, ``out += identity``) change neither the tensor the
        model sees nor the gradient recorded (module docstring).
        """
        edge = get_gradient_edge(y) if y.requires_grad else None
        self._calls[id(block)].append(
            st.ModuleCall(x, edge, y.shape, y.dtype, current_example_index(), x._version, group=group)
        )

    def _stats_context(self):
        return contextlib.nullcontext() if self.options.differentiable else torch.no_grad()

    def accumulate(self, out: Tensor, y: Tensor, retain_graph: bool = False) -> BatchSums:
        """The factor sums of the recorded forward pass, given its output ``out`` and targets ``y``.

        Args:
            out: the model output of the recorded forward.
            y: the targets.
            retain_graph: keep the autograd graph (to back-propagate the training loss after).

        Returns:
            The batch's :class:`BatchSums`; the recorded calls are dropped.

        Raises:
            RuntimeError: a recorded input was modified in place after its module ran, or no recorded
                output requires grad.
            ValueError: ``out`` and ``y`` do not fit the likelihood, or rows do not map to examples.
        """
        opts = self.options
        called = [b for b in self.blocks if self._calls[id(b)]]
        sums = {id(b): BlockSums(form=opts.factor_form) for b in self.blocks}
        try:
            y = check_output_and_targets(opts.likelihood, out, y)
            for b in called:
                for c in self._calls[id(b)]:
                    if c.x._version != c.x_version:
                        raise RuntimeError(
                            f"the input of module {b.name!r} was modified in place after the module ran; K-FAC "
                            "needs the value the module saw: make the later operation out of place"
                        )
            N = out.shape[0]
            with self._stats_context():
                loss = summed_nll(opts.likelihood, out, y)
                for b in called:
                    self._input_stats(b, sums[id(b)], N)
            S = curvature_columns(opts.likelihood, opts.fisher_type, out, y, opts.mc_samples, opts.generator)
            if not opts.differentiable:
                S = S.detach()
            self._backward(out, S, called, sums, N, retain_graph)
        finally:
            for calls in self._calls.values():
                calls.clear()
        loss = loss if opts.differentiable else loss.detach()
        return BatchSums([sums[id(b)] for b in self.blocks], loss, N)

    def _input_stats(self, block: CoveredModule, sums: BlockSums, N: int) -> None:
        calls = self._calls[id(block)]
        approx, copies_approx = self.options.flavour(block)
        if block.kind is BlockKind.DIAG:
            for c in calls:
                c.xhat = st.diag_input_features(block, c.x)
        elif approx is KFACApprox.EXPAND:
            A, rows, count = st.expand_input_sum(block, calls, N, copies_approx, self.options.factor_form)
            if A is not None:
                sums.A.add_dense(A)
            if rows is not None:
                sums.A.add_rows(rows, self.options.factor_form)
            sums.add_count(count)
        else:
            sums.add_input_rows(*st.reduce_input_rows(block, calls, N, copies_approx))
        for c in calls:
            c.x = None  # input statistics done: do not keep the tensor alive

    def _backward(
        self, out: Tensor, S: Tensor, called: List[CoveredModule], sums: Dict[int, BlockSums], N: int,
        retain_graph: bool,
    ) -> None:
        opts = self.options
        calls: List[Tuple[CoveredModule, st.ModuleCall]] = [(b, c) for b in called for c in self._calls[id(b)]]
        calls = [(b, c) for b, c in calls if c.edge is not None]
        if not calls:
            raise RuntimeError("no recorded module output requires grad; are all parameters frozen?")
        pending: Dict[int, Tensor] = {}  # per-unit gradient sums of a column chunk, summed over calls

        def on_grad(i: int, g: Tensor) -> None:
            b, c = calls[i]
            approx, copies_approx = opts.flavour(b)
            with self._stats_context():
                if b.kind is BlockKind.KRON and approx is KFACApprox.EXPAND:
                    B, rows = st.expand_grad_sum(b, c, g, N, copies_approx, opts.factor_form)
                    if B is not None:
                        sums[id(b)].add_grad_sum(B)
                    else:
                        sums[id(b)].add_grad_rows(rows)
                    return
                if b.kind is BlockKind.KRON:
                    ex = st.reduce_grad_units(b, c, g, N, copies_approx)
                else:
                    ex = st.diag_grad_units(b, c, g, N)
                pending[id(b)] = ex if id(b) not in pending else pending[id(b)] + ex

        def on_chunk_end() -> None:
            with self._stats_context():
                for b in called:
                    if id(b) not in pending:
                        continue
                    ex = pending.pop(id(b))
                    if b.kind is BlockKind.KRON:
                        sums[id(b)].add_grad_rows(st.unit_rows(ex))
                    else:
                        sums[id(b)].add_grad_sum(st.unit_outer(ex))

        targets = [Target(c.edge, c.y_shape, c.y_dtype) for _, c in calls]
        for _, c in calls:
            c.edge = None
        batched = opts.batched_backward
        if batched == "auto":
            batched = out.device.type == "cuda"
        keep = retain_graph or opts.differentiable
        if batched:
            backward_vmapped(out, S, targets, on_grad, on_chunk_end, keep, opts.differentiable, opts.max_grad_memory)
        else:
            backward_per_column(out, S, targets, on_grad, on_chunk_end, keep, opts.differentiable)
        del targets


def _mha_fastpath_enabled() -> bool:
    mha = getattr(torch.backends, "mha", None)
    return bool(mha.get_fastpath_enabled()) if mha is not None else False


def _set_mha_fastpath(value: bool) -> None:
    mha = getattr(torch.backends, "mha", None)
    if mha is not None:
        mha.set_fastpath_enabled(value)


@contextlib.contextmanager
def recording(model: nn.Module, blocks: Sequence[CoveredModule], recorder: Recorder) -> Iterator[Recorder]:
    """Install the rules' recording of ``blocks`` on ``model`` for the duration of the context.

    PyTorch's fused transformer fast paths (``nn.TransformerEncoderLayer`` /
    ``nn.MultiheadAttention`` in eval mode) bypass submodule forwards; they are already off while
    grad is enabled and parameters require grad, and are switched off explicitly while recording.

    Args:
        model: the network.
        blocks: its covered blocks.
        recorder: receives the calls.

    Yields:
        ``recorder``.
    """
    by_module: Dict[int, List[CoveredModule]] = {}
    for b in blocks:
        by_module.setdefault(id(b.module), []).append(b)
    for m in model.modules():  # attention whose own parameters are frozen still has to call its children
        if id(m) in by_module or not uses_children_functionally(m):
            continue
        if any(id(c) in by_module for c in m.children()):
            by_module[id(m)] = []  # out_proj (MHA), qkv / proj (Swin) called as modules to be recorded
    handles = []
    fastpath = _mha_fastpath_enabled()
    _set_mha_fastpath(False)
    try:
        for key, module_blocks in by_module.items():
            if module_blocks:
                handles += module_blocks[0].rule.attach(module_blocks[0].module, module_blocks, recorder)
            else:
                parent = next(m for m in model.modules() if id(m) == key)
                handles += find_rule(parent).attach(parent, module_blocks, recorder)
        yield recorder
    finally:
        for h in reversed(handles):
            h.remove()
        _set_mha_fastpath(fastpath)
