"""Every ```python block of README.md runs as written.

Convention (stated in the README): each block is self-contained -- its own imports and stand-in
data -- so a reader can copy any one of them. The blocks run in-process (one fresh namespace each,
in a temporary working directory) to avoid paying torch's import time per block.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    try:
        exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def test_readme_says_how_to_install_cpu_only_torch():
    text = README.read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text


def test_block_extraction_sees_only_python_blocks():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]
