"""The fixed selection estimator (``hyper.selection``): the best epoch and the reported log marglik
come from a value that changes only when the weights or the hyperparameters do."""

from __future__ import annotations

import math

import pytest
import torch
from test_tuning import _interrupt_after, _strip, tiny

from marglik import KronLaplace
from marglik.tuning import MarglikTuner, tune
from marglik.tuning.estimator import SelectionSet
from marglik.tuning.reporting import read_history


def _frozen(tuner: MarglikTuner) -> MarglikTuner:
    """No optimizer step changes anything: weights and hyperparameters stay at their initial values."""
    tuner.map_opt.step = lambda *a, **k: None
    tuner.hyper_opt.step = lambda *a, **k: None
    return tuner


@pytest.mark.parametrize("selection", [{"selection": "full"}, {"selection": "subset", "selection_size": 20}])
def test_selection_value_fixed_while_hyperstep_estimate_moves(tmp_path, selection):
    """Frozen model and hyperparameters: the selection value is the same every epoch; the stochastic
    hyperstep estimate (1 random batch of 16, fresh augmentation noise) is not (negative control)."""
    cfg = tiny(trainer={"epochs": 4}, hyper={"marglik_batches": 1, "marglik_batch_size": 16, **selection})
    t = _frozen(MarglikTuner(cfg, tmp_path))
    s = t.fit()
    sel = [r["log_marglik"] for r in t.history if r["log_marglik"] is not None]
    est = [r["hyperstep_log_marglik"] for r in t.history if r["hyperstep_log_marglik"] is not None]
    assert len(sel) == len(est) == 3
    assert max(sel) - min(sel) <= 1e-6 * abs(sel[0])  # fixed estimator
    assert max(est) - min(est) > 1e-3 * abs(est[0])  # the stochastic estimate swings
    assert s["best_epoch"] == 2 and s["log_marglik"] == sel[0]  # ties keep the first
    assert s["selection_estimator"].startswith(selection["selection"])


def test_selected_epoch_is_argmax_of_selection_values(tmp_path):
    s = tune(tiny(trainer={"epochs": 5}, hyper={"marglik_batches": 1, "marglik_batch_size": 16}), tmp_path)
    hist = read_history(tmp_path / "history.csv")
    rows = [r for r in hist if r["log_marglik"] is not None]
    best = max(rows, key=lambda r: r["log_marglik"])
    assert s["best_epoch"] == best["epoch"] and s["log_marglik"] == pytest.approx(best["log_marglik"], rel=1e-12)
    assert all(r["hyperstep_log_marglik"] is not None for r in rows)  # both columns, distinct names
    assert any(r["hyperstep_log_marglik"] != r["log_marglik"] for r in rows)
    assert s["last"]["log_marglik"] == pytest.approx(rows[-1]["log_marglik"], rel=1e-12)
    assert s["seconds_per_selection"] > 0 and s["separate_bias"] is False


def test_selection_value_is_the_whole_set_laplace_log_marglik(tmp_path):
    """Independent reference: a KronLaplace fitted on all N examples at the final weights and prior."""
    cfg = tiny(trainer={"epochs": 3, "final_model": "last"},
               hyper={"augmentation": False, "marglik_batches": 1}, curvature={"separate_bias": True})
    t = MarglikTuner(cfg, tmp_path)
    s = t.fit()
    la = KronLaplace(t.model, "classification", approx="reduce", prior_precision=t.prior_precision().detach(),
                     separate_bias=True)
    t.model.eval()
    la.fit([(t.X, t.y)])
    ref = la.log_marginal_likelihood().item()
    assert t.history[-1]["log_marglik"] == pytest.approx(ref, rel=1e-5)
    assert s["log_marglik"] == pytest.approx(ref, rel=1e-5) and s["separate_bias"] is True


def test_subset_drawn_once_seeded():
    cfg = tiny(hyper={"selection": "subset", "selection_size": 20})
    a, b = SelectionSet.from_config(cfg, 48), SelectionSet.from_config(cfg, 48)
    idx = a.indices()
    assert torch.equal(idx, a.indices()) and torch.equal(idx, b.indices())  # same every epoch / after resume
    assert len(idx) == len(set(idx.tolist())) == 20 and torch.equal(idx, idx.sort().values)
    other = SelectionSet.from_config(tiny(hyper={"selection": "subset", "selection_size": 20},
                                          trainer={"seed": 1}), 48)
    assert not torch.equal(idx, other.indices())  # seeded by trainer.seed
    big = SelectionSet.from_config(tiny(hyper={"selection": "subset", "selection_size": 500}), 48)
    assert big.size == 48 and torch.equal(big.indices(), torch.arange(48))
    assert a.num_data(20, sharded=False) == 48 and big.num_data(48, sharded=False) is None


def test_resume_with_subset_selection_is_exact(tmp_path):
    cfg = tiny(trainer={"epochs": 4}, hyper={"selection": "subset", "selection_size": 24, "marglik_batches": 1})
    ref = MarglikTuner(cfg, tmp_path / "ref")
    ref.fit()
    with pytest.raises(KeyboardInterrupt):
        MarglikTuner(cfg, tmp_path / "run", callbacks=[_interrupt_after(2)]).fit()
    resumed = MarglikTuner(cfg, tmp_path / "run")
    assert resumed.epoch == 2
    resumed.fit()
    assert _strip(ref.history) == _strip(resumed.history)
    assert all(math.isfinite(r["log_marglik"]) for r in resumed.history if r["log_marglik"] is not None)
