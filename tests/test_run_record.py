"""A run directory is a record: a rejected command changes nothing in it, one process owns it at a
time, and every warning of the run is in ``summary.json['warnings']`` and the closing lines.

One real ``python -m marglik`` run (made once for the module) is the record the tests try to damage.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
from test_cli import REPO

from marglik.run_guard import RunDirGuard
from marglik.tuning import run_lock

#: a tiny CNN run; logger.mode=online without W&B credentials and a batch larger than the data: two warnings
RUN = ["data.train_size=32", "model.width=4", "model.hidden=8", "trainer.epochs=1", "hyper.burn_in=0",
       "hyper.n_samples=2", "trainer.device=cpu", "trainer.num_threads=1", "trainer.progress=false",
       "trainer.batch_size=64", "logger.mode=online"]


def _env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "WANDB_MODE", "WANDB_API_KEY")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **extra})
    return env


def _marglik(args, cwd, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marglik", *args], cwd=cwd, env=_env(**extra), capture_output=True,
                          text=True, timeout=300)


def _contents(folder: Path) -> Dict[str, bytes]:
    """Every file and folder under ``folder``, with the files' bytes (folders: ``b"<dir>"``)."""
    return {str(p.relative_to(folder)): (b"<dir>" if p.is_dir() else p.read_bytes()) for p in folder.rglob("*")}


def _single_line(proc: subprocess.CompletedProcess, start: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(start), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """``(run directory, the process)`` of one finished tiny CNN run (W&B online without credentials)."""
    root = tmp_path_factory.mktemp("record")
    home = root / "home"  # no ~/.netrc: W&B has no credentials
    home.mkdir()
    run = root / "run"
    proc = _marglik([*RUN, f"hydra.run.dir={run}"], root, HOME=str(home), WANDB_DIR=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


def test_every_warning_is_in_the_summary_and_the_closing_lines_without_source_lines(finished):
    run, proc = finished
    s = json.loads((run / "summary.json").read_text())
    text = " | ".join(s["warnings"])
    assert "wandb.init failed in mode 'online'" in text  # was a raw UserWarning, missing from the summary
    assert "trainer.batch_size=64 is larger than the training set (32 examples)" in text
    printed = [line[len("marglik: warning: "):] for line in proc.stderr.splitlines()
               if line.startswith("marglik: warning: ")]
    assert printed == s["warnings"]
    assert "UserWarning" not in proc.stderr and "warnings.warn(" not in proc.stderr and ".py:" not in proc.stderr
    assert not (run / run_lock.LOCK_FILE).exists()  # released at the end of the run


def test_a_rejected_resume_changes_nothing_in_the_run_directory(finished, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(finished[0], run)
    before = _contents(run)
    proc = _marglik(["data.rotation=45", "model=mlp", f"trainer.resume={run}"], tmp_path)
    line = _single_line(proc, "marglik: error: cannot resume from")
    assert "data.rotation: checkpoint 0.0 vs now 45.0" in line
    assert _contents(run) == before  # .hydra/overrides.yaml, config.yaml, the log: byte for byte


def test_a_second_process_is_refused_naming_the_first_and_a_stale_lock_is_taken_over(finished, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(finished[0], run)
    before = _contents(run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from marglik.tuning.run_lock import acquire; "
         "acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(run)],
        env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _marglik([*RUN, f"hydra.run.dir={run}", "logger.mode=disabled"], tmp_path)
        line = _single_line(proc, f"marglik: error: run directory {run} is in use by process {holder.pid} "
                                  f"on {socket.gethostname()} (since ")
        assert "UTC)" in line and "hydra.run.dir" in line
        with pytest.raises(run_lock.RunDirLockedError, match=str(holder.pid)):  # the Python API too
            run_lock.acquire(run)
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the lock file stays, its lock goes with the process
        holder.wait()
    assert json.loads((run / run_lock.LOCK_FILE).read_text())["pid"] == holder.pid  # stale, left behind
    assert {k: v for k, v in _contents(run).items() if k != run_lock.LOCK_FILE} == before
    lock = run_lock.acquire(run)  # taken over
    assert json.loads((run / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    again = run_lock.acquire(run)  # re-entrant in one process (the CLI, then the tuner)
    again.release()
    assert (run / run_lock.LOCK_FILE).exists()
    lock.release()
    assert not (run / run_lock.LOCK_FILE).exists()


def test_guard_restores_what_a_rejected_command_wrote_and_removes_what_it_made(tmp_path):
    """What Hydra writes before a rejection the early checks cannot see (e.g. data missing at a
    resume) is put back; a folder made for a rejected command is removed with its empty parents."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- model=cnn\n")
    (run / "cli.log").write_text("first run\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x" * 10)
    os.utime(run / "cli.log", ns=(1, 10**18))
    before = _contents(run)
    guard = RunDirGuard(run)
    (run / ".hydra" / "overrides.yaml").write_text("- model=mlp\n")  # what Hydra does
    with open(run / "cli.log", "a") as f:
        f.write("second command\n")
    (run / "config.json").write_text("{}")
    (run / "wandb" / "x").mkdir(parents=True)
    guard.close()  # not accepted: rejected
    assert _contents(run) == before and (run / "cli.log").stat().st_mtime_ns == 10**18
    guard = RunDirGuard(run)
    (run / "config.json").write_text("{}")
    guard.accept()
    guard.close()
    assert (run / "config.json").exists()  # an accepted run's files stay
    # a fresh folder (Hydra's timestamped one) is removed on rejection, with the parents it needed
    anchor = tmp_path / "cwd"
    anchor.mkdir()
    fresh = anchor / "outputs" / "2026-01-01" / "12-00-00_digits"
    (fresh / ".hydra").mkdir(parents=True)
    guard = RunDirGuard(fresh, fresh=True, anchor=anchor)
    guard.close()
    assert list(anchor.iterdir()) == []
    # negative control: a parent holding another run is kept
    (anchor / "outputs" / "2026-01-01" / "other").mkdir(parents=True)
    (fresh / ".hydra").mkdir(parents=True)
    RunDirGuard(fresh, fresh=True, anchor=anchor).close()
    assert [p.name for p in (anchor / "outputs" / "2026-01-01").iterdir()] == ["other"]


def test_a_failed_fresh_start_leaves_no_folder(tmp_path):
    """Missing data in Hydra's own timestamped run directory: one line, and no ``outputs/`` left."""
    proc = _marglik(["data=cifar10", f"data.root={tmp_path}/none", "data.train_size=32", "model=mlp",
                     "trainer.device=cpu", "logger.mode=disabled"], tmp_path)
    _single_line(proc, "marglik: error: cifar10 not found under data.root=")
    assert not (tmp_path / "outputs").exists()


def test_report_names_a_single_run_by_its_folder_and_reruns_without_resume(finished, tmp_path):
    from marglik.report import best_lines, build_report

    run = tmp_path / "my_run"
    import shutil

    shutil.copytree(finished[0], run)
    hydra = run / ".hydra" / "overrides.yaml"
    hydra.write_text(hydra.read_text() + f"- trainer.resume={run}\n")  # as a resumed run records it
    (line,) = best_lines(build_report(run))
    assert line.startswith("best of 1: my_run, log marginal likelihood") and "(run my_run; rerun with: marglik " in line
    assert "trainer.resume" not in line and "model.width=4" in line


def test_report_formats_absurd_values_readably():
    from marglik.report import _fmt, best_lines

    assert _fmt(-159886999552.0, ".4f") == "-1.599e+11" and _fmt(-0.4321, ".4f") == "-0.4321"
    assert _fmt(1e-7, ".4f") == "1e-07" and _fmt(0.0, ".4f") == "0.0000" and _fmt(None, ".4f") == "-"
    run = {"run": "r", "choice": "r", "log_marglik": -5.1e13, "log_marglik_per_example": -159886999552.0,
           "test_accuracy": 0.1, "overrides": ["trainer.lr=1e6"], "warnings": []}
    (line,) = best_lines({"groups": [{"ranked": [run], "best": "r"}]})
    assert "(-1.599e+11 per example)" in line and "-5.1e+13" in line


def test_torchvision_check_says_whether_versions_or_builds_differ():
    from marglik.compat import mismatch

    builds = mismatch("2.13.0+cpu", "0.28.0")  # the probe: matching releases, CPU torch, PyPI (CUDA) torchvision
    assert builds.startswith("builds differ: torch 2.13.0+cpu is a CPU build (+cpu), torchvision 0.28.0 is PyPI's")
    assert "torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu" in builds
    assert "CUDA 12.8 build (+cu128)" in mismatch("2.13.0+cpu", "0.28.0+cu128")
    assert mismatch("2.14.1+cu130", "0.29.1").startswith("builds may differ: torch 2.14.1+cu130 is a CUDA 13.0")
    versions = mismatch("2.13.0+cpu", "0.27.1+cpu")
    assert versions.startswith("versions differ") and "torchvision 0.28" in versions
    assert mismatch("2.13.0+cpu", "0.28.0+cpu") is None and mismatch("2.5.1", "0.20.1") is None  # negative control



def test_warnings_raised_while_building_and_training_are_in_the_summary(tmp_path, monkeypatch):
    """In Python too: a warning while the parts are built (here: the data) and one while training (a
    callback) are each one line of ``summary.json['warnings']``, once."""
    import warnings

    from test_tuning import tiny

    from marglik.tuning import build, tune

    load = build._load_data

    def noisy_load(*args, **kwargs):
        warnings.warn("the data set says: mind the gap", UserWarning, stacklevel=1)
        return load(*args, **kwargs)

    monkeypatch.setattr(build, "_load_data", noisy_load)
    s = tune(tiny(trainer={"epochs": 2}), tmp_path,
             callbacks=[lambda tuner, row: warnings.warn("callback: epoch done", RuntimeWarning, stacklevel=1)])
    assert s["warnings"].count("the data set says: mind the gap") == 1
    assert s["warnings"].count("callback: epoch done") == 1  # twice raised, once recorded
    assert json.loads((tmp_path / "summary.json").read_text())["warnings"] == s["warnings"]
