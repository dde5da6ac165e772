"""Every mistake a user can fix is one line on stderr and exit status 2 (issue 20's table, row by
row, through the real entry point ``python -m marglik``); Ctrl-C is one line and exit status 130;
a run that went wrong but finished says so and exits 0. The rows that need no process of their own
are checked in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra_config import compose_config
from omegaconf import OmegaConf
from test_cli import REPO, _marglik

from marglik.cli_config import check_overrides
from marglik.errors import UserError
from marglik.tuning import Config, tune
from marglik.tuning.config import ConfigError

#: the smallest run of the CLI (an MLP on 32 digits, one epoch with one marglik update)
TINY = ["data.train_size=32", "model=mlp", "model.hidden=[8]", "trainer.epochs=1", "hyper.burn_in=0",
        "hyper.n_samples=2", "trainer.device=cpu", "trainer.num_threads=1", "logger.mode=disabled",
        "trainer.progress=false"]


def _one_line(proc, start: str, status: int = 2) -> str:
    """The single stderr line of a failed run; it starts with ``start``, no traceback anywhere."""
    assert proc.returncode == status, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(start), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


# --------------------------------------------------------------------------- configuration values
def test_non_finite_learning_rate_is_one_line_before_anything_starts(tmp_path):
    line = _one_line(_marglik(["trainer.lr=inf", *TINY], tmp_path), "marglik: config error: trainer.lr=inf: ")
    assert line.endswith("not a finite number; allowed: a finite number > 0")
    assert not (tmp_path / "outputs").exists()


def test_every_float_key_rejects_inf_and_nan():
    """Generated from the schema: every float option of every section and model (the command
    line's parsing of ``inf`` is the subprocess test above; here the typed config directly)."""
    keys = [(k, "cnn") for k in Config()._float_keys()]
    for model in ("wrn16_4", "vit"):
        keys += [(k, model) for k in Config.from_dict(model={"name": model})._float_keys() if k.startswith("model.")]
    assert {"trainer.lr", "hyper.prior_prec_init", "hyper.lr", "hyper.aug_lr", "data.rotation",
            "model.dropout"} <= {k for k, _ in keys}
    for key, model in keys:
        section, name = key.split(".")
        for value in (float("inf"), float("-inf"), float("nan")):
            sections = {"model": {"name": model, name: value}} if section == "model" else {section: {name: value}}
            with pytest.raises(ConfigError, match=f"^{key}={value}: not a finite number; allowed: "):
                Config.from_dict(**({"model": {"name": model}} | sections))
    with pytest.raises(ConfigError, match="hyper.aug_lr=-1.0: invalid value; allowed: a number >= 0"):
        check_overrides(["hyper.aug_lr=-1"])  # negative where meaningless: still the range message


# --------------------------------------------------------------------------- the machine
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_one(tmp_path):
    line = _one_line(_marglik([*TINY, "trainer.device=cuda"], tmp_path),
                     "marglik: config error: trainer.device=cuda: CUDA is not available on this machine")
    assert "allowed: cpu, or auto" in line and not (tmp_path / "outputs").exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_on_a_machine_without_one():
    from marglik.tuning import resolve_device

    with pytest.raises(ConfigError, match="trainer.device=mps: MPS .* is not available on this machine"):
        resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")  # negative control


def test_torchvision_built_for_another_torch_is_named_once(tmp_path):
    """A torchvision whose compiled operators do not load (stand-in: a package raising torchvision's
    own error) is named as the cause, not the data set, model or backend that imported it."""
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    proc = _marglik(["data=mnist", *TINY], tmp_path, PYTHONPATH=os.pathsep.join([str(fake.parent), str(REPO)]))
    line = _one_line(proc, "marglik: error: torchvision ")
    assert f"cannot be used with torch {torch.__version__}" in line and "torchvision::nms does not exist" in line
    assert "mnist" not in line.split("(")[0]


def test_a_peer_is_not_blamed_for_a_broken_torchvision(monkeypatch):
    from marglik import compat
    from marglik.errors import IncompatibleInstallError
    from marglik.models import get_model
    from marglik.tuning.backends import check_backend_runs

    monkeypatch.setattr(compat, "_problem", "torchvision 0.0 cannot be used with torch 0.0: (simulated)")
    cfg = Config.from_dict(curvature={"backend": "curvlinops", "approx": "expand"}, hyper={"augmentation": False})
    batch = (torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(IncompatibleInstallError, match="simulated"):
        check_backend_runs(cfg.curvature, get_model("cnn", 1, 10, 8, width=2, hidden=4), batch)


# --------------------------------------------------------------------------- data
def test_missing_data_files(tmp_path):
    line = _one_line(_marglik(["data=cifar10", f"data.root={tmp_path}/none", *TINY, f"hydra.run.dir={tmp_path}/run"],
                              tmp_path), "marglik: error: cifar10 not found under data.root=")
    assert "data.download=true" in line
    assert not (tmp_path / "run").exists()  # the failed start left no run folder behind


def test_full_hydra_error_reraises_a_user_error(monkeypatch, capsys):
    """The CLI boundary: one line and exit status 2, or with HYDRA_FULL_ERROR=1 the error itself
    (Hydra then prints its traceback; the precheck's case runs as a subprocess in test_cli.py)."""
    from marglik.cli import _user_error
    from marglik.errors import DataUnavailableError

    err = DataUnavailableError("cifar10 not found (simulated)")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        _user_error(err)
    assert exit_.value.code == 2 and capsys.readouterr().err == "marglik: error: cifar10 not found (simulated)\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(DataUnavailableError):
        _user_error(err)


def test_download_without_a_network(tmp_path):
    """Offline, simulated for the whole process (sitecustomize): every URL open fails; nothing is sent."""
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "download_attempted"
    (site / "sitecustomize.py").write_text(
        "import pathlib, urllib.error, urllib.request\n"
        "def _offline(*args, **kwargs):\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n"
        "    raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution (simulated)')\n"
        "urllib.request.urlopen = _offline\n")
    proc = _marglik(["data=cifar10", "data.download=true", f"data.root={tmp_path}/data", *TINY,
                     f"hydra.run.dir={tmp_path}/run"], tmp_path, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    line = _one_line(proc, "marglik: error: could not download cifar10 into data.root=")
    assert marker.exists() and "URLError" in line and "data.download=false" in line


# --------------------------------------------------------------------------- backends, resume, torchrun
def test_peer_backend_that_cannot_run_the_default_cnn_names_what_does(tmp_path):
    proc = _marglik(["curvature.backend=backpack", "curvature.approx=expand", "hyper.augmentation=false",
                     "data.train_size=32", "trainer.epochs=1", "trainer.num_threads=1", "logger.mode=disabled",
                     f"hydra.run.dir={tmp_path}/run"], tmp_path)
    line = _one_line(proc, "marglik: error: curvature.backend=backpack (backpack-kron-expand) cannot run SmallCNN: ")
    assert "AdaptiveAvgPool2d" in line and "model=mlp runs with backpack-kron-expand" in line


def test_resume_with_a_changed_config(tmp_path):
    run = tmp_path / "run"
    tune(Config.from_dict(OmegaConf.to_container(compose_config(TINY), resolve=True)), run)  # the checkpoint
    line = _one_line(_marglik([*TINY, "data.rotation=30", f"hydra.run.dir={run}"], tmp_path),
                     f"marglik: error: cannot resume from {run}/checkpoints/last.ckpt: the configuration differs "
                     "from the checkpoint's in 1 key: data.rotation: checkpoint 0.0 vs now 30.0")
    assert "trainer.resume=never" in line


def test_explicit_resume_from_random_bytes_is_called_damaged(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(os.urandom(4096))
    line = _one_line(_marglik([*TINY, f"trainer.resume={ckpt}"], tmp_path), "marglik: error: cannot resume: ")
    assert f"checkpoint {ckpt} is damaged" in line
    assert "refused" not in line and "unsafe" not in line and "weights_only" not in line


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_batch_that_leaves_a_rank_empty(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "marglik",
           *TINY, "trainer.batch_size=1", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("marglik: ")]
    assert len(ours) == 1, proc.stderr[-3000:]  # one line per job: rank 0's
    assert ours[0].startswith("marglik: config error: trainer.batch_size=1: with 32 training examples")
    assert "fewer ranks (torchrun --nproc_per_node)" in ours[0]
    assert f'File "{REPO / "marglik"}' not in proc.stderr  # torchrun reports the failure; no marglik traceback
    assert "exitcode  : 2" in proc.stderr


# --------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_is_one_line_with_the_resume_hint(tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    args = [a for a in TINY if not a.startswith(("trainer.epochs", "data.train_size"))]
    # the default SIGINT disposition in the child: a test suite started as a background job of a
    # non-interactive shell (``cmd &``) inherits SIGINT ignored, and Python keeps an ignored SIGINT
    proc = subprocess.Popen([sys.executable, "-m", "marglik", *args, "trainer.epochs=200", "data.train_size=256",
                             f"hydra.run.dir={run}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "last.ckpt").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = _one_line(result, "marglik: interrupted; the checkpoint ", status=130)
    assert f"resume with trainer.resume={run}" in line and "KeyboardInterrupt" not in err


# --------------------------------------------------------------------------- a run that went wrong
def test_learning_rate_1e6_finishes_and_says_it_went_wrong(tmp_path):
    """The issue's row: exit status 0 (the run finished and wrote its outputs), but the closing lines
    and summary.json's warnings say the model is at chance and its log marginal likelihood absurd."""
    run = tmp_path / "run"
    proc = _marglik([*TINY, "trainer.lr=1e6", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["log_marglik_per_example"] < -100 and s["test_accuracy"] < 0.2
    text = " | ".join(s["warnings"])
    assert "at chance level" in text and "is absurd" in text and "did not learn" in text
    printed = [line[len("marglik: warning: "):] for line in proc.stderr.splitlines()
               if line.startswith("marglik: warning: ")]
    assert printed == s["warnings"]


def test_warnings_name_rollbacks_and_a_sane_run_has_none(tmp_path):
    from marglik.tuning.diagnosis import run_warnings

    events = [{"epoch": 3, "kind": "loss", "value": "nan", "where": "MAP step, batch 2/4", "action": "..."}] * 2
    summary = {"rollback_events": events, "test_accuracy": 0.9, "test_size": 360, "log_marglik_per_example": -0.4}
    (line,) = run_warnings(summary, [{"train_nll": 0.3}], 10)
    assert line.startswith("2 rollbacks after non-finite loss values (first in epoch 3, MAP step, batch 2/4)")
    sane = [*TINY, "data.train_size=256", "trainer.epochs=4", "hyper.burn_in=1", "model.hidden=[32]"]
    good = tune(Config.from_dict(OmegaConf.to_container(compose_config(sane), resolve=True)), tmp_path / "good")
    assert good["warnings"] == [], good["warnings"]  # negative control: a run that learned has none


def test_user_errors_share_one_base():
    from marglik.errors import DataUnavailableError, IncompatibleInstallError
    from marglik.tuning import NonFiniteError, RunDirLockedError
    from marglik.tuning.backends import BackendUnsupportedError
    from marglik.tuning.checkpoint import CheckpointError, DamagedCheckpointError, UnsafeCheckpointError

    for kind in (ConfigError, CheckpointError, DamagedCheckpointError, UnsafeCheckpointError, RunDirLockedError,
                 DataUnavailableError, IncompatibleInstallError, BackendUnsupportedError, NonFiniteError):
        assert issubclass(kind, UserError), kind
    assert str(UserError("two\nlines")) == "two lines"  # one line whatever the message
