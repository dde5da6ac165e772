"""The interface every layer rule implements, and the row-to-example mapping they share.

A *rule* knows one family of modules. The engine (:mod:`marglik.curvature.kfac`) records, for
every call of a covered module in a forward pass, the module's input ``x`` and output ``y``.
Output gradients arrive as ``g`` of shape ``(K, *y.shape)`` (``K`` curvature columns). A rule
turns these into the per-row quantities below; the engine maps rows to examples
(:func:`example_sum`), sums over calls (weight tying) and forms the factors.

Kronecker rules (:class:`KroneckerRule`: Linear, ConvNd) provide, with ``G`` groups,
``din`` inputs and ``dout`` outputs per group (bias not included; the engine appends it):

* ``expand_inputs(x)  -> (G, din, M)``: the layer input at every one of the ``M`` positions;
* ``expand_input_stats(x) -> (sum a a^T (G, din, din) or None, sum a (G, din), M)``: what
  K-FAC-expand needs of them; the default forms ``expand_inputs`` and its Gram, a rule may
  compute the sums without the ``(din, M)`` matrix (stride-1 convolutions do);
* ``reduce_inputs(x)  -> ((T, G, din), P)``: per input row, the *sum* over its ``P`` positions;
* ``expand_grads(g)   -> (G, dout, K * M)``: output gradients at every position and column;
* ``expand_grad_gram(g) -> (G, dout, dout)``: their Gram (default: of ``expand_grads``);
* ``reduce_grads(g)   -> (K, T, G, dout)``: per row, the sum over positions.

Elementwise rules (:class:`ElementwiseRule`: norm layers, :class:`marglik.nn.Scale` /
:class:`marglik.nn.Bias`) provide ``normalized(x)`` (the tensor multiplied by the weight, shape of
``y``) and ``channel_sums(t)`` summing ``(K, T, ...)`` over everything but rows and channels.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...errors import UserError
from ..gram import sym_gram
from ..options import BlockKind


class UnsupportedModuleError(UserError, TypeError):
    """A module holds trainable parameters that no rule covers (the message names it and the way out:
    ``ignore_modules``)."""


def example_sum(t: Tensor, dim: int, N: int, index: Optional[Tensor], name: str) -> Tensor:
    """Sum the rows of ``t`` along ``dim`` (size ``T``) into ``N`` examples.

    Rows map to examples by ``index`` (``(T,)``, from :func:`marglik.example_index`) when given
    and of length ``T``; else ``T == N`` (identity) or ``T == m N`` (example-major ``(N, m)``).
    """
    T = t.shape[dim]
    if index is not None and index.shape[0] == T:
        t = t.movedim(dim, 0)
        out = t.new_zeros((N,) + t.shape[1:])
        out = out.index_add(0, index.to(t.device), t)
        return out.movedim(0, dim)
    if T == N:
        return t
    if N > 0 and T % N == 0:
        shape = list(t.shape)
        shape[dim : dim + 1] = [N, T // N]
        return t.reshape(shape).sum(dim + 1)
    raise ValueError(
        f"module {name!r}: its input has {T} rows but the batch has {N} examples; rows must be the "
        "examples, example-major copies of them (N*m rows), or be declared with marglik.example_index(index)"
    )


class Binding(NamedTuple):
    """One curvature block a rule makes of (some of) a module's parameters.

    ``tag`` is appended to the module name to name the block (``""``: the module's own name);
    ``groups`` is the number of Kronecker groups (rows of ``weight`` / entries of ``bias`` split
    into ``groups`` equal consecutive chunks, each with its own factors); ``rule`` computes the
    block's statistics.
    """

    tag: str
    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]
    groups: int
    rule: "Rule"


def copies_per_example(T: int, N: int, index: Optional[Tensor], name: str) -> int:
    """How many augmented copies ``m`` the ``T`` rows of a layer input hold per example.

    ``1`` when the rows are declared with :func:`marglik.example_index` (graph nodes are positions,
    not copies) or ``T == N``; ``T // N`` for example-major copies (``T == m N``, rule 3 of
    :mod:`marglik.curvature.sharing`); anything else is the error of :func:`example_sum`.
    """
    if (index is not None and index.shape[0] == T) or T == N:
        return 1
    if N > 0 and T % N == 0:
        return T // N
    raise ValueError(
        f"module {name!r}: its input has {T} rows but the batch has {N} examples; rows must be the "
        "examples, example-major copies of them (N*m rows), or be declared with marglik.example_index(index)"
    )


class Rule:
    """Base class: which module types a rule covers and which parameters it owns.

    Recording. :meth:`attach` installs what records the module's calls during a captured forward
    pass and returns handles whose ``remove()`` undoes it; the default is one forward hook per
    block, passing the module's first positional input and its output to ``recorder.record``. A
    rule whose module never calls its parameters through a hookable module (``nn.MultiheadAttention``)
    or that must see a per-example copy of a parameter (:mod:`.leaf`) overrides it.
    """

    kind: Optional[BlockKind] = None  #: the block kind of its bindings; None: decided per binding
    module_types: Tuple[type, ...] = ()
    param_names: Sequence[str] = ("weight", "bias")

    def matches(self, module: nn.Module) -> bool:
        """Whether this rule covers ``module`` (by type)."""
        return isinstance(module, self.module_types)

    def groups(self, module: nn.Module) -> int:
        """Number of Kronecker groups ``G`` of ``module``'s block (grouped convolutions; default 1)."""
        return 1

    def bindings(self, name: str, module: nn.Module, own: Dict[str, nn.Parameter]) -> List[Binding]:
        """The blocks of ``module``'s trainable parameters ``own`` (default: one ``weight``/``bias`` block)."""
        extra = set(own) - set(self.param_names)
        if extra:
            raise UnsupportedModuleError(
                f"module {name!r} ({type(module).__name__}) has unexpected trainable parameters {sorted(extra)}"
            )
        return [Binding("", own.get("weight"), own.get("bias"), self.groups(module), self)]

    def attach(self, module: nn.Module, states: Sequence[Any], recorder: Any) -> List[Any]:
        """Install the recording of ``module``'s calls for its blocks ``states``; returns removable handles."""
        handles = []
        for state in states:
            def hook(mod: nn.Module, args: tuple, output: Tensor, state=state) -> None:
                if not args or not torch.is_tensor(args[0]):
                    raise ValueError(f"module {state.name!r} was called without a positional tensor input")
                recorder.record(state, args[0], output)

            handles.append(module.register_forward_hook(hook))
        return handles


class KroneckerRule(Rule):
    """A layer whose block is ``B ⊗ A`` per group (Linear, Conv). Shapes: a recorded input ``x`` has
    ``T`` rows (examples or example-major copies), a gradient ``g`` has ``K`` curvature columns in
    front, ``(K, T, ...)``; ``G`` groups, ``din`` inputs per group (without the bias), ``M``
    positions in all (rows times shared positions)."""

    kind = BlockKind.KRON
    #: whether :meth:`expand_grads` gives every output gradient as a row of ``B`` (so that the engine
    #: may keep few of them as rows, :mod:`marglik.curvature.row_factor`)
    rows_capable: bool = False

    def input_rows_count(self, module: nn.Module, x: Tensor) -> Optional[int]:
        """``M``, the number of positions of an input ``x`` (the columns :meth:`expand_inputs` would
        give), when forming them is no dearer than the rule's own Gram; ``None`` otherwise (the engine
        then takes the dense Gram of :meth:`expand_input_stats`)."""
        return None

    def expand_inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """Every position's input as a column: ``(G, din, M)``."""
        raise NotImplementedError

    def expand_input_stats(self, module: nn.Module, x: Tensor, gram: bool = True) -> Tuple[Optional[Tensor], Tensor, int]:
        """K-FAC-expand input statistics: the Gram ``(G, din, din)`` (``None`` if ``gram`` is off),
        the column sum ``(G, din)`` and the position count ``M``. Rules with a faster Gram override it."""
        X = self.expand_inputs(module, x)
        return (sym_gram(X) if gram else None), X.sum(2), X.shape[2]

    def reduce_inputs(self, module: nn.Module, x: Tensor) -> Tuple[Tensor, int]:
        """K-FAC-reduce inputs: each row's input summed over its shared positions ``(T, G, din)``,
        and the number of positions ``P`` per row."""
        raise NotImplementedError

    def expand_grads(self, module: nn.Module, g: Tensor) -> Tensor:
        """Every (column, position)'s output gradient as a column: ``(G, dout, K M)``."""
        raise NotImplementedError

    def expand_grad_gram(self, module: nn.Module, g: Tensor) -> Tensor:
        """K-FAC-expand gradient Gram ``(G, dout, dout)``: ``sum_{k, m} g g^T``."""
        return sym_gram(self.expand_grads(module, g))

    def reduce_grads(self, module: nn.Module, g: Tensor) -> Tensor:
        """K-FAC-reduce gradients: each row's output gradient summed over its positions ``(K, T, G, dout)``."""
        raise NotImplementedError


class ElementwiseRule(Rule):
    """A layer whose parameters act per channel (norms, Fixup scalars): an exact ``k x k`` block per
    channel (``k`` = parameters per channel)."""

    kind = BlockKind.DIAG

    def num_channels(self, module: nn.Module) -> int:
        """Number of channels ``C`` (one block each)."""
        raise NotImplementedError

    def normalized(self, module: nn.Module, x: Tensor) -> Optional[Tensor]:
        """The tensor multiplied by ``weight`` (``None`` if the module has no weight)."""
        raise NotImplementedError

    def channel_sums(self, module: nn.Module, t: Tensor) -> Tensor:
        """``(K, T, *rest) -> (K, T, C)``."""
        raise NotImplementedError
