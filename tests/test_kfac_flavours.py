"""Per-layer K-FAC flavours (``KFAC(approx=<mapping> | "auto")``, :mod:`marglik.curvature.flavours`).

* A per-layer assignment gives every block the factors of the uniform flavour it was assigned (float64,
  to round-off), with augmented copies, rows-or-dense factors; all-expand / all-reduce are ``expand`` /
  ``reduce``.
* Exactness against the exact GGN (torch.func, float64) in a deep linear network whose one branch is
  K-FAC-expand's setting (a loss term per position) and whose other branch is reduce's (mean over
  positions): the mixed assignment is exact on every block; the swapped assignment and both uniform
  flavours are not (negative controls). ``"auto"`` is exact on a network whose convolution feeds a loss
  per position and whose linear layer on tokens is pooled.
* Batchwise gradients with a mixed assignment equal the one-pass gradient; bad keys / values are
  one-line errors; the tuning config's ``curvature.approx=auto`` / ``curvature.approx_layers``.
"""

from __future__ import annotations

import pytest
import torch
from reference import block, exact_ggn
from test_batchwise import _one_pass, _two_pass
from test_batchwise import _setup as batchwise_setup
from test_row_factors import TOL
from torch import nn

from marglik import KFAC, KFACApprox, KronBlock
from marglik.models import SmallCNN

RTOL = 1e-10


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


class TwoSettings(nn.Module):
    """Two deep linear branches on the same ``(N, R, D)`` input, outputs concatenated to ``(N, R C1 + C2)``:
    ``pos`` (two linears, one output per position: K-FAC-expand's setting) and ``pool`` (two linears,
    mean over positions, then ``head``: K-FAC-reduce's setting; the head sees one position)."""

    def __init__(self, D: int = 3, H: int = 4, C1: int = 2, C2: int = 3) -> None:
        super().__init__()
        self.pos = nn.Sequential(nn.Linear(D, H), nn.Linear(H, C1))
        self.pool = nn.Sequential(nn.Linear(D, H), nn.Linear(H, H))
        self.head = nn.Linear(H, C2)

    def forward(self, x):
        return torch.cat([self.pos(x).flatten(1), self.head(self.pool(x).mean(1))], dim=1)


class ConvAndTokens(nn.Module):
    """A convolution stack with one output per pixel, beside a linear layer on the pixels as tokens that is
    pooled before its head: rule ``"auto"`` (expand on convolutions, reduce elsewhere) is exact on all."""

    def __init__(self, C: int = 2, H: int = 3) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(C, H, 2, padding=1), nn.Conv2d(H, 2, 1))
        self.tokens = nn.Linear(C, H)
        self.head = nn.Linear(H, 2)

    def forward(self, x):
        per_pixel = self.conv(x).flatten(2).transpose(1, 2).flatten(1)  # (N, R' * 2)
        pooled = self.head(self.tokens(x.flatten(2).transpose(1, 2)).mean(1))
        return torch.cat([per_pixel, pooled], dim=1)


def _max_block_error(model, X, approx, names=None):
    y = torch.randn_like(model(X))
    G = exact_ggn(model, "regression", X, y)
    kron = KFAC(model, "regression", approx=approx).fit((X, y))
    errs = {b.name: rel_err(block(kron.to_dense(), kron, b), block(G, kron, b)) for b in kron.blocks}
    return errs if names is None else {n: errs[n] for n in names}


MIXED = {"pos": "expand", "pool": "reduce", "head": "reduce"}
SWAPPED = {"pos": "reduce", "pool": "expand", "head": "reduce"}


def test_mixed_assignment_is_exact_where_each_flavour_is(float64):
    torch.manual_seed(0)
    model, X = TwoSettings(), torch.randn(4, 5, 3)
    errs = _max_block_error(model, X, MIXED)
    assert max(errs.values()) < RTOL, errs


@pytest.mark.parametrize("approx", [SWAPPED, "expand", "reduce"], ids=["swapped", "expand", "reduce"])
def test_negative_controls_swapped_or_uniform_are_not_exact(approx, float64):
    torch.manual_seed(0)
    model, X = TwoSettings(), torch.randn(4, 5, 3)
    errs = _max_block_error(model, X, approx)
    wrong = {"pos.0", "pos.1"} if approx in (SWAPPED, "reduce") else set()
    wrong |= {"pool.0", "pool.1"} if approx in (SWAPPED, "expand") else set()
    assert all(errs[n] > 1e-3 for n in wrong), errs
    assert errs["head"] < RTOL  # one position: both flavours give the same, exact block


def test_auto_is_exact_on_convolutions_with_per_pixel_loss_and_pooled_tokens(float64):
    torch.manual_seed(1)
    model, X = ConvAndTokens(), torch.randn(3, 2, 4, 4)
    kfac = KFAC(model, "regression", approx="auto")
    assert kfac.flavours == {"conv.0": "expand", "conv.1": "expand", "tokens": "reduce", "head": "reduce"}
    assert kfac.approx is None and kfac.approx_label == "auto"
    errs = _max_block_error(model, X, "auto")
    assert max(errs.values()) < RTOL, errs
    swapped = _max_block_error(model, X, {"conv": "reduce", "*": "expand"}, ["conv.0", "tokens"])
    assert min(swapped.values()) > 1e-3, swapped


def _copies_batch(n=3, S=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, S, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("form", ["auto", "dense"])
@pytest.mark.parametrize("copies", ["reduce", "expand", None])
def test_blocks_equal_the_uniform_flavour_they_were_assigned(form, copies, float64):
    """SmallCNN on augmented copies: each block of a mixed fit equals that block of the uniform fit of its
    flavour (factors and dense block); all-expand / all-reduce mappings equal ``expand`` / ``reduce``."""
    torch.manual_seed(2)
    model = SmallCNN(width=4, hidden=8)
    X, y = _copies_batch()
    kw = dict(copies_approx=copies, factor_form=form)
    fits = {a: KFAC(model, approx=a, **kw).fit((X, y)) for a in ("expand", "reduce")}
    for spec, uniform in (({"*": "expand"}, "expand"), ({"*": "reduce"}, "reduce")):
        k = KFAC(model, approx=spec, **kw).fit((X, y))
        torch.testing.assert_close(k.to_dense(), fits[uniform].to_dense(), rtol=0, atol=0)
    spec = {"features.0": "expand", "features": "reduce", nn.Linear: "expand"}  # longest name wins
    kfac = KFAC(model, approx=spec, **kw)
    want = {"features.0": "expand", "features.3": "reduce", "head.0": "expand", "head.2": "expand"}
    assert kfac.flavours == want and kfac.approx_label == "per-layer"
    mixed = kfac.fit((X, y))
    assert mixed.meta["flavours"] == want
    for b in mixed.blocks:
        ref = next(r for r in fits[want[b.name]].blocks if r.name == b.name)
        torch.testing.assert_close(b.A, ref.A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.B, ref.B, rtol=1e-12, atol=1e-12)
    # features.3 genuinely differs between the flavours (the assignment is not vacuous)
    e, r = (next(b for b in fits[a].blocks if b.name == "features.3") for a in ("expand", "reduce"))
    assert rel_err(e.B, r.B) > 1e-3


def test_auto_on_the_digits_cnn_expands_the_convolutions():
    kfac = KFAC(SmallCNN(), approx="auto", copies_approx="reduce")
    assert kfac.flavours == {"features.0": "expand", "features.3": "expand", "head.0": "reduce", "head.2": "reduce"}
    assert kfac.copies_approx is KFACApprox.REDUCE


def test_mixed_copies_follow_each_block_when_not_given():
    kfac = KFAC(SmallCNN(width=2, hidden=4), approx="auto")
    assert kfac.copies_approx is None
    conv, lin = kfac.covered[0], kfac.covered[-1]
    assert kfac.flavour_of(conv) == ("expand", "expand") and kfac.flavour_of(lin) == ("reduce", "reduce")


@pytest.mark.parametrize("form", ["auto", "dense"])
def test_batchwise_gradient_with_a_mixed_assignment(form):
    model, aug, raw = batchwise_setup()
    prior = torch.tensor(0.7, dtype=torch.float64)
    kw = dict(approx={"c1": "expand", "c2": "expand", "*": "reduce"}, copies_approx="reduce", factor_form=form)
    _, l1, e1, p1 = _one_pass(model, aug, raw, prior, **kw)
    _, _, l2, e2, p2 = _two_pass(model, aug, raw, prior, **kw)
    assert e1.abs().max() > 1e-3
    torch.testing.assert_close(l2, l1, **TOL)
    torch.testing.assert_close(e2, e1, **TOL)
    torch.testing.assert_close(p2, p1, **TOL)


@pytest.mark.parametrize("approx,match", [
    ("sideways", "unknown K-FAC approximation 'sideways'"),
    ({"features.9": "expand", "*": "reduce"}, "no covered layer is named or typed 'features.9'"),
    ({"features.0": "wide"}, "unknown K-FAC approximation for 'features.0' 'wide'"),
    ({"features.0": "expand"}, "no flavour for the layers features.3, head.0, head.2"),
    ({nn.LSTM: "expand", "*": "reduce"}, "no covered layer is named or typed 'LSTM'"),
])
def test_bad_assignments_are_one_line_errors(approx, match):
    with pytest.raises(ValueError, match=match) as err:
        KFAC(SmallCNN(width=2, hidden=4), approx=approx)
    assert "\n" not in str(err.value)


def test_type_names_and_types_select_blocks():
    model = SmallCNN(width=2, hidden=4)
    by_name = KFAC(model, approx={"Conv2d": "expand", "*": "reduce"}).flavours
    by_type = KFAC(model, approx={nn.Conv2d: "expand", nn.Module: "reduce"}).flavours
    assert by_name == by_type == KFAC(model, approx="auto").flavours


def test_kron_block_types_unchanged():
    kron = KFAC(SmallCNN(width=2, hidden=4), approx="auto").fit(_copies_batch())
    assert all(isinstance(b, KronBlock) for b in kron.blocks) and kron.approx == "auto"


# ------------------------------------------------------------------ the tuning config
def test_config_auto_and_per_layer_overrides_compose():
    from marglik.cli_config import check_overrides
    from marglik.tuning.flavour_config import approx_spec

    cfg = check_overrides(["curvature.approx=auto", "+curvature.approx_layers={features.0:reduce,Linear:expand}"])
    assert approx_spec(cfg.curvature) == {"*": "auto", "features.0": "reduce", "Linear": "expand"}
    assert approx_spec(check_overrides(["curvature.approx=expand"]).curvature) == "expand"
    kfac = KFAC(SmallCNN(), approx=approx_spec(cfg.curvature))
    assert kfac.flavours == {"features.0": "reduce", "features.3": "expand", "head.0": "expand", "head.2": "expand"}


@pytest.mark.parametrize("overrides,message", [
    (["curvature.approx=sideways"], "curvature.approx=sideways: not a valid choice; allowed: one of expand, reduce, auto"),
    (["curvature.approx_layers={features.0:reduce}"],
     "curvature.approx_layers={features.0: reduce}: Hydra adds keys to a mapping only with a leading +; allowed: "
     "+curvature.approx_layers={name:value,...}"),
    (["+curvature.approx_layers={features.0:wide}"],
     "curvature.approx_layers={features.0: wide}: wrong type; allowed: a mapping {name: value} with values from "
     "expand, reduce, auto"),
    (["curvature.copies_approx=auto"], "curvature.copies_approx=auto: not a valid choice"),
    (["curvature.approx=auto", "curvature.backend=curvlinops", "hyper.augmentation=false"],
     "curvature.approx=auto: invalid value; allowed: expand or reduce with a laplace-torch backend"),
    (["+curvature.approx_layers={conv1:expand}", "curvature.backend=curvlinops", "hyper.augmentation=false"],
     "curvature.approx_layers={conv1: expand}: invalid value; allowed: {} with a laplace-torch backend"),
])
def test_config_errors_are_one_line(overrides, message):
    from marglik.cli_config import check_overrides
    from marglik.tuning.config import ConfigError

    with pytest.raises(ConfigError) as info:
        check_overrides(overrides)
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_config_unknown_layer_is_an_error_before_training(tmp_path):
    from test_tuning import tiny

    from marglik.tuning import MarglikTuner
    from marglik.tuning.config import ConfigError

    with pytest.raises(ConfigError) as info:
        MarglikTuner(tiny(curvature={"approx_layers": {"features.9": "expand"}}), tmp_path)
    assert str(info.value).startswith(
        "curvature.approx_layers={features.9: expand}: K-FAC approximation: no covered layer is named or typed "
        "'features.9'; allowed: names or type names of covered layers (features.0, features.3, head.0, head.2)"), \
        str(info.value)


def test_tuning_run_with_auto(tmp_path):
    from test_tuning import tiny

    from marglik.tuning import MarglikTuner

    t = MarglikTuner(tiny(curvature={"approx": "auto"}, trainer={"epochs": 2}), tmp_path)
    t.fit()
    la = t.parts.selection.fit()
    assert la.kfac.approx_label == "auto" and la.kfac.flavours["features.0"] == "expand"
    assert la.kfac.flavours["head.0"] == "reduce"


def test_checkpoints_written_before_approx_layers_still_resume():
    from marglik.tuning.config import Config

    old = Config().to_dict()
    del old["curvature"]["approx_layers"]
    assert Config().resume_diff(old) == []  # Config.IMPLIED_BEFORE: a checkpoint without the key had {}
    now = Config.from_dict(curvature={"approx_layers": {"features.0": "expand"}})
    assert any(d.startswith("curvature.approx_layers") for d in now.resume_diff(old))
    saved = now.to_dict()  # a checkpoint written with a mapping resumes under the same mapping
    assert now.resume_diff(saved) == []
