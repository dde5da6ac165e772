"""A real offline W&B run: unique run names, and the end of the run says where the offline run is
and the ``wandb sync`` command that uploads it. Skipped if wandb cannot start offline here."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from test_tuning import tiny

from marglik.tuning import MarglikTuner


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    n = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(n)


def _run(cfg, run_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = MarglikTuner(cfg, run_dir)
        t.fit()
    failed = [str(w.message) for w in caught if "wandb" in str(w.message)]
    if failed:
        pytest.skip(f"wandb cannot run offline here: {failed[0]}")
    return t


def test_offline_run_location_sync_command_and_unique_names(offline, capsys):
    cfg = tiny(trainer={"epochs": 1}, hyper={"burn_in": 0, "steps": 1}, logger={"mode": "offline"})
    a = _run(cfg, offline / "a")
    err = capsys.readouterr().err
    m = re.search(r"upload it with: wandb sync (.+)$", err, re.M)
    assert m, err
    dirs = [Path(p) for p in shlex.split(m.group(1))]
    assert dirs and all(d.is_dir() and d.name.endswith(a.wandb_id) for d in dirs)
    assert all(str(d).startswith(str(offline / "a" / "wandb")) for d in dirs)
    assert any(d.glob("*.wandb") for d in dirs)

    b = _run(cfg, offline / "b")  # same config, another run: another id and hence another name
    capsys.readouterr()
    assert a.wandb_id != b.wandb_id
    assert a.logger.name == f"marglik-reduce-reduce-s0-{a.wandb_id}" and b.logger.name == f"marglik-reduce-reduce-s0-{b.wandb_id}"


def test_offline_resume_continues_the_same_run(offline, capsys):
    from test_tuning import _interrupt_after

    cfg = tiny(trainer={"epochs": 2}, hyper={"burn_in": 0, "steps": 1}, logger={"mode": "offline"})
    with pytest.raises(KeyboardInterrupt):
        MarglikTuner(cfg, offline / "r", callbacks=[_interrupt_after(1)]).fit()
    first = capsys.readouterr().err
    if "wandb sync" not in first:
        pytest.skip("wandb cannot run offline here")
    t = _run(cfg, offline / "r")
    err = capsys.readouterr().err
    m = re.search(r"upload it with: wandb sync (.+)$", err, re.M)
    dirs = [Path(p) for p in shlex.split(m.group(1))]
    assert len(dirs) == 2 and all(d.name.endswith(t.wandb_id) for d in dirs)  # one run, two segments
