"""scripts/run_wrn_marglik.py's writer: it rewrites the "runs" key and the "## Tuning runs"
section and keeps what other scripts add to the same files (the cost-scaling benchmark)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_wrn_marglik.py"


def _load():
    if str(SCRIPT.parent) not in sys.path:  # the script imports its sibling benchlib, as when run directly
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("run_wrn_marglik", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(approx, copies, aug, acc):
    return {"name": f"{approx}-{copies}-{aug}", "approx": approx, "copies_approx": copies if aug else None,
            "augmentation": aug, "test_accuracy": acc, "test_nll": 1.0, "log_marglik": -100.0,
            "log_marglik_per_example": -1.0, "rotation_deg": 12.0 if aug else None, "seconds_per_epoch": 3.0,
            "seconds_per_marglik_step": 2.0 if copies == "reduce" else 4.0, "n_hypersteps": 2, "seconds": 10.0,
            "rotation_history": [0.0, 6.0, 12.0], "run_dir": "x"}


def test_rewrite_keeps_cost_scaling(tmp_path):
    mod = _load()
    setup = dict(rotation=90.0, train_size=8, epochs=3, lr=1e-3, batch_size=4, burn_in=1, steps=1, aug_lr=0.2,
                 n_samples=2, marglik_batches=1, marglik_batch_size=4, workers=1)
    (tmp_path / "wrn_marglik.json").write_text(json.dumps({"runs": [{"old": 1}], "cost_scaling": {"rows": [1, 2]}}))
    (tmp_path / "wrn_marglik.md").write_text(
        "# WRN\n\n## Tuning runs\n\nold table\n\n## Cost scaling\n\nscaling table | 1 |\n")
    runs = [_run("expand", "reduce", True, 0.5), _run("reduce", "reduce", True, 0.6), _run("expand", None, False, 0.4)]
    mod.write_outputs({"setup": setup, "wall_seconds": 60.0, "runs": runs}, tmp_path)
    data = json.loads((tmp_path / "wrn_marglik.json").read_text())
    assert data["cost_scaling"] == {"rows": [1, 2]} and len(data["runs"]) == 3
    assert {"approx", "copies_approx", "augmentation", "test_accuracy", "test_nll", "log_marglik", "rotation_deg",
            "seconds_per_epoch", "seconds_per_marglik_step"} <= set(data["runs"][0])
    md = (tmp_path / "wrn_marglik.md").read_text()
    assert "old table" not in md and "## Cost scaling\n\nscaling table | 1 |" in md
    assert md.index("## Tuning runs") < md.index("## Cost scaling")
    assert "| learned rotation | expand-reduce | 0.5000 |" in md
    assert (tmp_path / "wrn_marglik.png").is_file()
    # a second rewrite is stable (no duplicated sections)
    mod.write_outputs(json.loads((tmp_path / "wrn_marglik.json").read_text()), tmp_path)
    md2 = (tmp_path / "wrn_marglik.md").read_text()
    assert md2.count("## Tuning runs") == 1 and md2.count("## Cost scaling") == 1


def test_fresh_files(tmp_path):
    mod = _load()
    setup = dict(rotation=90.0, train_size=8, epochs=3, lr=1e-3, batch_size=4, burn_in=1, steps=1, aug_lr=0.2,
                 n_samples=2, marglik_batches=1, marglik_batch_size=4, workers=1)
    mod.write_outputs({"setup": setup, "wall_seconds": 1.0, "runs": [_run("reduce", "reduce", True, 0.6)]}, tmp_path)
    md = (tmp_path / "wrn_marglik.md").read_text()
    assert md.startswith("# WRN-16-4") and "## Tuning runs" in md
