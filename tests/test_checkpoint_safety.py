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


def _damaged_files(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"epoch": 1, "model": {"w": torch.ones(200)}, "history": [], "rng": {}, "config": {}}, good)
    data = good.read_bytes()
    files = {"empty": b"", "truncated": data[: len(data) // 2], "random bytes": os.urandom(4096),
             "zip with corrupt contents": data[:200] + os.urandom(len(data) - 400) + data[-200:]}
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name.replace(' ', '_')}.ckpt"
        out[name].write_bytes(content)
    return good, out


def test_a_file_that_cannot_be_read_is_damaged_not_unsafe(tmp_path):
    """torch reports random bytes as 'weights only load failed ... weights_only=False will likely
    succeed': marglik calls them damaged and never passes that advice on."""
    good, damaged = _damaged_files(tmp_path)
    assert ckpt.load(good)["epoch"] == 1  # positive control
    for name, path in damaged.items():
        with pytest.raises(ckpt.CheckpointError) as err:
            ckpt.load(path)
        msg = str(err.value)
        assert isinstance(err.value, ckpt.DamagedCheckpointError), (name, msg)
        assert not isinstance(err.value, UnsafeCheckpointError), name
        assert msg.startswith(f"checkpoint {path} is damaged (") and "\n" not in msg, msg
        assert "weights_only" not in msg and "unsafe" not in msg and "refused" not in msg, msg


def test_a_legacy_torch_file_with_a_payload_is_refused_as_unsafe(tmp_path):
    target = tmp_path / "pwned"
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"x": _OpenPayload(target)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="legacy.ckpt refused as unsafe") as err:
        ckpt.load(legacy, required=())
    assert "weights_only" not in str(err.value) and not target.exists()
    plain = tmp_path / "plain_legacy.ckpt"
    torch.save({"x": torch.ones(2)}, plain, _use_new_zipfile_serialization=False)
    assert torch.equal(ckpt.load(plain, required=())["x"], torch.ones(2))  # a legacy file without payload loads


def test_resume_auto_skips_a_damaged_last_checkpoint_naming_it_damaged(tmp_path, caplog):
    cfg = tiny(trainer={"epochs": 2})
    tune(cfg, tmp_path)
    last = tmp_path / "checkpoints" / ckpt.LAST
    last.write_bytes(os.urandom(2048))
    with caplog.at_level(logging.WARNING, logger="marglik.tuning"):
        t = MarglikTuner(cfg.replace(trainer={"epochs": 3}), tmp_path)
    assert t.resumed_from == tmp_path / "checkpoints" / ckpt.PREV and t.epoch == 1
    assert f"checkpoint {last} is damaged" in caplog.text and "falling back" in caplog.text
    assert "refused" not in caplog.text


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
