"""What a run learned, in plain words (the closing lines of ``marglik``), from summary.json alone."""

from __future__ import annotations

from marglik.tuning import explain_run


def _summary(**kw):
    s = {"final_model": "best", "best_epoch": 49, "epochs": 50, "test_accuracy": 0.975, "test_nll": 0.08,
         "log_marglik": -535.2, "log_marglik_per_example": -0.3724, "marglik_updates": 45,
         "augmentation_learned": True, "rotation": 0.0, "translation": 0.0,
         "augmentation": {"translation_x": 0.1, "translation_y": 0.2, "rotation": 0.27, "scale_x": 0.01,
                          "scale_y": 0.0, "shear": 0.0},
         "prior_precision_by_name": {"features.0.weight": 3.2, "features.0.bias": 0.012}}
    s.update(kw)
    return s


def test_default_job_explains_why_it_learned_no_rotation():
    """Upright digits: a learned rotation near 0 is the right answer, and the text says so."""
    text = "\n".join(explain_run(_summary()))
    assert "rotation +-0.27 deg learned, i.e. none: right for these data, which are not warped (data.rotation=0)" in text
    assert "data.rotation=90 shows the range being learned" in text
    assert "the model of epoch 49/50 (best selection value): test accuracy 0.975" in text
    assert "features.0.weight 3.2, features.0.bias 0.012" in text


def test_rotated_data_compare_the_learned_range_with_the_true_one():
    lines = explain_run(_summary(rotation=90.0, augmentation={"rotation": 64.0, "translation_x": 0.0}))
    text = "\n".join(lines)
    assert "rotation +-64 deg learned; the data are warped by +-90 deg (data.rotation, 71% of it)" in text
    assert "right for these data" not in text.split("\n")[1]  # not called 'none' when the data are rotated
    big = _summary(augmentation={"rotation": 30.0})  # upright data, a large range: not called right
    assert "learned although the data are not warped" in "\n".join(explain_run(big))


def test_many_tensors_and_scalar_prior_and_no_update():
    many = {f"layer{i}.weight": float(i + 1) for i in range(20)}
    text = "\n".join(explain_run(_summary(prior_precision_by_name=many)))
    assert "20 tensors from 1 (layer0.weight) to 20 (layer19.weight), median 10.5" in text
    assert "prior precision (one for every weight" in "\n".join(explain_run(_summary(prior_precision_by_name={"all": 2.0})))
    none = explain_run(_summary(marglik_updates=0, log_marglik=None, log_marglik_per_example=None, best_epoch=None))
    assert none[-1].startswith("nothing was learned") and "no log marginal likelihood" in none[0]


def test_cost_line_in_standard_trainings_or_seconds():
    cost = {"seconds": 30.0, "map_seconds": 6.0, "marglik_update_seconds": 22.0, "selection_seconds": 2.0,
            "standard_trainings": {"total": 5.0, "map": 1.0, "marglik_updates": 3.667, "selection": 0.333,
                                   "evaluation": 0.2, "hypersteps": 3.333}}
    last = explain_run(_summary(cost=cost))[-1]
    assert last == ("cost: 5.00 standard trainings of this network (30 s): MAP steps 1.00, marglik updates 3.67 "
                    "(selection values 0.33), evaluation 0.20")
    unmeasured = {**cost, "standard_trainings": {k: None for k in cost["standard_trainings"]}}
    assert explain_run(_summary(cost=unmeasured))[-1] == (
        "cost: 30 s (MAP steps 6 s, marglik updates 22 s of which selection values 2 s)")
    assert not explain_run(_summary())[-1].startswith("cost")  # an older summary without the split
