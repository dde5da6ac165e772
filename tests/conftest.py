import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def float64():
    """Run a test in float64 (exactness tests), restoring the default dtype afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Every test leaves torch's thread count as it found it (tuning runs set ``trainer.num_threads``)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
