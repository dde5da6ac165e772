"""The run's protocol (issue #28): training copies apart from the fits' copies, the selection value
every k-th update, the cost split and its standard-training unit, and the grid-search baseline's
pieces (split, per-example angles, weight decay as a prior precision)."""

from __future__ import annotations

import math

import pytest
import torch
from test_tuning import _interrupt_after, _strip, tiny

from marglik.tuning import Config, ConfigError, MarglikTuner
from marglik.tuning.build import build_parts
from marglik.tuning.cost import SPLIT, cost_record
from marglik.tuning.grid_search import (
    delta_from_weight_decay,
    pick,
    rotation_augmentation,
    stratified_split,
)
from marglik.tuning.parts import PriorPrecision
from marglik.tuning.reporting import read_history
from marglik.tuning.schedules import selection_due


def test_selection_due_every_kth_update_and_always_the_last():
    cfg = tiny(hyper={"burn_in": 1, "frequency": 2, "selection_every": 2}, trainer={"epochs": 10})
    h, t = cfg.hyper, cfg.trainer
    # updates after epochs 3, 5, 7, 9 (indices 1..4): every 2nd (5, 9) and the last (9)
    assert [e for e in range(1, 11) if selection_due(t, h, e)] == [5, 9]
    cfg = tiny(hyper={"burn_in": 1, "frequency": 1, "selection_every": 3}, trainer={"epochs": 6})
    assert [e for e in range(1, 7) if selection_due(cfg.trainer, cfg.hyper, e)] == [4, 6]  # index 3, last
    cfg = tiny(hyper={"burn_in": 1, "selection_every": 1}, trainer={"epochs": 4})
    assert [e for e in range(1, 5) if selection_due(cfg.trainer, cfg.hyper, e)] == [2, 3, 4]


@pytest.mark.parametrize("key", ["hyper.train_samples", "hyper.selection_every"])
def test_new_options_are_validated_in_one_line(key):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:
        Config.from_dict({section: {name: 0}})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{key}=0") and ">= 1" in msg


def test_map_steps_see_train_samples_copies_and_fits_see_n_samples():
    parts = build_parts(tiny(hyper={"n_samples": 3, "train_samples": 1, "marglik_batches": None}))
    assert parts.augmenter.aug_train.eta is parts.augmenter.eta  # the ranges the hypersteps learn
    assert parts.augmenter.aug_train.n_samples == 1 and parts.augmenter.aug.n_samples == 3
    seen = []
    hook = parts.model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[:2])))
    parts.map_step.run_epoch()
    assert seen and all(s[1] == 1 for s in seen)  # (n, 1, C, H, W): one copy per MAP step
    seen.clear()
    parts.hyper_step.run(1)
    assert seen and all(s[1] == 3 for s in seen)  # the fit averages over S = 3 copies
    hook.remove()
    # negative control: without train_samples the MAP steps use the fits' S
    parts = build_parts(tiny(hyper={"n_samples": 3}))
    assert parts.augmenter.aug_train is parts.augmenter.aug


def test_selection_every_scores_the_due_updates_and_resumes_bit_exact(tmp_path):
    cfg = tiny(hyper={"selection_every": 2, "train_samples": 1, "n_samples": 2},
               curvature={"fisher_type": "mc-root"}, trainer={"epochs": 5})
    ref = MarglikTuner(cfg, tmp_path / "ref")
    summary = ref.fit()
    hist = read_history(tmp_path / "ref" / "history.csv")
    # updates after epochs 2..5 (indices 1..4): scored after 3 and 5 (every 2nd; 5 is also the last)
    assert [r["epoch"] for r in hist if r["log_marglik"] is not None] == [3, 5]
    assert all(r["hyperstep_log_marglik"] is not None for r in hist[1:])
    assert summary["marglik_updates"] == 4 and summary["best_epoch"] in (3, 5)
    assert all(r["selection_seconds"] == 0 for r in hist if r["log_marglik"] is None)
    assert all(r["selection_seconds"] > 0 for r in hist if r["log_marglik"] is not None)

    with pytest.raises(KeyboardInterrupt):
        MarglikTuner(cfg, tmp_path / "run", callbacks=[_interrupt_after(3)]).fit()
    resumed = MarglikTuner(cfg, tmp_path / "run")
    assert resumed.epoch == 3
    out = resumed.fit()
    for (n, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(ref.log_prior, resumed.log_prior) and torch.equal(ref.aug.eta, resumed.aug.eta)
    assert _strip(ref.history) == _strip(resumed.history)
    assert out["best_epoch"] == summary["best_epoch"] and out["test_nll"] == summary["test_nll"]
    assert out["cost"]["standard_training_seconds"] > 0  # measured by the first segment, kept in its checkpoint


def test_cost_reference_changes_nothing_and_the_split_adds_up(tmp_path):
    cfg = tiny(trainer={"epochs": 3})
    with_ref = MarglikTuner(cfg, tmp_path / "a")
    s = with_ref.fit()
    without = MarglikTuner(cfg.replace(trainer={"cost_reference": False}), tmp_path / "b")
    s0 = without.fit()
    # timing one standard epoch on a copy must not touch the run: the same numbers, bit for bit
    assert _strip(with_ref.history) == _strip(without.history)
    for (n, a), (_, b) in zip(with_ref.model.state_dict().items(), without.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert s0["cost"]["standard_training_seconds"] is None and s0["cost"]["standard_trainings"]["total"] is None
    c = s["cost"]
    hist = read_history(tmp_path / "a" / "history.csv")
    for key in SPLIT:
        assert c[key] == pytest.approx(sum(r[key] for r in hist))
    assert c["marglik_update_seconds"] == pytest.approx(sum(r["hyper_seconds"] for r in hist))
    assert sum(c[k] for k in SPLIT) <= c["seconds"] * 1.001  # the parts of the epochs, within the run's time
    assert sum(c["hyperstep_phase_seconds"].values()) <= c["hyperstep_seconds"] * 1.001
    assert c["hyperstep_phase_seconds"]["fit"] > 0 and c["hyperstep_phase_seconds"]["gradient"] > 0
    std = c["standard_training_seconds"]
    assert std > 0 and c["standard_trainings"]["total"] == pytest.approx(c["seconds"] / std)
    assert c["standard_trainings"]["map"] == pytest.approx(c["map_seconds"] / std)


def test_cost_record_closed_form():
    hist = [{"map_seconds": 1.0, "hyperstep_seconds": 0.0, "selection_seconds": 0.0, "eval_seconds": 0.5},
            {"map_seconds": 1.0, "hyperstep_seconds": 3.0, "selection_seconds": 2.0, "eval_seconds": 0.5},
            {"epoch": 3}]  # a row of an older run without the split counts 0
    c = cost_record(hist, {"fit": 2.0, "log_marglik": 0.5, "gradient": 0.5}, epochs=4, standard_epoch=0.25,
                    total_seconds=9.0)
    assert c["map_seconds"] == 2.0 and c["marglik_update_seconds"] == 5.0 and c["standard_training_seconds"] == 1.0
    assert c["standard_trainings"] == {"total": 9.0, "map": 2.0, "hypersteps": 3.0, "selection": 2.0,
                                       "marglik_updates": 5.0, "evaluation": 1.0}


# --------------------------------------------------------------------------- the grid baseline
def test_stratified_split_is_fixed_stratified_and_a_partition():
    y = torch.arange(10).repeat_interleave(torch.tensor([10, 20, 30, 40, 50, 10, 20, 30, 40, 50]))
    tr, va = stratified_split(y, 0.2, seed=0)
    tr2, va2 = stratified_split(y, 0.2, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)  # fixed
    assert not torch.equal(va, stratified_split(y, 0.2, seed=1)[1])  # the seed matters
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(len(y)))  # a partition
    counts = torch.bincount(y[va], minlength=10)
    assert counts.tolist() == [2, 4, 6, 8, 10, 2, 4, 6, 8, 10]  # 20 % of every class
    with pytest.raises(ValueError):
        stratified_split(y, 1.0)


def test_rotation_augmentation_draws_one_angle_per_example():
    aug = rotation_augmentation(90.0)
    assert math.degrees(aug.eta.item()) == pytest.approx(90.0) and not aug.eta.requires_grad
    eps = aug.sample_eps(64, torch.Generator().manual_seed(0))
    assert eps.shape == (64, 1, 1) and eps.unique().numel() == 64  # one angle per example, not per batch
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 1, :] = 1.0  # the same horizontal bar in every image
    out = aug(x, generator=torch.Generator().manual_seed(0))[:, 0]
    assert out.shape == (64, 1, 8, 8)
    distinct = {tuple(o.flatten().round(decimals=4).tolist()) for o in out}
    assert len(distinct) > 60  # each example rotated by its own angle
    same = rotation_augmentation(0.0)(x, generator=torch.Generator().manual_seed(0))[:, 0]
    assert torch.allclose(same, x, atol=1e-6)  # range 0: no warp


def test_weight_decay_maps_to_prior_precision_delta_equals_wd_times_n():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3).double()
    wd, n = 3e-3, 1437
    params = list(net.named_parameters())
    weight_decay_term = 0.5 * wd * sum((p * p).sum() for p in net.parameters())  # of mean NLL + wd ||theta||^2 / 2
    prior = PriorPrecision(params, "scalar", delta_from_weight_decay(wd, n), torch.device("cpu"))
    assert delta_from_weight_decay(wd, n) == pytest.approx(wd * n)
    assert prior.term(n).item() == pytest.approx(weight_decay_term.item(), rel=1e-6)  # float32 log round-trip
    wrong = PriorPrecision(params, "scalar", wd, torch.device("cpu")).term(n)  # negative control: delta = wd
    assert wrong.item() != pytest.approx(weight_decay_term.item(), rel=1e-2)
    with pytest.raises(ValueError):
        delta_from_weight_decay(0.0, n)


def test_pick_lowest_nll_or_highest_accuracy():
    cells = [{"nll": 0.3, "acc": 0.9}, {"nll": 0.2, "acc": 0.85}, {"nll": 0.25, "acc": 0.95}]
    assert pick(cells, "nll") is cells[1] and pick(cells, "acc") is cells[2]


def test_prior_only_steps_reuse_the_fit_and_leave_eta():
    # augmentation off: the K steps already reuse one fit, so K=1 + P=1 is K=2, bit for bit
    a = build_parts(tiny(hyper={"augmentation": False, "steps": 2, "prior_steps": 0}))
    b = build_parts(tiny(hyper={"augmentation": False, "steps": 1, "prior_steps": 1}))
    for p in (a, b):
        p.map_step.run_epoch()
        p.hyper_step.run(1)
    assert torch.equal(a.prior.log_prior, b.prior.log_prior) and a.hyper_step.n_fits == b.hyper_step.n_fits == 1
    # augmentation on: the prior-only steps fit nothing and leave eta where the fitted step put it
    c = build_parts(tiny(hyper={"steps": 1, "prior_steps": 0}))
    d = build_parts(tiny(hyper={"steps": 1, "prior_steps": 2}))
    for p in (c, d):
        p.map_step.run_epoch()
        p.hyper_step.run(1)
    assert torch.equal(c.augmenter.eta, d.augmenter.eta) and c.hyper_step.n_fits == d.hyper_step.n_fits == 1
    assert len(d.hyper_step.cached_step_seconds) == 2
    assert not torch.equal(c.prior.log_prior, d.prior.log_prior)  # negative control: the prior did move
    with pytest.raises(ConfigError):
        Config.from_dict({"hyper": {"prior_steps": -1}})


def test_the_default_protocol_is_the_documented_one():
    """The shipped defaults are the protocol chosen from results/marglik_vs_grid.md (HyperConfig's docstring)."""
    c = Config()
    h = c.hyper
    assert (h.train_samples, h.n_samples, h.steps, h.prior_steps, h.frequency, h.burn_in) == (1, 8, 1, 0, 1, 5)
    assert (h.marglik_batches, h.marglik_batch_size, h.schedule, h.lr, h.aug_lr) == (2, 128, "cosine", 0.1, 0.2)
    assert (h.selection, h.selection_size, h.selection_every) == ("subset", 512, 5)
    assert (c.curvature.fisher_type, c.curvature.approx, c.curvature.copies_approx) == ("mc-root", "reduce", "reduce")
