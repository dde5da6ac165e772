"""Per-layer K-FAC flavours: which blocks expand and which reduce their shared axis, and why it matters
for learned invariance.

:class:`marglik.KFAC` takes ``approx`` as one flavour for every block (``"expand"``, ``"reduce"``),
as the named rule ``"auto"``, or as a mapping from module names / types to flavours;
:func:`assign_flavours` turns it into one flavour per covered block. A block's factors depend only
on its own flavour and the posterior precision is block diagonal, so a mixed assignment gives every
block exactly the factors (and the log-determinant term) of the uniform flavour it was assigned.

Why reduce rewards an augmentation range less (the derivation behind ``"auto"``)
--------------------------------------------------------------------------------
Take a layer fed ``m`` augmented copies ``s`` of every example ``n``, each with ``R`` shared positions
``r`` (pixels), inputs ``a[n,s,r]`` and output gradients ``g[k,n,s,r]``, copies reduced
(``copies_approx="reduce"``, the learned-augmentation setting: the logits are the mean of the copies'
logits, so ``g[k,n,s,r] = h[k,n,s,r] / m`` with ``h`` the gradient of one copy's own logits). Write
``E_s`` / ``Var_s`` for the mean / covariance over the copies and ``E_r`` for the mean over positions.

* expand over positions, copies reduced (:mod:`marglik.curvature.kfac`):
  ``A_E = E_{n,r} [ E_s a E_s a^T ] = E_{n,r,s} [a a^T] - E_{n,r} Var_s a[n,.,r]`` and
  ``B_E = sum_{k,n,r} (sum_s g)(sum_s g)^T = sum_{k,n,r} ( E_s[h h^T] - Var_s h[k,n,.,r] )``;
* reduce over positions and copies: the unit is the example, ``a_n = E_{s,r} a``,
  ``g_n = sum_{s,r} g``:
  ``A_R = E_n [ E_s abar E_s abar^T ] = E_{n,s}[abar abar^T] - E_n Var_s abar[n,.]`` with the
  position-mean input ``abar[n,s] = E_r a[n,s,r]``, and
  ``B_R = sum_{k,n} ( E_s[hsum hsum^T] - Var_s hsum[k,n,.] )`` with ``hsum = sum_r h``.

Both factors lose exactly the *between-copy variance* of what they are built from, and the sums
over copies scale as ``m * (1/m) = 1``: at range 0 (identical copies) neither flavour depends on
``m``. The flavours differ in *what* the copies must disagree on. Expand keeps every position: a
rotation moves content between positions, so the copies disagree position by position and
``E Var_s a[n,.,r]`` grows with the range towards ``E_{n,r,s}[a a^T]`` (for a wide range and many
copies ``E_s a`` is a blurred image). Reduce sees only the position mean ``abar`` (and the
position sum ``hsum``), which a rotation *permutes* rather than changes: ``abar[n,s]`` of the input
layer moves only through the corners the rotation cuts off and the interpolation, so
``Var_s abar`` stays small at any range. The same holds deeper as far as the features are
equivariant to the rotation (their position mean is invariant).

The log-determinant (Occam) term of a block is ``sum_{i,j} log(1 + lam_i mu_j / delta)`` over the
eigenvalues ``lam`` of ``B`` and ``mu`` of ``A`` (prior precision ``delta``), so

    d log det / d range = sum_{i,j} w_ij (d lam_i / lam_i + d mu_j / mu_j),
    w_ij = lam_i mu_j / (lam_i mu_j + delta) in [0, 1]:

every eigen-pair that the data dominate (``w ~ 1``) contributes the *relative* shrinkage of its two
eigenvalues. With ``d_B`` such output directions, the reward of a relative shrinkage ``-d mu / mu`` of
``A`` is ``d_B`` times it (and vice versa). Under expand, ``d mu / mu`` of a spatial layer is the
fraction of the per-position second moment that the copies do not share, of order one for a wide
range; under reduce it is the between-copy fraction of the *position mean*, close to zero at the
input layer. So ``-0.5 d log det`` of a convolution is large under expand and small under reduce,
while a linear layer on pooled features (one position: both flavours give the same factors) rewards
the range equally under both. ``results/reduce_invariance.md`` measures this per layer: on the digits
CNN the two convolutions carry all of expand's extra reward and the linear layers are equal; on
WRN-16-4 the extra reward is spread over all sixteen convolutions (half of it in the second stage),
not concentrated in the first one.

Rule ``"auto"``: expand on the Kronecker blocks of convolutions (their shared axis is spatial
positions, which a spatial augmentation permutes), reduce on every other block (linear layers,
attention, leaf parameters; norm-layer blocks are exact either way). Reduce's savings are kept where
the shared axis is not spatial (tokens of a transformer's linear layers).

A smaller reward is not no reward. Trained under the default run protocol (the ``mc-root`` estimate,
MAP steps on one copy, one hyperstep per epoch), reduce-reduce learns the range on the digits CNN
and on WRN-16-4 in every seed, at expand-reduce's test accuracy
(``results/marglik_vs_grid.md``, ``results/wrn_marglik_lean.md``). ``"auto"`` therefore stays a
choice, not the default: it is for protocols where reduce's range comes out too small (WRN-16-4 under
the type-2 GGN with MAP steps on all copies learned 0.3-59 degrees of 90 with reduce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from .blocks import CoveredModule
from .layers.conv import ConvRule
from .options import BlockKind, KFACApprox, StrOption

__all__ = ["FlavourRule", "ApproxSpec", "FlavourAssignment", "assign_flavours", "auto_flavour", "DEFAULT_KEY"]


class FlavourRule(StrOption):
    """A named rule choosing each block's flavour (see the module docstring)."""

    AUTO = "auto"


#: the mapping key for every block that no other key matches
DEFAULT_KEY = "*"

FlavourValue = Union[str, KFACApprox, FlavourRule]
#: what ``KFAC(approx=...)`` accepts: one flavour, a rule, or ``{module name | type name | type | "*": flavour or rule}``
ApproxSpec = Union[FlavourValue, Mapping[Union[str, type], FlavourValue]]


def parse_value(value: FlavourValue, what: str) -> Union[KFACApprox, FlavourRule]:
    """``"expand"`` / ``"reduce"`` as :class:`KFACApprox`, ``"auto"`` as :class:`FlavourRule`.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, (KFACApprox, FlavourRule)):
        return value
    if isinstance(value, str):
        for cls in (KFACApprox, FlavourRule):
            try:
                return cls(value)
            except ValueError:
                pass
    raise ValueError(f"unknown {what} {value!r}; expected one of 'expand', 'reduce', 'auto'")


def auto_flavour(block: CoveredModule) -> KFACApprox:
    """The flavour of rule ``"auto"``: expand on convolution (Kronecker) blocks, reduce on the others."""
    if block.kind is BlockKind.KRON and isinstance(block.rule, ConvRule):
        return KFACApprox.EXPAND
    return KFACApprox.REDUCE


@dataclass(frozen=True)
class FlavourAssignment:
    """One flavour per covered block.

    Attributes:
        flavours: block name -> :class:`KFACApprox`, in block order.
        label: ``"expand"`` / ``"reduce"`` (one flavour given), ``"auto"``, or ``"per-layer"`` (a mapping).
    """

    flavours: Dict[str, KFACApprox]
    label: str

    def of(self, block: CoveredModule) -> KFACApprox:
        """The flavour of ``block``."""
        return self.flavours[block.name]

    def uniform(self, blocks: Sequence[CoveredModule]) -> Optional[KFACApprox]:
        """The flavour shared by every Kronecker block (diagonal blocks are exact under either), or
        ``None`` when they differ; with no Kronecker block, the flavour of the first block."""
        kron = {self.flavours[b.name] for b in blocks if b.kind is BlockKind.KRON}
        if not kron:
            return self.flavours[blocks[0].name] if blocks else None
        return kron.pop() if len(kron) == 1 else None


def _name_match(key: str, name: str) -> bool:
    return name == key or name.startswith(key + ".")


def _type_rank(key: Union[str, type], module: nn.Module) -> Optional[int]:
    """Where ``key`` (a type or a type's name) sits in ``type(module)``'s MRO (lower: more specific)."""
    for i, cls in enumerate(type(module).__mro__):
        if key is cls or key == cls.__name__:
            return i
    return None


def _resolve(spec: Union[KFACApprox, FlavourRule], block: CoveredModule) -> KFACApprox:
    return auto_flavour(block) if spec is FlavourRule.AUTO else spec


def assign_flavours(spec: ApproxSpec, blocks: Sequence[CoveredModule]) -> FlavourAssignment:
    """One flavour per block from ``KFAC``'s ``approx``.

    A mapping's keys are module names (a key covers the module's blocks and those of its submodules;
    the longest matching name wins), module types or their class names (``"Conv2d"``; the most specific
    type wins; names take precedence over types), and ``"*"`` (every other block). Values are
    ``"expand"``, ``"reduce"`` or ``"auto"`` (the rule's choice for that block).

    Args:
        spec: one flavour, ``"auto"``, or a mapping as above.
        blocks: the covered blocks.

    Returns:
        The assignment.

    Raises:
        ValueError: a value is not a flavour or rule; a key matches no covered block; a block matches
            no key and the mapping has no ``"*"``.
        TypeError: a key is neither a string nor a type.
    """
    if not isinstance(spec, Mapping):
        value = parse_value(spec, "K-FAC approximation")
        return FlavourAssignment({b.name: _resolve(value, b) for b in blocks}, value.value)
    entries: Dict[Union[str, type], Union[KFACApprox, FlavourRule]] = {}
    for key, value in spec.items():
        if not isinstance(key, (str, type)):
            raise TypeError(f"K-FAC approximation: a per-layer key must be a module name or type, got {key!r}")
        entries[key] = parse_value(value, f"K-FAC approximation for {key!r}")
    default = entries.pop(DEFAULT_KEY, None)
    used = set()
    flavours: Dict[str, KFACApprox] = {}
    unmatched = []
    for b in blocks:
        chosen: Optional[Tuple[Union[str, type], Union[KFACApprox, FlavourRule]]] = None
        names = [k for k in entries if isinstance(k, str) and _name_match(k, b.name)]
        if names:
            key = max(names, key=len)
            chosen = (key, entries[key])
        else:
            ranked = [(r, k) for k in entries if (r := _type_rank(k, b.module)) is not None]
            if ranked:
                key = min(ranked, key=lambda t: t[0])[1]
                chosen = (key, entries[key])
        if chosen is None:
            if default is None:
                unmatched.append(b.name)
                continue
            flavours[b.name] = _resolve(default, b)
        else:
            used.add(chosen[0])
            flavours[b.name] = _resolve(chosen[1], b)
    unused = [k for k in entries if k not in used and not _matches_any(k, blocks)]
    if unused:
        shown = ", ".join(repr(getattr(k, "__name__", k)) for k in unused)
        raise ValueError(
            f"K-FAC approximation: no covered layer is named or typed {shown}; covered layers: "
            f"{', '.join(b.name for b in blocks)}"
        )
    if unmatched:
        raise ValueError(
            f"K-FAC approximation: no flavour for the layers {', '.join(unmatched)}; add them or a "
            f"{DEFAULT_KEY!r} entry to the mapping"
        )
    return FlavourAssignment(flavours, "per-layer")


def _matches_any(key: Union[str, type], blocks: Sequence[CoveredModule]) -> bool:
    return any((isinstance(key, str) and _name_match(key, b.name)) or _type_rank(key, b.module) is not None
               for b in blocks)
