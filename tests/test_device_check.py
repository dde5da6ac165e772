"""``scripts/device_check.sh --device cpu --quick`` runs end to end and writes every result file.

Each step runs as its own test (``--only <step>``) into one shared folder, so that no test takes
minutes; the summary step, last, reads every step's file. The step "tests" (``tests/test_device.py``)
is the suite's own and is not repeated here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"
#: step -> the result file it writes
STEPS = {"kfac": "kfac_speed_cpu.json", "marglik": "marglik_speed_cpu.json", "cost": "wrn_cost_cpu.json",
         "step": "marglik_step_wrn_cpu.json", "batchwise": "batchwise_cpu.json", "tune": "wrn_tuning_cpu.json"}


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("device_check")


def _step(step: str, out: Path) -> subprocess.CompletedProcess:
    proc = _run("--device", "cpu", "--quick", "--only", step, "--out", str(out / "results"), tmp_path=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("step", list(STEPS))
def test_quick_mode_step_writes_its_result(step, out):
    proc = _step(step, out)
    results = out / "results"
    assert (results / STEPS[step]).exists(), proc.stdout[-2000:]
    assert f"device_check: steps {step} OK (cpu)" in proc.stdout
    if step == "step":
        data = json.loads((results / STEPS[step]).read_text())
        assert {s["augment"] for s in data["settings"]} == {False, True}
        assert all(s["results"]["floor"]["median_s"] > 0 for s in data["settings"])
    if step == "cost":
        cost = json.loads((results / STEPS[step]).read_text())
        assert {r["contender"] for r in cost["rows"]} >= {"expand", "mixed", "reduce",
                                                           "laplace-torch-curvlinops-expand"}
        assert all(r["median_s"] > 0 for r in cost["rows"])


def test_quick_mode_summary_reads_every_result(out):
    for step, name in STEPS.items():  # run alone, this test makes what the step tests above made
        if not (out / "results" / name).exists():
            _step(step, out)
    proc = _step("summary", out)
    assert "device_check: OK (cpu)" in proc.stdout
    assert "expand/reduce" in proc.stdout  # the summary
    assert "reduce/laplace-torch reduce" in proc.stdout
    assert "WRN tuning run:" in proc.stdout and "batchwise step" in proc.stdout


def test_bad_argument_is_a_one_line_error(tmp_path):
    proc = _run("--device", "tpu", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "--device must be cpu, cuda or auto" in proc.stderr
    proc = _run("--only", "kfac,nope", tmp_path=tmp_path)
    assert proc.returncode == 2 and "--only takes steps among" in proc.stderr
