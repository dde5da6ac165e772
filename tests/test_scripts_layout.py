"""The layout of ``scripts/``: no script imports another script's entry point (only library
modules, which have no ``__main__`` block), and no module there is over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MODULES = {p.stem: p for p in SCRIPTS.glob("*.py")}


def _is_entry_point(path: Path) -> bool:
    """Whether the module has an ``if __name__ == "__main__":`` block."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test):
            return True
    return False


def _sibling_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name in MODULES)


def test_no_script_imports_another_scripts_entry_point():
    bad = [f"{path.name} imports {mod}" for name, path in sorted(MODULES.items())
           for mod in _sibling_imports(path) if mod != name and _is_entry_point(MODULES[mod])]
    assert not bad, bad


def test_no_module_over_500_lines():
    long = {p.name: n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
