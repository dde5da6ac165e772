"""The code base passes ruff (configured in ``pyproject.toml``: pyflakes, pycodestyle, import order,
bugbear, Google-style docstrings on the package). ``.ci/run`` runs ruff too; this test keeps a
local ``pytest`` run honest where ruff is installed (the ``lint`` extra)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list:
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).exists():
        pytest.skip("ruff is not installed (pip install -e '.[lint]')")
    return [exe]


def test_ruff_is_clean():
    proc = subprocess.run([*_ruff(), "check", "--output-format", "concise", "marglik", "tests", "scripts", "docs"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_catches_a_defect(tmp_path):
    """Negative control: the configuration really reports an unused import and a missing Args entry."""
    bad = tmp_path / "marglik_bad.py"
    bad.write_text('"""Module."""\n\nimport os\n\n\ndef f(x: int) -> int:\n    """Do.\n\n    Args:\n        y: nothing.\n    """\n'
                   "    return x\n")
    proc = subprocess.run([*_ruff(), "check", "--output-format", "concise", "--config", str(ROOT / "pyproject.toml"),
                           str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "F401" in proc.stdout and "D417" in proc.stdout, proc.stdout
