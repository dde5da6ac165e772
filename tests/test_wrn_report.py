"""scripts/run_wrn_marglik.py's report: markdown and figure rendered from the JSON alone (no run
directory read), per-arm means and standard errors over seeds, convergence and time split from the
recorded histories, repository-relative paths."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name):
    if str(SCRIPTS) not in sys.path:  # the scripts import their siblings (benchlib, runner), as when run directly
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _history(rots, changes):
    n = len(rots)
    lml = [None if i % 2 == 0 else -100.0 - i for i in range(n)]
    return {"epoch": list(range(1, n + 1)), "train_acc": [0.1 * i for i in range(n)], "log_marglik": lml,
            "aug_rotation": rots, "log_prior_change_max": changes, "epoch_seconds": [10.0] * n,
            "hyper_seconds": [4.0 if v is not None else 0.0 for v in lml]}


def _record(mod, arm, aug, approx, copies, seed, acc):
    rots = [0.0, 39.0, 39.0, 40.0, 40.0, 41.0, 41.0, 42.0] if aug else [0.0] * 8
    changes = [0.0, 0.5, 0.0, 0.2, 0.0, 0.03, 0.0, 0.02]
    rec = {"name": f"{arm}-s{seed}", "arm": arm, "augmentation": aug, "approx": approx,
           "copies_approx": copies if aug else None, "seed": seed, "run_dir": f"outputs/wrn_marglik/{arm}-s{seed}",
           "summary": {"test_accuracy": acc, "test_nll": 0.3, "log_marglik_per_example": -0.5, "best_epoch": 8,
                       "augmentation": {"rotation": rots[-1]} if aug else {}, "num_params": 2748890},
           "history": _history(rots, changes), "common_log_marglik_per_example": -0.6, "wall_seconds": 80.0}
    return mod.finish(rec)


def test_report_renders_from_json_alone(tmp_path):
    mod = _load("run_wrn_marglik")
    args = mod.parse(["--out", str(tmp_path)])
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "run_root", "from_json", "timing_only")}
    runs = [_record(mod, "aug-reduce-reduce", True, "reduce", "reduce", s, a) for s, a in ((0, 0.90), (1, 0.92))]
    runs += [_record(mod, "none-reduce", False, "reduce", "reduce", 0, 0.85)]
    data = {"setup": {**setup, "num_params": 2748890}, "runs": runs, "wall_seconds": 600.0}
    mod.write_outputs(tmp_path, mod.STEM, data, mod.render, mod.plot)
    md = (tmp_path / "wrn_marglik.md").read_text()
    # the mean and standard error of the two seeds: 0.91 ± 0.01
    assert "| learned rotation | reduce-reduce | 2 | 0.910 ± 0.010 |" in md
    # convergence over the last three updates (epochs 4, 6, 8): rotation 39 before them -> 42 (range 3.0),
    # the priors' largest changes 0.2 + 0.03 + 0.02
    assert runs[0]["convergence"] == pytest.approx({"rotation_movement_deg": 3.0, "log_prior_movement": 0.25})
    assert runs[0]["time_split"] == {"train_seconds": 64.0, "marglik_seconds": 16.0}
    saved = json.loads((tmp_path / "wrn_marglik.json").read_text())
    assert all(not r["run_dir"].startswith("/") for r in saved["runs"])
    # re-rendered from the JSON alone, byte for byte, and the figure exists
    (tmp_path / "wrn_marglik.md").unlink()
    (tmp_path / "wrn_marglik.png").unlink()
    mod.main(["--from-json", "--out", str(tmp_path)])
    assert (tmp_path / "wrn_marglik.md").read_text() == md
    assert (tmp_path / "wrn_marglik.png").stat().st_size > 1000


def test_runner_paths_are_repository_relative(tmp_path):
    runner = _load("runner")
    assert runner.repo_path(SCRIPTS.parent / "outputs" / "x") == "outputs/x"
    assert not runner.repo_path(tmp_path / "y").startswith("/")


def test_reruns_render_beside_the_study_runs(tmp_path):
    """``--rerun`` records: each rerun's own minutes (training + marglik, the common estimate apart)
    with the study's run of the same name in parentheses; the study's rows are unchanged."""
    mod = _load("run_wrn_marglik")
    args = mod.parse(["--out", str(tmp_path)])
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "run_root", "from_json", "timing_only")}
    study = _record(mod, "aug-reduce-reduce", True, "reduce", "reduce", 0, 0.90)
    again = _record(mod, "aug-reduce-reduce", True, "reduce", "reduce", 0, 0.93)
    again["common_seconds"] = 12.0
    again["history"]["epoch_seconds"] = [60.0] * 8  # 480 s in all, 16 s of it marglik
    again["context"] = {"workers": 1, "cpu_count": 2, "load_average_1min_before": 0.5, "load_average_1min_after": 2.0}
    again = mod.finish(again)
    data = {"setup": {**setup, "num_params": 2748890}, "runs": [study], "wall_seconds": 600.0,
            "reruns": {"runs": [again]}}
    md = mod.render(data)
    assert "## Reruns" in md
    # 480 s = 8.0 min; train 464 s, marglik 16 s, common 12 s; accuracy 0.930 beside the study's 0.900
    assert ("| aug-reduce-reduce-s0 | 1 | 0.5 / 2.0 | 8.0 | 464 | 16 | 12 | 0.930 (0.900) | 42.0 (42.0) | 3.00 (3.00) |"
            in md)
    # the study's own row is the study run's
    assert "| aug-reduce-reduce-s0 | 0.900 |" in md
    # a failed rerun is listed, not dropped
    data["reruns"]["runs"].append({"name": "none-reduce-s0", "error": "ValueError: x"})
    assert "| none-reduce-s0 | failed: ValueError: x |" in mod.render(data)


def test_movement_bound_is_the_decayed_adam_step():
    """Adam's largest movement over the last three updates: steps * lr * 0.5 (1 + cos(pi t)) with
    t = (epoch - 1 - burn_in) / (epochs - burn_in), the factor of the update after the epoch's MAP steps."""
    import math

    rec = _load("wrn_records")
    hist = _history([0.0] * 8, [0.0] * 8)  # updates logged at epochs 2, 4, 6, 8
    want = sum(3 * 0.3 * 0.5 * (1 + math.cos(math.pi * (e - 1 - 1) / (8 - 1))) for e in (4, 6, 8))
    assert rec.movement_bound(hist, epochs=8, burn_in=1, hyper_lr=0.3, steps=3) == pytest.approx(want, rel=1e-12)
    assert rec.movement_bound({"epoch": [1], "log_marglik": [None]}, 8, 1, 0.3, 3) is None


def test_lengthened_runs_render_the_shift_from_the_study_run(tmp_path):
    """A lengthened rerun: its movement against Adam's bound, the tensors that moved most, and the
    largest and median |log delta| shift of its reported precisions from the study run's."""
    import math

    mod = _load("run_wrn_marglik")
    args = mod.parse(["--out", str(tmp_path)])
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "run_root", "from_json", "timing_only")}
    study = _record(mod, "aug-reduce-reduce", True, "reduce", "reduce", 0, 0.90)
    study["summary"]["prior_precision_by_name"] = {"conv.weight": 1.0, "block1.0.bias1a.bias": 10.0, "fc.weight": 2.0}
    longer = _record(mod, "aug-reduce-reduce", True, "reduce", "reduce", 0, 0.92)
    longer["summary"]["prior_precision_by_name"] = {"conv.weight": 1.0, "block1.0.bias1a.bias": 10.0 * math.e,
                                                    "fc.weight": 2.0 * math.e ** 0.5}
    longer["history"]["log_prior_change_argmax"] = [None, "fc.weight"] + [None, "block1.0.bias1a.bias"] * 3
    longer["context"] = {"epochs": 8}
    longer = mod.finish(longer)
    seed1 = _record(mod, "aug-reduce-reduce", True, "reduce", "reduce", 1, 0.91)
    seed1["summary"]["prior_precision_by_name"] = {"conv.weight": math.e ** 0.2, "block1.0.bias1a.bias": 1.0,
                                                   "fc.weight": 2.0 * math.e ** 0.6}
    data = {"setup": {**setup, "num_params": 1}, "runs": [study, seed1], "wall_seconds": 1.0,
            "lengthened": {"runs": [longer]}}
    md = mod.render(data)
    assert "## Lengthened runs" in md
    row = next(line for line in md.splitlines() if line.startswith("| aug-reduce-reduce-s0 | 8 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # 4 updates, its accuracy beside the study's, movement 0.2 + 0.03 + 0.02, the scalar moved most
    assert cells[2] == "4" and cells[4] == "0.920 (0.900)" and cells[7] == "0.250" and cells[9] == "block1.0.bias1a.bias"
    # weight tensors shifted by 0 and 0.5 (median 0.25), the Fixup scalar by 1; the seeds' weight
    # tensors span 0.2 and 0.6 in log (median 0.4)
    assert cells[10] == "0.500 (fc.weight) / 0.250 (2 tensors)"
    assert cells[11] == "1.000 (block1.0.bias1a.bias) / 1.000 (1 tensors)" and cells[12] == "0.400"


def test_rerun_merges_into_the_json_as_it_is_when_a_run_finishes(tmp_path, monkeypatch):
    """Two ``--rerun`` processes at once: each merges its records into the JSON on disk at the time it
    finishes, so a record written by the other meanwhile is kept; a lengthened run (more epochs) goes to
    ``lengthened``, a shorter one is refused."""
    mod = _load("run_wrn_marglik")
    reruns = sys.modules["wrn_reruns"]
    args = mod.parse(["--out", str(tmp_path)])
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "run_root", "from_json", "timing_only")}
    study = _record(mod, "none-reduce", False, "reduce", "reduce", 0, 0.85)
    mod.write_outputs(tmp_path, mod.STEM, {"setup": {**setup, "num_params": 1}, "runs": [study], "wall_seconds": 1.0},
                      mod.render, None)
    other = _record(mod, "aug-reduce-reduce", True, "reduce", "reduce", 1, 0.9)
    run_dirs = []

    def fake_pool(todo, workers, on_result, **kw):
        data = json.loads((tmp_path / "wrn_marglik.json").read_text())  # the other process finishes first
        data["reruns"] = {"runs": [other]}
        (tmp_path / "wrn_marglik.json").write_text(json.dumps(data))
        on_result([_record(mod, "none-reduce", False, "reduce", "reduce", 0, 0.86)])
        run_dirs.append(Path(todo[0]["run_root"]).relative_to(tmp_path / "runs").as_posix())

    monkeypatch.setattr(reruns, "run_pool", fake_pool)
    monkeypatch.setattr(reruns, "write_outputs", lambda out, stem, data, render, plot: mod.write_outputs(
        out, stem, data, render, None))
    assert mod.main(["--out", str(tmp_path), "--run-root", str(tmp_path / "runs"), "--rerun", "none-reduce-s0"]) == 0
    saved = json.loads((tmp_path / "wrn_marglik.json").read_text())
    assert [r["name"] for r in saved["reruns"]["runs"]] == ["aug-reduce-reduce-s1", "none-reduce-s0"]
    assert saved["reruns"]["runs"][1]["context"]["epochs"] == 30
    assert mod.main(["--out", str(tmp_path), "--run-root", str(tmp_path / "runs"), "--rerun", "none-reduce-s0",
                     "--epochs", "36"]) == 0
    saved = json.loads((tmp_path / "wrn_marglik.json").read_text())
    assert [r["context"]["epochs"] for r in saved["lengthened"]["runs"]] == [36]
    assert run_dirs == ["reruns", "reruns/e36"]



@pytest.mark.parametrize("argv, message", [
    (["--rerun", "none-reduce-s0", "--epochs", "20"], "--epochs 20 is below the protocol's 30"),
    (["--rerun", "aug-reduce-reduce-s7"], "--rerun: unknown run(s) aug-reduce-reduce-s7; known: "),
    (["--runs", "none-reduce-s0", "nope"], "--runs: unknown run(s) nope; known: "),
])
def test_run_selection_mistakes_are_usage_errors(argv, message, capsys):
    """A wrong run name or a shortened rerun is a one-line usage error (exit 2) before anything runs."""
    mod = _load("run_wrn_marglik")
    with pytest.raises(SystemExit) as exc:
        mod.parse(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
