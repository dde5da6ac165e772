"""Every ```python block of README.md and of the documentation's Markdown pages (docs/**/*.md) runs
as written, and the README stays a short entry point whose links resolve.

Convention (stated in the README and on the docs pages): each block is self-contained -- its own
imports and stand-in data -- so a reader can copy any one of them. The blocks run in-process (one
fresh namespace each, in a temporary working directory) to avoid paying torch's import time per
block. The gallery's scripts (docs/examples/*.py) run when the docs are built (.ci/run).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README] + sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts and p.name != "README.md")


def python_blocks(text: str):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = [(page, i, block) for page in PAGES for i, block in enumerate(python_blocks(page.read_text()))]


def test_readme_and_docs_have_python_blocks():
    assert len(python_blocks(README.read_text())) >= 1
    assert len(BLOCKS) >= 5  # the README's, Python API, Config from Python, building blocks, marglik_training


@pytest.mark.parametrize("page,index,block", BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{i + 1}" for p, i, _ in BLOCKS])
def test_python_block_runs(page, index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    try:
        exec(compile(block, f"{page.relative_to(ROOT)} python block {index + 1}", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def test_getting_started_says_how_to_install_cpu_only_torch():
    text = (DOCS / "getting_started.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert "getting_started.md" in README.read_text()  # and the README points there


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    relative = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in relative)
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert not missing, missing


def test_block_extraction_sees_only_python_blocks():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]
