"""``scripts/device_check.sh --device cpu --quick`` runs end to end and writes every result file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)


def test_quick_mode_on_cpu_writes_all_results(tmp_path):
    out = tmp_path / "out"
    proc = _run("--device", "cpu", "--quick", "--out", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("kfac_speed_cpu.json", "marglik_speed_cpu.json", "wrn_cost_cpu.json", "marglik_step_wrn_cpu.json",
                 "wrn_tuning_cpu.json"):
        assert (out / name).exists(), name
    step = json.loads((out / "marglik_step_wrn_cpu.json").read_text())
    assert {s["augment"] for s in step["settings"]} == {False, True}
    assert all(s["results"]["floor"]["median_s"] > 0 for s in step["settings"])
    cost = json.loads((out / "wrn_cost_cpu.json").read_text())
    assert {r["contender"] for r in cost["rows"]} >= {"expand", "mixed", "reduce",
                                                       "laplace-torch-curvlinops-expand"}
    assert all(r["median_s"] > 0 for r in cost["rows"])
    assert "device_check: OK (cpu)" in proc.stdout
    assert "expand/reduce" in proc.stdout  # the summary
    assert "reduce/laplace-torch reduce" in proc.stdout


def test_bad_argument_is_a_one_line_error(tmp_path):
    proc = _run("--device", "tpu", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "--device must be cpu, cuda or auto" in proc.stderr
