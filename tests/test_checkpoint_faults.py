"""Checkpoints that survive faults: the last two are kept, a corrupt one is reported by path and
skipped, unwritable folders fail before training, and no advice names a missing checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_tuning import _interrupt_after, _strip, tiny

from marglik.tuning import MarglikTuner, tune
from marglik.tuning import checkpoint as ckpt
from marglik.tuning.reporting import read_history

REPO = Path(__file__).resolve().parents[1]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_last_two_checkpoints_kept(tmp_path):
    tune(tiny(trainer={"epochs": 3}), tmp_path)
    last = ckpt.load(tmp_path / "checkpoints" / "last.ckpt")
    prev = ckpt.load(tmp_path / "checkpoints" / "prev.ckpt")
    assert (last["epoch"], prev["epoch"]) == (3, 2)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_truncated_last_falls_back_to_prev_and_stays_exact(tmp_path, caplog):
    cfg = tiny(trainer={"epochs": 4})
    ref = MarglikTuner(cfg, tmp_path / "ref")
    ref.fit()
    with pytest.raises(KeyboardInterrupt):  # last = epoch 3, prev = epoch 2
        MarglikTuner(cfg, tmp_path / "run", callbacks=[_interrupt_after(3)]).fit()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    _truncate(last)
    damaged = last.read_bytes()
    with caplog.at_level(logging.WARNING, logger="marglik.tuning"):
        t = MarglikTuner(cfg, tmp_path / "run")
    assert t.resumed_from == tmp_path / "run" / "checkpoints" / "prev.ckpt" and t.epoch == 2
    assert str(last) in caplog.text and "falling back" in caplog.text
    t.fit()
    assert _strip(t.history) == _strip(ref.history)  # the fallback resume is still exact
    assert [r["epoch"] for r in read_history(tmp_path / "run" / "history.csv")] == [1, 2, 3, 4]
    # the damaged file was moved aside, never rotated into prev.ckpt: every *.ckpt left is good
    assert (last.parent / "last.ckpt.damaged").read_bytes() == damaged
    assert (ckpt.load(last)["epoch"], ckpt.load(last.parent / "prev.ckpt")["epoch"]) == (4, 3)


def test_no_readable_checkpoint_starts_fresh_saying_so(tmp_path, caplog):
    cfg = tiny(trainer={"epochs": 2})
    tune(cfg, tmp_path)
    for name in ("last.ckpt", "prev.ckpt"):
        _truncate(tmp_path / "checkpoints" / name)
    with caplog.at_level(logging.WARNING, logger="marglik.tuning"):
        t = MarglikTuner(cfg, tmp_path)
    assert t.epoch == 0 and t.resumed_from is None
    assert "prev.ckpt" in caplog.text and "starting this run from epoch 0" in caplog.text
    # an explicitly requested checkpoint that is unreadable is an error naming it
    with pytest.raises(ckpt.CheckpointError, match="last.ckpt"):
        MarglikTuner(cfg.replace(trainer={"resume": str(tmp_path / "checkpoints" / "last.ckpt")}), tmp_path / "b")
    assert not (tmp_path / "b").exists()  # the failed start removed the run folder it had made


def test_unwritable_folders_fail_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=str(blocker / "run")):
        MarglikTuner(tiny(), blocker / "run", datasets=())  # fails before the (empty) data is touched
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    with pytest.raises(PermissionError, match="checkpoint directory .*checkpoints"):
        MarglikTuner(tiny(), run, datasets=())


def test_never_advises_a_missing_checkpoint(tmp_path, monkeypatch, caplog):
    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save", broken_save)
    with caplog.at_level(logging.WARNING, logger="marglik.tuning"), pytest.raises(OSError):
        MarglikTuner(tiny(trainer={"epochs": 2}), tmp_path).fit()
    assert "nothing to resume from" in caplog.text
    assert "resume with" not in caplog.text


def _cli(args, cwd, timeout=300):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "marglik", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_unwritable_run_dir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = _cli([f"hydra.run.dir={blocker}/run", "trainer.epochs=1", "logger.mode=disabled"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Unable to configure handler" not in proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(blocker / "run") in lines[0], proc.stderr


def test_cli_unwritable_checkpoint_dir_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    proc = _cli([f"hydra.run.dir={run}", "trainer.epochs=1", "logger.mode=disabled"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"checkpoint directory {run / 'checkpoints'} is not writable" in proc.stderr
    assert not (run / "history.csv").exists()  # failed before training


def test_history_names_the_prior_precision_that_moved_most(tmp_path):
    """``log_prior_change_argmax`` (the convergence column's tensor) is the tensor whose log
    precision changed most between the last two checkpoints, by ``log_prior_change_max``; empty in
    an epoch without a marglik update."""
    cfg = tiny(trainer={"epochs": 3})
    t = MarglikTuner(cfg, tmp_path)
    t.fit()
    last = ckpt.load(tmp_path / "checkpoints" / "last.ckpt")["parts"]["prior"]["log_prior"]
    prev = ckpt.load(tmp_path / "checkpoints" / "prev.ckpt")["parts"]["prior"]["log_prior"]
    change = (last - prev).abs()
    names = [n for n, p in t.model.named_parameters() if p.requires_grad]
    hist = read_history(tmp_path / "history.csv")
    assert hist[0]["log_prior_change_argmax"] is None and hist[0]["log_prior_change_max"] == 0  # burn-in
    assert hist[-1]["log_prior_change_argmax"] == names[int(change.argmax())]
    assert hist[-1]["log_prior_change_max"] == pytest.approx(float(change.max()), rel=1e-6)


def _interrupted_save(monkeypatch, at_epoch, partial):
    """``ckpt.save`` that, for ``last.ckpt`` of ``at_epoch``, does ``partial(real save, state, path)``, then raises
    the Ctrl-C a signal would raise at the next bytecode."""
    real = ckpt.save

    def save(state, path, keep_previous=False):
        if state["epoch"] != at_epoch or Path(path).name != ckpt.LAST:  # best.ckpt is saved as before
            return real(state, path, keep_previous)
        partial(real, state, Path(path))
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save", save)


def test_ctrl_c_right_after_the_checkpoint_rename_names_the_new_checkpoint(tmp_path, monkeypatch):
    """The race behind a flaky Ctrl-C test: the signal lands after ``save`` renamed epoch 2's file into
    place but before the loop noted it; the hint must name epoch 2 (the file on disk), not epoch 1."""
    _interrupted_save(monkeypatch, 2, lambda real, state, path: real(state, path, keep_previous=True))
    t = MarglikTuner(tiny(trainer={"epochs": 3}), tmp_path)
    with pytest.raises(KeyboardInterrupt) as err:
        t.fit()
    assert ckpt.load(tmp_path / "checkpoints" / "last.ckpt")["epoch"] == 2
    assert err.value.resume_hint.startswith(f"the checkpoint {tmp_path / 'checkpoints' / 'last.ckpt'} holds epoch 2/3")


def test_ctrl_c_between_the_two_renames_names_prev(tmp_path, monkeypatch):
    """Interrupted after ``last.ckpt`` became ``prev.ckpt`` and before the new file took its place: the
    checkpoint on disk is ``prev.ckpt`` with epoch 1, and resuming the run directory continues from it."""
    def first_rename_only(real, state, path):
        os.replace(path, path.with_name(ckpt.PREV))

    _interrupted_save(monkeypatch, 2, first_rename_only)
    cfg = tiny(trainer={"epochs": 3})
    with pytest.raises(KeyboardInterrupt) as err:
        MarglikTuner(cfg, tmp_path).fit()
    prev = tmp_path / "checkpoints" / "prev.ckpt"
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists() and ckpt.load(prev)["epoch"] == 1
    assert err.value.resume_hint.startswith(f"the checkpoint {prev} holds epoch 1/3: resume with trainer.resume={tmp_path}")
    monkeypatch.undo()
    resumed = MarglikTuner(cfg, tmp_path)
    assert resumed.epoch == 1


def test_ctrl_c_before_the_save_replaced_anything_names_the_previous_checkpoint(tmp_path, monkeypatch):
    """Interrupted while epoch 2's file was being written: ``last.ckpt`` still holds epoch 1."""
    _interrupted_save(monkeypatch, 2, lambda real, state, path: None)
    with pytest.raises(KeyboardInterrupt) as err:
        MarglikTuner(tiny(trainer={"epochs": 3}), tmp_path).fit()
    assert err.value.resume_hint.startswith(f"the checkpoint {tmp_path / 'checkpoints' / 'last.ckpt'} holds epoch 1/3")
