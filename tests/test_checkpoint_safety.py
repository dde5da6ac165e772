"""Checkpoints are read without running code: a file carrying any pickled object beyond tensors
and plain data is refused (naming the file), and the payload never runs."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from test_tuning import tiny

from marglik.tuning import MarglikTuner, UnsafeCheckpointError, tune
from marglik.tuning import checkpoint as ckpt


class _OpenPayload:
    """Unpickling it would call ``open(target, "w")``: it creates a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


class _SystemPayload:
    """Unpickling it would run ``touch target`` through ``os.system``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _evil(path, payload):
    torch.save({"epoch": 1, "model": {}, "history": [], "rng": {}, "config": {}, "x": payload}, path)


@pytest.mark.parametrize("payload_cls", [_OpenPayload, _SystemPayload])
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, payload_cls):
    control = tmp_path / "control_created"
    _evil(tmp_path / "control.ckpt", payload_cls(control))
    torch.load(tmp_path / "control.ckpt", weights_only=False)  # positive control: the payload works
    assert control.exists()

    target = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    _evil(evil, payload_cls(target))
    with pytest.raises(UnsafeCheckpointError) as err:
        ckpt.load(evil)
    msg = str(err.value)
    assert "\n" not in msg and str(evil) in msg and "refused" in msg
    assert (".open" if payload_cls is _OpenPayload else ".system") in msg  # names what it asks for
    assert not target.exists()


def test_run_checkpoints_hold_only_plain_data_and_an_explicit_resume_refuses_a_bad_file(tmp_path, caplog):
    cfg = tiny(trainer={"epochs": 2})
    tune(cfg, tmp_path / "run")
    d = tmp_path / "run" / "checkpoints"
    for name in (ckpt.LAST, ckpt.PREV, ckpt.BEST):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(d / name) == [], name
    target = tmp_path / "pwned"
    _evil(d / ckpt.LAST, _OpenPayload(target))
    explicit = cfg.replace(trainer={"resume": str(d / ckpt.LAST), "epochs": 3})
    with pytest.raises(UnsafeCheckpointError, match="last.ckpt refused"):  # no fallback, no fresh start
        MarglikTuner(explicit, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="marglik.tuning"):  # resume=auto: reported, prev.ckpt used
        t = MarglikTuner(cfg.replace(trainer={"epochs": 3}), tmp_path / "run")
    assert t.resumed_from == d / ckpt.PREV and t.epoch == 1
    assert "refused" in caplog.text and "falling back" in caplog.text
    assert not target.exists()


def test_rng_states_round_trip_and_legacy_numpy_state_loads(tmp_path):
    gens = {"data": torch.Generator().manual_seed(3)}
    np.random.seed(5)
    state = ckpt.rng_state(gens)
    a = (np.random.rand(3), torch.rand(2), torch.rand(2, generator=gens["data"]))
    torch.save({"rng": state}, tmp_path / "new.ckpt")
    ckpt.set_rng_state(ckpt.load(tmp_path / "new.ckpt", required=())["rng"], gens)
    b = (np.random.rand(3), torch.rand(2), torch.rand(2, generator=gens["data"]))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    legacy = {**state, "numpy": np.random.get_state()}  # checkpoints written before: a NumPy array
    torch.save({"rng": legacy}, tmp_path / "old.ckpt")
    expect = np.random.rand(2)
    ckpt.set_rng_state(ckpt.load(tmp_path / "old.ckpt", required=())["rng"], gens)
    assert np.array_equal(np.random.rand(2), expect)
