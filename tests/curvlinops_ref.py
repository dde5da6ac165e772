"""K-FAC factors from curvlinops, converted to marglik's convention (a test reference).

marglik's convention (see ``marglik/curvature/kron.py``)
-------------------------------------------------------
For a ``Linear``/``Conv`` layer with weight ``W (Dout, Din)`` and bias ``b`` the block is
``B ⊗ A`` in the row-major ordering of the augmented matrix ``[W, b]`` (bias = last input
column). It approximates the GGN/Fisher of the **summed** NLL: CE summed over every position,
``0.5 ||y - f||^2`` summed, BCE-with-logits summed.

* expand: ``A = 1/(N R) sum_{n,r} ã ã^T`` (``ã = [a, 1]``), ``B = sum_{n,r,k} g g^T``
* reduce: ``ã_n = mean_r ã[n, r]``, ``g_n = sum_r g[n, r]``, ``A = 1/N sum_n ã_n ã_n^T``,
  ``B = sum_{n,k} g_n g_n^T``

where ``g`` are output gradients of the loss-Hessian square-root columns (type-2), of sampled
labels divided by ``sqrt(mc_samples)`` (mc), or of the true labels (empirical).

What curvlinops 3.0.1 ``KFACLinearOperator`` computes (read from the installed source)
--------------------------------------------------------------------------------------
Constructor: ``KFACLinearOperator(model_func, loss_func, params, data, *, check_deterministic,
seed=2147483647, fisher_type="mc"|"type-2"|"empirical"|"forward-only", mc_samples=1,
kfac_approx="expand"|"reduce", num_per_example_loss_terms=None, separate_weight_and_bias=True,
num_data=None)``; ``data`` is an iterable of ``(X, y)`` batches. ``compute_kronecker_factors()``
computes the factors; the public ``state_dict()`` returns them as ``"input_covariances"``
(``{module_name: A}``, "aaT") and ``"gradient_covariances"`` (``{module_name: B}``, "ggT"), with
``"num_per_example_loss_terms"``; the public classmethod ``compute_parameter_mapping(params,
model)`` gives ``{module_name: {"weight": pos, "bias": pos}}``. This reference reads only these
(no private attribute). Both are public API of curvlinops 3.x; its unreleased development branch
(a breaking, i.e. major, release) builds the operator from factor "computers" and drops
``compute_kronecker_factors`` / ``state_dict``, hence the ``<4`` bound in ``pyproject.toml``.

* Supported: losses ``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss`` (reduction
  ``"sum"`` or ``"mean"``); layers ``nn.Linear`` and ``nn.Conv2d`` only (no Conv1d/Conv3d; any
  trainable parameter elsewhere raises ``NotImplementedError``); fisher types type-2, mc,
  empirical, forward-only (B = I); approx expand and reduce (for Linear the weight-sharing
  dims are all dims between batch and feature; for Conv2d the output positions).
* Output layout: CE expects torch's ``(N, C, *positions)`` (rearranged ``batch c ... ->
  (batch ...) c``), targets ``(N, *positions)``. MSE/BCE expect the output dim LAST,
  ``(N, *positions, C)``. A model with ``(N, R, C)`` output + CE must therefore be wrapped to
  move the class dim to position 1 (done here by ``_ClassDimSecond``).
* Bias: ``separate_weight_and_bias=True`` (default, also what laplace-torch uses) gives A over
  the inputs only; the bias block is then ``B`` alone (``1 ⊗ B``) and weight-bias cross terms are
  zero. With ``separate_weight_and_bias=False`` (used here) A is over ``[a, 1]`` -- ones appended
  LAST -- and the joint block is ``B ⊗ A`` in row-major ``[W, b]``, i.e. exactly marglik's
  layout. (The class docstring writes ``A ⊗ B`` with column-stacking vec; same matrix.)
* A (input covariance): expand ``sum_{n,r} ã ã^T / (N_data * R)`` with ``R =
  x.shape[1:-1].numel()`` (Conv2d: number of output positions, patches from ``F.unfold``,
  ordered ``(c_in, k1, k2)`` = row-major flattening of the conv weight); reduce ``sum_n
  mean_r(x)_n mean_r(x)_n^T / N_data`` (ones appended after averaging). ``N_data`` = total number
  of examples (``num_data``), so A is accumulated over batches. Independent of ``reduction``.
  => **A_marglik = A_curvlinops** (expand and reduce).
* B (gradient covariance), ``reduction="sum"``: ``sum_{n,r} g g^T`` (expand) or ``sum_n
  (sum_r g)(sum_r g)^T`` (reduce), times ``1/mc_samples`` for mc, summed over batches, where
  ``g`` are gradients of torch's loss: type-2 backpropagates the columns of the loss Hessian
  square root ``S`` (CE: ``diag(sqrt p) - p sqrt(p)^T``; MSE: ``sqrt(2) I`` because torch's
  MSELoss has no 1/2; BCE: ``diag(sqrt(s(1-s)))``).
  ``reduction="mean"``: type-2 scales ``S`` by ``1/(B_batch R)`` and every fisher type applies
  the correction ``(B_batch R)^2 / (N_data R mc_samples)``; MSE/BCE additionally average over
  the C output dims (S gets ``sqrt(1/C)``; mc/empirical losses are multiplied by ``sqrt(C)``).
  Net effect: ``B_mean = B_sum / (N R)`` for CE and ``B_sum / (N R C)`` for MSE/BCE.
* Conversion used by :func:`curvlinops_factors` (``R = num_per_example_loss_terms``, ``C``
  the output dim):

  ====================  ==========================  ====================
  loss                  B_marglik (from B_sum)       extra for "mean"
  ====================  ==========================  ====================
  CE, any type          ``B_sum``                    ``* N R``
  BCE, any type         ``B_sum``                    ``* N R C``
  MSE, type-2 / mc      ``B_sum / 2``                ``* N R C``
  MSE, empirical        ``B_sum / 4``                ``* N R C``
  ====================  ==========================  ====================

  (MSE: torch's ``||y - f||^2`` has gradient ``2 (f - y)`` and Hessian ``2 I``; marglik's
  ``0.5 ||y - f||^2`` has ``f - y`` and ``I``. For mc curvlinops samples ``y = f + sqrt(0.5)
  eps`` -- the Gaussian whose NLL is ``||y-f||^2`` -- so its gradient is ``-sqrt(2) eps`` vs.
  marglik's ``-eps`` for ``y = f + eps``: again factor 2.)
* MC sampling: at the start of ``compute_kronecker_factors`` a ``torch.Generator(device=
  <device of the parameters>)`` is created and seeded with ``manual_seed(seed)``; it is NOT
  the global RNG. Then for each batch (in data order) and each of the ``mc_samples`` samples,
  one call on the rearranged 2-d output ``(N_batch * R, C)`` (rows ordered ``(n, r)``):
  CE ``output.softmax(1).multinomial(1, generator=gen).squeeze(-1)``; MSE ``output + sqrt(0.5) *
  randn(output.shape, dtype=output.dtype, generator=gen)``; BCE ``output.sigmoid().bernoulli(
  generator=gen)``. The loss of all sampled labels is backpropagated at once, and B gets the
  ``1/mc_samples`` factor. marglik can reproduce this bit-for-bit (same device/dtype) by drawing
  with its own generator seeded ``seed`` in the same order, e.g. ``eps = randn(...)``, ``y = f +
  eps`` for Gaussian (the ``sqrt(0.5)`` and the factor 2 cancel after the /2 conversion) -- the
  tests in ``test_curvlinops_ref.py`` check exactly this.
* CAVEAT (type-2 square-root dependence): curvlinops backpropagates column ``k`` of the
  root ``S_m`` of EVERY loss position ``m`` in one backward pass. If a layer position feeds
  several loss positions (reduce with ``(N, R, C)`` outputs, or expand when e.g. a later 3x3
  conv mixes positions), ``B`` gets cross terms ``sum_k J_r^T S_r[:, k] S_r'[:, k]^T J_r'``
  that depend on which root is used (CE: curvlinops uses ``diag(sqrt p) - p sqrt(p)^T``,
  column k = ``sqrt(p_k) (e_k - p)``; the symmetric root gives a different B) and that the MC
  estimator does NOT have in expectation (labels at different positions are sampled
  independently, so MC converges to the "one backward per loss position" version without
  cross terms; checked numerically: 20000 samples agree with that to <1%, while curvlinops'
  type-2 differs from it by 150-200% relative Frobenius error on a 2-layer MLP with R = 3,
  reduce, CE). For one loss position per example, or MSE (S = sqrt(2) I everywhere), there
  is no ambiguity. To match curvlinops, marglik must use the same root and the batched
  backprop.
* Grouped Conv2d: curvlinops AVERAGES the input channels over groups before unfolding and uses
  one full ``(Cout, Cout)`` B -- a different approximation from marglik's per-group blocks;
  do not compare grouped convs. Padding strings are supported only when symmetric.
* ``check_deterministic=True`` (default) recomputes the factors twice; we pass ``False``.

laplace-torch 0.3 notes (installed source ``laplace/curvature/{curvlinops,asdl}.py``)
----------------------------------------------------------------------------------
* ``CurvatureInterface`` uses ``MSELoss(reduction="sum")`` with ``factor = 0.5`` (regression)
  or ``CrossEntropyLoss(reduction="sum")`` with ``factor = 1`` (classification).
* ``CurvlinopsGGN(model, likelihood, stochastic=False).kron(X, y, N, **kw)`` builds a
  ``KFACLinearOperator`` on the single batch ``[(X, y)]`` (fisher_type type-2, or mc if
  ``stochastic``; ``kw`` may carry ``mc_samples`` / ``kfac_approx``), with
  ``separate_weight_and_bias=True``. It returns ``(factor * loss, kron)`` where ``kron`` is a
  ``laplace.utils.Kron`` whose ``kfacs`` list has per module ``[B, A]`` for the weight
  (``B`` first: ``kron(B, A)`` over the row-major weight) and ``[B]`` for the bias (no cross
  terms). Scaling: A from curvlinops is normalised by the batch size M, then multiplied by
  ``M / N`` -> ``sum_batch a a^T / (N R)``; B is the batch sum; then ``kron *= factor``
  (``Kron.__mul__`` distributes the scalar as ``factor**(1/len(F))`` on each factor, i.e.
  ``sqrt(0.5)`` on B and on A for regression weights, ``0.5`` on the bias B).
* ``AsdlGGN(model, likelihood, stochastic=False).kron(X, y, N)`` uses ASDL's ``FisherConfig(
  fisher_type=FISHER_EXACT|FISHER_MC, fisher_shapes=[SHAPE_KRON], data_size=1)``, the same
  ``[B, A]`` / ``[B]`` layout, A then divided by ``N`` (ASDL's A is the batch sum); ASDL uses
  ``0.5 * MSE`` internally so no ``factor``. Numerically (checked here, float64, MLP and a
  Conv2d(padding=1) + Linear net): ``AsdlGGN`` and ``CurvlinopsGGN`` give the same Kronecker
  products (expand); individual factors differ by ``sqrt(2)`` for regression (A_asdl =
  sqrt(2) A_cl, B_asdl = B_cl / sqrt(2)).
* ``KronLaplace.fit(loader)`` calls ``backend.kron(X, y, N=len(loader.dataset))`` per batch
  and **adds the factors** (``Kron.__add__`` adds A's and B's separately): A_total = sum_b
  A_b (each already /N) = data-set A, B_total = sum_b B_b = data-set B. So the multi-batch
  result equals the full-batch K-FAC (for the same parameters), and "N" only normalises A.
* The EF variants (``AsdlEF``/``CurvlinopsEF``) for regression give **2x** the empirical
  Fisher of ``0.5 ||y - f||^2`` (checked with N = 1, where K-FAC is exact); classification
  is correct.
* ASDL (``asdfghjkl 0.1a4``, module ``asdl``) works with torch 2.14.1 for these calls
  (Linear MLP and Conv2d(padding=1)+Linear, classification and regression, GGN, MC and EF
  kron): results are correct; only ``FutureWarning``s (``torch.jit.script`` deprecated,
  non-full backward hooks) are emitted.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from reference import canonical_likelihood
from torch import Tensor, nn


class _ClassDimSecond(nn.Module):
    """Wrap a model with output ``(N, *pos, C)`` to return torch's CE layout ``(N, C, *pos)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.movedim(-1, 1) if out.dim() > 2 else out


def _loss_func(likelihood: str, reduction: str) -> nn.Module:
    lik = canonical_likelihood(likelihood)
    return {
        "classification": nn.CrossEntropyLoss,
        "regression": nn.MSELoss,
        "binary": nn.BCEWithLogitsLoss,
    }[lik](reduction=reduction)


def b_scale(
    likelihood: str,
    fisher_type: str,
    reduction: str = "sum",
    num_data: int = 1,
    num_loss_terms: int = 1,
    out_dim: int = 1,
) -> float:
    """Factor ``s`` with ``B_marglik = s * B_curvlinops``."""
    lik = canonical_likelihood(likelihood)
    if lik == "regression":
        s = 0.25 if fisher_type == "empirical" else 0.5
    else:
        s = 1.0
    if reduction == "mean":
        s *= num_data * num_loss_terms
        if lik != "classification":
            s *= out_dim
    elif reduction != "sum":
        raise ValueError(reduction)
    return s


def curvlinops_factors(
    model: nn.Module,
    likelihood: str,
    X: Tensor,
    y: Tensor,
    approx: str = "expand",
    fisher_type: str = "type-2",
    mc_samples: int = 1,
    seed: int = 0,
    *,
    reduction: str = "sum",
    batch_size: Optional[int] = None,
    params: Optional[Sequence[nn.Parameter]] = None,
) -> Dict[str, Tuple[Tensor, Tensor]]:
    """curvlinops' K-FAC factors as ``{module_name: (A, B)}`` in marglik's convention.

    ``model`` outputs ``(N, C)`` or ``(N, R, C)`` (marglik layout, class dim last); ``y`` as in
    ``tests/reference.py``. ``A`` is over ``[inputs, 1]`` when the module has a trainable
    weight and bias (bias last), over the inputs when only the weight is trainable, and
    ``ones(1, 1)`` when only the bias is trainable; ``B`` is over the outputs. ``B ⊗ A``
    approximates the GGN/Fisher block of the summed NLL. ``batch_size`` splits the data into
    several batches (curvlinops accumulates over them); ``params`` defaults to the trainable
    parameters. Only ``nn.Linear`` / ``nn.Conv2d`` are supported by curvlinops.
    """
    from curvlinops import KFACLinearOperator

    lik = canonical_likelihood(likelihood)
    if fisher_type not in ("type-2", "mc", "empirical"):
        raise ValueError(fisher_type)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)

    with torch.no_grad():
        out = model(X[:1])
    wrap = lik == "classification" and out.dim() > 2
    net = _ClassDimSecond(model) if wrap else model
    prefix = "model." if wrap else ""

    N = X.shape[0]
    bs = N if batch_size is None else batch_size
    data = [(X[i : i + bs], y[i : i + bs]) for i in range(0, N, bs)]

    op = KFACLinearOperator(
        net,
        _loss_func(lik, reduction),
        params,
        data,
        check_deterministic=False,
        seed=seed,
        fisher_type=fisher_type,
        mc_samples=mc_samples,
        kfac_approx=approx,
        separate_weight_and_bias=False,
        num_data=N,
    )
    op.compute_kronecker_factors()
    state = op.state_dict()  # public: the computed factors and the loss-term count
    mapping = KFACLinearOperator.compute_parameter_mapping(params, net)  # public: {module: {param: pos}}

    R = state["num_per_example_loss_terms"]
    C = 1 if (lik == "binary" and out.dim() == 1) else out.shape[-1]
    s = b_scale(lik, fisher_type, reduction, N, R, C)

    result = {}
    for name in mapping:
        B = state["gradient_covariances"][name] * s
        A = state["input_covariances"].get(name)
        if A is None:  # bias only
            A = B.new_ones(1, 1)
        key = name[len(prefix) :] if name.startswith(prefix) else name
        result[key] = (A.clone(), B.clone())
    return result
