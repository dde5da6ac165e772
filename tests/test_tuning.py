"""The marginal-likelihood tuning loop end to end on a tiny digits configuration (seconds each)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from marglik.tuning import Config, MarglikTuner, NonFiniteError, tune
from marglik.tuning.cost import TIMING_COLUMNS
from marglik.tuning.reporting import read_history
from marglik.tuning.wandb_logger import WandbLogger, default_group

SUMMARY_KEYS = {
    "test_accuracy", "test_nll", "log_marglik", "prior_precision", "augmentation", "approx", "seconds",
    "seconds_per_marglik_step",
}
TIMING = set(TIMING_COLUMNS)


def tiny(**sections) -> Config:
    """~50 digits, a few epochs, learned augmentation (S=2), marglik on all data every epoch, with the
    protocol these tests were written for (type-2 GGN, the MAP steps on the fits' copies, constant hyper
    lrs, the whole-set selection value after every update; the shipped default protocol is tested in
    tests/test_protocol.py)."""
    base = dict(
        data={"name": "digits", "train_size": 48, "rotation": 30.0},
        model={"name": "cnn", "width": 4, "hidden": 16},
        curvature={"fisher_type": "type-2"},
        hyper={"burn_in": 1, "frequency": 1, "steps": 2, "n_samples": 2, "lr": 0.1, "aug_lr": 0.05,
               "marglik_batches": None, "train_samples": None, "schedule": "constant", "selection": "full",
               "selection_every": 1},
        trainer={"epochs": 4, "batch_size": 16, "lr": 0.01, "progress": False, "eval_batch_size": 512,
                 "num_threads": 1},  # tiny ops: one thread is fastest and immune to oversubscription
        logger={"mode": "disabled"},
    )
    for key, val in sections.items():
        base[key] = {**base.get(key, {}), **val}
    return Config.from_dict(**base)


def _strip(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def test_end_to_end_outputs_and_marglik_rises(tmp_path):
    cfg = tiny(trainer={"epochs": 6})
    s = tune(cfg, tmp_path)
    assert SUMMARY_KEYS <= set(s)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert isinstance(on_disk["prior_precision"], list) and len(on_disk["prior_precision"]) == 8  # layerwise
    names = [n for n, _ in MarglikTuner(cfg, tmp_path / "names").model.named_parameters()]
    assert list(on_disk["prior_precision_by_name"]) == names and names[0] == "features.0.weight"
    assert list(on_disk["prior_precision_by_name"].values()) == on_disk["prior_precision"]
    assert on_disk["segments"] == 1 and on_disk["seconds_this_segment"] == on_disk["seconds"]
    assert set(on_disk["augmentation"]) == {"translation_x", "translation_y", "rotation", "scale_x", "scale_y", "shear"}
    assert on_disk["augmentation"]["rotation"] > 0  # eta moved (degrees)
    assert on_disk["approx"] == "reduce"
    assert 0 <= on_disk["test_accuracy"] <= 1 and math.isfinite(on_disk["test_nll"])
    assert on_disk["seconds"] > 0 and on_disk["seconds_per_marglik_step"] > 0
    assert on_disk["n_laplace_fits"] == 5 * 2  # epochs 2..6, K=2, refit per step (augmentation on)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    hist = read_history(tmp_path / "history.csv")
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4, 5, 6]
    assert hist[0]["log_marglik"] is None  # burn-in
    lml = [r["log_marglik"] for r in hist if r["log_marglik"] is not None]
    assert len(lml) == 5 and all(math.isfinite(v) for v in lml)
    assert lml[-1] > lml[0]  # the marginal likelihood rises over training
    assert s["log_marglik"] == max(lml)  # the reported model is the best-marglik checkpoint
    assert hist[-1]["aug_rotation"] > 0 and hist[-1]["test_acc"] is not None


def test_no_augmentation_scalar_prior(tmp_path):
    cfg = tiny(hyper={"augmentation": False, "prior_structure": "scalar", "steps": 5},
               curvature={"approx": "expand"}, trainer={"epochs": 3, "final_model": "last"})
    s = tune(cfg, tmp_path)
    assert len(s["prior_precision"]) == 1 and s["prior_precision"][0] != 1.0
    assert s["prior_precision_by_name"] == {"all": s["prior_precision"][0]}
    assert all(v == 0 for v in s["augmentation"].values())
    assert s["approx"] == "expand" and s["final_model"] == "last"
    # one Laplace fit per update serves all K steps when eta is not learned
    assert s["n_laplace_fits"] == 2 and s["n_hypersteps"] == 10


def test_map_step_does_not_update_eta(tmp_path):
    cfg = tiny(trainer={"epochs": 2}, hyper={"burn_in": 5})  # no marglik update within the run
    t = MarglikTuner(cfg, tmp_path)
    with torch.no_grad():
        t.aug.eta.fill_(0.3)
    t.fit()
    torch.testing.assert_close(t.aug.eta.detach(), torch.full((6,), 0.3))


def _interrupt_after(k):
    def cb(tuner, row):
        if tuner.epoch == k:
            raise KeyboardInterrupt

    return cb


def test_resume_equals_uninterrupted(tmp_path):
    cfg = tiny(trainer={"epochs": 4})
    ref = MarglikTuner(cfg, tmp_path / "ref")
    ref_summary = ref.fit()

    with pytest.raises(KeyboardInterrupt):
        MarglikTuner(cfg, tmp_path / "run", callbacks=[_interrupt_after(2)]).fit()
    part = read_history(tmp_path / "run" / "history.csv")
    assert len(part) == 2

    resumed = MarglikTuner(cfg, tmp_path / "run")  # trainer.resume=auto finds checkpoints/last.ckpt
    assert resumed.resumed_from is not None and resumed.epoch == 2
    summary = resumed.fit()

    for (n, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(ref.log_prior, resumed.log_prior)
    assert torch.equal(ref.aug.eta, resumed.aug.eta)
    assert _strip(ref.history) == _strip(resumed.history)
    for key in ("test_accuracy", "test_nll", "log_marglik", "prior_precision", "augmentation", "best_epoch"):
        assert summary[key] == ref_summary[key], key
    # the optimizers' states and RNG streams continued too: identical next draws
    assert torch.equal(ref.generators["data"].get_state(), resumed.generators["data"].get_state())
    assert torch.equal(ref.generators["aug"].get_state(), resumed.generators["aug"].get_state())


def test_resume_from_explicit_path_and_config_mismatch(tmp_path):
    cfg = tiny(trainer={"epochs": 2})
    tune(cfg, tmp_path / "a")
    done = MarglikTuner(cfg.replace(trainer={"resume": str(tmp_path / "a")}), tmp_path / "b")
    assert done.epoch == 2  # explicit run dir
    with pytest.raises(ValueError, match="hyper.lr"):
        MarglikTuner(cfg.replace(hyper={"lr": 0.5}), tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        MarglikTuner(cfg.replace(trainer={"resume": str(tmp_path / "nope")}), tmp_path / "c")
    fresh = MarglikTuner(cfg.replace(trainer={"resume": "never"}), tmp_path / "a")
    assert fresh.epoch == 0


def test_nonfinite_loss_rolls_back(tmp_path):
    t = MarglikTuner(tiny(trainer={"epochs": 3}), tmp_path)
    orig = t.parts.map_step.loss  # the MAP step part calls its own loss
    calls = {"n": 0}

    def flaky(x, y):
        calls["n"] += 1
        loss, nll, out = orig(x, y)
        if calls["n"] == 5:  # second batch of epoch 2
            return loss * float("nan"), nll, out
        return loss, nll, out

    t.parts.map_step.loss = flaky
    s = t.fit()
    assert s["rollbacks"] == 1 and len(s["rollback_events"]) == 1
    ev = s["rollback_events"][0]
    assert ev["kind"] == "loss" and ev["epoch"] == 2
    assert t.lr_scale == 0.5
    assert [r["epoch"] for r in t.history] == [1, 2, 3]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert t.history[-1]["rollbacks"] == 1


def test_nonfinite_marglik_rolls_back(tmp_path):
    t = MarglikTuner(tiny(trainer={"epochs": 3}), tmp_path)
    orig = t.parts.laplace.log_marglik  # shared by the hypersteps and the selection value
    calls = {"n": 0}

    def flaky(la):
        calls["n"] += 1
        value = orig(la)
        return value * float("nan") if calls["n"] == 2 else value

    t.parts.laplace.log_marglik = flaky
    s = t.fit()
    assert [e["kind"] for e in s["rollback_events"]] == ["marglik"] and s["rollbacks"] == 1
    assert t.hyper_lr_scale == 0.5
    assert all(math.isfinite(r["log_marglik"]) for r in t.history if r["log_marglik"] is not None)
    assert json.loads((tmp_path / "summary.json").read_text())["rollback_events"][0]["kind"] == "marglik"


def test_gives_up_after_max_rollbacks(tmp_path):
    t = MarglikTuner(tiny(trainer={"epochs": 3, "max_rollbacks": 2}), tmp_path)
    t.parts.laplace.log_marglik = lambda la: torch.tensor(float("inf"))
    with pytest.raises(NonFiniteError, match="after 2 rollbacks"):
        t.fit()
    assert len(t.events) == 2


def test_config_validation():
    with pytest.raises(ValueError, match="hyper.lrr=1.0: unknown key"):
        Config.from_dict(hyper={"lrr": 1.0})
    with pytest.raises(ValueError, match="curvature.approx"):
        Config.from_dict(curvature={"approx": "full"})
    with pytest.raises(ValueError, match="curvature.copies_approx"):
        Config.from_dict(curvature={"copies_approx": "mean"})
    with pytest.raises(ValueError, match="prior_structure"):
        Config.from_dict(hyper={"prior_structure": "diag"})
    cfg = Config.from_dict(model={"name": "mlp", "hidden": [8]})
    assert cfg.model.kwargs == {"hidden": [8], "activation": "tanh"}  # completed from the mlp schema


def test_wandb_never_breaks_a_run(tmp_path, monkeypatch):
    cfg = tiny().to_dict()
    cfg["logger"]["mode"] = "offline"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.warns(UserWarning, match="wandb unavailable"):
        lg = WandbLogger(cfg, str(tmp_path))
    lg.log({"a": 1.0}, step=1)
    lg.summary({"b": 2.0, "augmentation": {"rotation": 3.0}})
    lg.finish()

    class Broken:
        Settings = dict

        @staticmethod
        def init(**kw):
            raise RuntimeError("no network")

    monkeypatch.setitem(sys.modules, "wandb", Broken)
    with pytest.warns(UserWarning, match="wandb.init failed"):
        lg = WandbLogger(cfg, str(tmp_path))
    assert lg.run is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert WandbLogger(cfg, str(tmp_path)).mode == "disabled"


def test_wandb_group_ignores_approx_and_seed():
    a = tiny().to_dict()
    b = tiny(curvature={"approx": "expand"}, trainer={"seed": 3}).to_dict()
    assert default_group(a) == default_group(b) == "digits-rot30-n48-cnn-aug2-layerwise"


def _json_type(v):
    return type(v).__name__


def test_summary_types_are_the_same_in_every_run(tmp_path):
    """A tuning run with a rollback and a run without tuning write the same keys with the same JSON
    types (null only where RunSummary says Optional); ``rollbacks`` is an int in both."""
    import typing

    from marglik.tuning.reporting import RunSummary

    t = MarglikTuner(tiny(trainer={"epochs": 3}), tmp_path / "tuned")
    orig, calls = t.parts.map_step.loss, {"n": 0}

    def flaky(x, y):
        calls["n"] += 1
        loss, nll, out = orig(x, y)
        return (loss * float("nan"), nll, out) if calls["n"] == 5 else (loss, nll, out)

    t.parts.map_step.loss = flaky
    t.fit()
    tune(tiny(trainer={"epochs": 1}, hyper={"burn_in": 3}), tmp_path / "untuned")
    a = json.loads((tmp_path / "tuned" / "summary.json").read_text())
    b = json.loads((tmp_path / "untuned" / "summary.json").read_text())
    assert list(a) == list(b)
    optional = {k for k, tp in typing.get_type_hints(RunSummary).items()
                if type(None) in typing.get_args(tp)}
    for key in a:
        if a[key] is None or b[key] is None:
            assert key in optional, key
        else:
            assert _json_type(a[key]) == _json_type(b[key]), (key, a[key], b[key])
    assert a["rollbacks"] == 1 and b["rollbacks"] == 0 and len(a["rollback_events"]) == 1
    assert a["marglik_updates"] == 2 and b["marglik_updates"] == 0 and b["log_marglik"] is None
    assert "no hyperparameter tuning" in b["warnings"][0] and not any("no hyperparameter" in w for w in a["warnings"])
    assert a["warnings"][0].startswith("1 rollback after non-finite loss values (first in epoch 2")  # said, not hidden
    assert not any("rollback" in w for w in b["warnings"])
    assert isinstance(a["rotation"], float) and isinstance(a["seconds"], float)


def test_summary_record_rejects_drift():
    import typing

    from marglik.tuning.reporting import RunSummary, summary_record

    blank = {float: 0.0, int: 0, str: "", bool: False}
    good = {}
    for name, tp in typing.get_type_hints(RunSummary).items():
        origin = typing.get_origin(tp)
        good[name] = (None if origin is typing.Union else [] if origin is list else {} if origin is dict
                      else blank[tp])
    rec = summary_record({**good, "seconds": 3, "log_marglik": float("nan")})
    assert rec["seconds"] == 3.0 and type(rec["seconds"]) is float and rec["log_marglik"] is None
    with pytest.raises(TypeError, match="unknown \\['world'\\]"):
        summary_record({**good, "world": 1})
    with pytest.raises(TypeError, match="'epochs'"):
        summary_record({**good, "epochs": None})
    with pytest.raises(TypeError, match="'rollbacks'"):
        summary_record({**good, "rollbacks": [{"kind": "loss"}]})


def test_curves_mark_burn_in_reported_epoch_and_prior_precision():
    from matplotlib.lines import Line2D
    from matplotlib.patches import Polygon, Rectangle

    from marglik.tuning.reporting import make_figure

    hist = [{"epoch": e, "train_acc": 0.1 * e, "test_acc": 0.1 * e, "prior_prec_mean": float(e),
             "prior_prec_min": 0.5 * e, "prior_prec_max": 2.0 * e, "aug_rotation": float(e),
             "log_marglik_per_example": None if e <= 2 else -1.0 / e,
             "hyperstep_log_marglik_per_example": None if e <= 2 else -1.1 / e} for e in range(1, 6)]

    def vlines(ax, x):
        return [ln for ln in ax.get_lines() if isinstance(ln, Line2D) and list(ln.get_xdata()) == [x, x]]

    def spans(ax):
        return [p for p in ax.patches if isinstance(p, (Polygon, Rectangle))]

    fig = make_figure(hist, burn_in=2, reported_epoch=4)
    titles = [ax.get_title() for ax in fig.axes]
    prior = fig.axes[titles.index("prior precision")]
    assert list(prior.get_lines()[0].get_ydata()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    for ax in fig.axes:
        assert len(vlines(ax, 4)) == 1, ax.get_title()
        (span,) = spans(ax)
        xs = span.get_xy()[:, 0] if isinstance(span, Polygon) else [span.get_x(), span.get_x() + span.get_width()]
        assert min(xs) == 0.5 and max(xs) == 2.5  # epochs 1..2 shaded
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "burn-in" in labels and "reported (best selection value)" in labels
    assert {"selection value / N", "hyperstep estimate / N"} <= set(labels)
    plain = make_figure(hist)  # negative control: no marks asked for, none drawn
    assert not any(vlines(ax, 4) or spans(ax) for ax in plain.axes)
