"""pyproject.toml's dependencies match the code: each is used by the package or its tests, and every
third-party module the package imports is declared."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
# distribution -> how the code uses it (a regex over the sources)
USE = {
    "torch": r"^\s*(import|from) torch\b",
    "numpy": r"^\s*(import|from) numpy\b",
    "torchvision": r"^\s*(import|from) torchvision\b",
    "scikit-learn": r"^\s*(import|from) sklearn\b",
    "laplace-torch": r"^\s*(import|from) laplace\b",
    "curvlinops-for-pytorch": r"^\s*(import|from) curvlinops\b|\bCurvlinopsGGN\b",
    "asdfghjkl": r"\bAsdlGGN\b|\bAsdlEF\b",  # imported as `asdl` by laplace-torch's Asdl backends
    "backpack-for-pytorch": r"^\s*(import|from) backpack\b",
    "hydra-core": r"^\s*(import|from) hydra\b",
    "wandb": r"^\s*import wandb\b",
    "tqdm": r"^\s*(import|from) tqdm\b",
    "matplotlib": r"^\s*(import|from) matplotlib\b",
    "pytest": r"^\s*import pytest\b",
    "ruff": r"\bruff\b",  # tests/test_lint.py runs it
    # the docs extra: docs/conf.py names them (Sphinx extensions and the theme)
    "sphinx": r"\bsphinx\.ext\.autodoc\b",
    "sphinx-gallery": r"\bsphinx_gallery\b",
    "myst-parser": r"\bmyst_parser\b",
    "furo": r"^html_theme = \"furo\"",
}
MODULE_OF = {"sklearn": "scikit-learn", "laplace": "laplace-torch", "curvlinops": "curvlinops-for-pytorch",
             "backpack": "backpack-for-pytorch", "hydra": "hydra-core", "omegaconf": "hydra-core"}


def _declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in reqs}


def _sources(*folders):
    return "\n".join(p.read_text() for f in folders for p in (ROOT / f).rglob("*.py"))


def test_every_declared_dependency_is_used():
    code = _sources("marglik", "tests", "docs")
    for dist in sorted(_declared()):
        assert dist in USE, f"{dist} is declared in pyproject.toml but this test does not know how it is used"
        assert re.search(USE[dist], code, flags=re.M), f"{dist} is declared but none of marglik/, tests/, docs/ uses it"


def test_every_third_party_import_of_the_package_is_declared():
    declared = _declared()
    modules = set()
    for path in (ROOT / "marglik").rglob("*.py"):  # real import statements, not docstring prose
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = {m for m in modules if m not in sys.stdlib_module_names and m != "marglik"}
    missing = {m for m in third_party if MODULE_OF.get(m, m) not in declared}
    assert not missing, f"marglik imports {sorted(missing)} without declaring them in pyproject.toml"
