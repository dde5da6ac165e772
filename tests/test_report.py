"""``marglik-report DIR``: model selection across runs, on a real two-run Hydra multirun
(``python -m marglik -m model=mlp,cnn ...``, made once for the module)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_cli import REPO

from marglik.report import build_report, main, render_markdown

SWEEP = ["-m", "model=mlp,cnn", "data.train_size=64", "trainer.epochs=2", "hyper.burn_in=1", "hyper.n_samples=2",
         "trainer.device=cpu", "trainer.num_threads=1", "logger.mode=disabled",
         "trainer.progress=false"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    return env


@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    """A real sweep: one MLP and one CNN run (each with its default options)."""
    root = tmp_path_factory.mktemp("sweep") / "multirun"
    proc = subprocess.run([sys.executable, "-m", "marglik", *SWEEP, f"hydra.sweep.dir={root}"], cwd=root.parent,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _summaries(root):
    return {p.parent.name: json.loads(p.read_text()) for p in root.rglob("summary.json")}


def test_report_ranks_a_real_multirun_by_log_marglik(multirun, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(multirun, root)
    proc = subprocess.run([sys.executable, "-m", "marglik.report", str(root)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("report.json", "report.md", "report.png"):
        assert (root / name).is_file(), name
    assert (root / "report.png").stat().st_size > 1000
    summaries = _summaries(root)
    assert len(summaries) == 2
    report = json.loads((root / "report.json").read_text())
    (group,) = report["groups"]
    assert report["flags"] == [] and report["n_runs"] == 2 and group["unranked"] == []
    order = sorted(summaries, key=lambda k: -summaries[k]["log_marglik"])
    assert [r["run"] for r in group["ranked"]] == order  # ranked by the selection value
    best = summaries[order[0]]
    assert group["ranked"][0]["test_accuracy"] == best["test_accuracy"]  # test metrics shown beside
    model = "mlp" if "model=mlp" in order[0] else "cnn"
    assert group["ranked"][0]["choice"] == f"model={model}"  # the override that differs between the runs
    assert "model.name" in group["vary"]
    out = proc.stdout
    assert f"best of 2: model={model}, log marginal likelihood" in out
    assert f"rerun with: marglik model={model} data.train_size=64" in out
    # report.md is rendered from report.json alone
    assert (root / "report.md").read_text() == render_markdown(report)


def test_runs_with_other_data_or_estimators_are_flagged_not_ranked_together(multirun, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(multirun, root)
    first = sorted(root.rglob("summary.json"))[0]
    other = root / "rotated"
    shutil.copytree(first.parent, other)
    s = json.loads((other / "summary.json").read_text())
    s.update(rotation=90.0, selection_estimator="subset: fixed 32 of N=64 examples", log_marglik=1e9)
    (other / "summary.json").write_text(json.dumps(s))
    report = build_report(root)
    assert [len(g["ranked"]) for g in report["groups"]] == [2, 1]  # not ranked above the others
    (flag,) = report["flags"]
    assert "rotation: 90.0 vs 0.0" in flag and "selection_estimator: subset" in flag
    assert "Not comparable" in render_markdown(report)


@pytest.mark.parametrize("case", ["missing folder", "no summaries", "bad json", "not a summary"])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, case):
    root = tmp_path / "runs"
    if case != "missing folder":
        (root / "a").mkdir(parents=True)
    if case == "bad json":
        (root / "a" / "summary.json").write_text('{"log_marglik": -1.0,')
    if case == "not a summary":
        (root / "a" / "summary.json").write_text('{"hello": 1}')
    with pytest.raises(SystemExit) as exit_:
        main([str(root)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("marglik-report: error: "), err
    expected = {"missing folder": "no such directory", "no summaries": "no summary.json under",
                "bad json": "is not valid JSON (line 1", "not a summary": "is not a marglik summary (no log_marglik"}
    assert expected[case] in err[0]
    assert not (root / "report.md").exists()


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["marglik-report"] == "marglik.report:main" and scripts["marglik"] == "marglik.cli:main"
