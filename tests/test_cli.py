"""The Hydra CLI: config groups, the fixed override paths, and a real ``python -m marglik`` run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from hydra_config import compose_config
from omegaconf import OmegaConf

from marglik.cli import run_from_config
from marglik.tuning import Config

REPO = Path(__file__).resolve().parents[1]




def test_default_config_matches_dataclass_defaults():
    cfg = Config.from_dict(OmegaConf.to_container(compose_config(), resolve=True))
    ref = Config()
    for section in ("data", "curvature", "hyper", "trainer", "logger"):
        assert asdict(getattr(cfg, section)) == asdict(getattr(ref, section)), section
    assert cfg.model.name == "cnn" and cfg.curvature.approx == "reduce" and cfg.hyper.augmentation
    assert cfg.curvature.copies_approx == "reduce"
    assert cfg.logger.mode == "offline"


def test_fixed_override_paths():
    cfg = compose_config([
        "data=digits", "data.rotation=90", "data.translation=2", "data.train_size=100", "model=mlp",
        "curvature.approx=expand", "curvature.copies_approx=expand", "curvature.fisher_type=mc",
        "hyper.augmentation=false",
        "hyper.prior_structure=scalar", "trainer.epochs=3", "trainer.seed=7", "trainer.device=cpu",
        "logger.mode=disabled",
    ])
    c = Config.from_dict(OmegaConf.to_container(cfg, resolve=True))
    assert (c.data.name, c.data.rotation, c.data.translation, c.data.train_size) == ("digits", 90, 2, 100)
    assert c.model.name == "mlp" and c.model.kwargs["activation"] == "tanh"
    assert (c.curvature.approx, c.curvature.copies_approx, c.curvature.fisher_type) == ("expand", "expand", "mc")
    assert c.hyper.augmentation is False and c.hyper.prior_structure == "scalar"
    assert (c.trainer.epochs, c.trainer.seed, c.trainer.device) == (3, 7, "cpu")
    assert c.logger.mode == "disabled"


def test_run_dir_names_both_flavours():
    cfg = compose_config(with_hydra=True)
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
    assert run_dir.endswith("_${data.name}_${curvature.approx}-${curvature.copies_approx}"
                            "${bias_suffix:${curvature.separate_bias}}")
    for override, suffix in (([], "_digits_reduce-reduce"), (["curvature.separate_bias=true"], "-reduce-sepbias")):
        cfg = compose_config(override, with_hydra=True)
        assert OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"].endswith(suffix)


@pytest.mark.parametrize("data", ["cifar10", "mnist", "fashion_mnist"])
def test_other_datasets_and_models_compose(data):
    c = Config.from_dict(OmegaConf.to_container(compose_config([f"data={data}", "model=wrn16_4"]), resolve=True))
    assert c.data.name == data and c.model.name == "wrn16_4" and c.model.kwargs["norm"] == "fixup"


def test_paper_experiment_is_one_override_away():
    c = Config.from_dict(OmegaConf.to_container(compose_config(["+experiment=cifar10_wrn16_4"]), resolve=True))
    assert c.data.name == "cifar10" and c.model.name == "wrn16_4" and c.trainer.optimizer == "sgd"


def test_unknown_group_option_fails():
    from hydra.errors import HydraException

    with pytest.raises(HydraException, match="resnet1000"):
        compose_config(["model=resnet1000"])


def test_run_in_process(tmp_path):
    cfg = compose_config([
        "data.train_size=32", "data.rotation=45", "model.width=4", "model.hidden=8", "trainer.epochs=2",
        "trainer.batch_size=16", "hyper.burn_in=1", "hyper.n_samples=2", "trainer.progress=false",
        "logger.mode=disabled", "trainer.num_threads=1",
    ])
    s = run_from_config(cfg, str(tmp_path))  # the thread count is restored by conftest's fixture
    assert {"test_accuracy", "log_marglik", "augmentation"} <= set(s)
    assert (tmp_path / "history.csv").is_file() and (tmp_path / "curves.png").is_file()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One real ``python -m marglik`` run from another directory, then the same command again
    (``(run dir, first process, second process)``), shared by the tests that read them."""
    tmp_path = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "marglik", "trainer.epochs=1", "data.train_size=32", "model=mlp",
           "model.hidden=[16]", "hyper.burn_in=0", "hyper.n_samples=2", "curvature.approx=expand",
           "trainer.device=cpu", "trainer.seed=1", "trainer.num_threads=1", "logger.mode=disabled",
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # re-running into the same directory resumes (here: nothing left to do) instead of starting over
    proc2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    return out, proc, proc2


def test_python_m_marglik_from_another_directory(cli_run):
    out, proc, _ = cli_run
    s = json.loads((out / "summary.json").read_text())
    assert s["approx"] == "expand" and s["copies_approx"] == "reduce" and s["epochs"] == 1 and s["seed"] == 1
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "curves.png").is_file()
    assert "summary.json" in proc.stderr


def test_closing_lines_say_what_was_learned(cli_run):
    # the closing lines say what was learned, in words: ranges against the data's, precisions by name
    proc = cli_run[1]
    assert "marglik: augmentation ranges: rotation +-" in proc.stderr and "(data.rotation=0" in proc.stderr
    assert "marglik: prior precisions per parameter tensor" in proc.stderr and "net.0.weight" in proc.stderr


def test_rerunning_into_the_run_directory_resumes(cli_run):
    out, _, proc2 = cli_run
    assert "resumed from" in proc2.stdout + proc2.stderr
    assert json.loads((out / "summary.json").read_text())["segments"] == 2


# --------------------------------------------------------------------------- the real entry point
def _marglik(args, cwd, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra})
    return subprocess.run([sys.executable, "-m", "marglik", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


CONFIG_ERRORS = [
    (["hyper.augmentation=off"], "hyper.augmentation=off: not a boolean; allowed: true or false"),
    (["trainer.epochs=abc"], "trainer.epochs=abc: wrong type; allowed: an integer"),
    (["data.rotation=abc"], "data.rotation=abc: wrong type; allowed: a number"),
    (["model.name=mlp"], "model.width=16: not an option of model mlp"),
    (["trainer.epoch=3"], "trainer.epoch=3: unknown key (did you mean trainer.epochs?); allowed: the keys of trainer"),
    (["model=tv:resnet19"], "model.arch=resnet19: invalid value; allowed: a torchvision classifier: alexnet,"),
]


@pytest.mark.parametrize("args, message", CONFIG_ERRORS)
def test_config_errors_are_one_line_with_exit_status_2(args, message, tmp_path, monkeypatch, capsys):
    """The entry point in this process (``marglik.cli.main``: the same code ``python -m marglik``
    runs; one case goes through a real subprocess below)."""
    from marglik import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["marglik", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marglik: config error: " + message), lines
    assert not (tmp_path / "outputs").exists()  # rejected before a run directory was made


def test_config_error_through_python_m_marglik(tmp_path):
    args, message = CONFIG_ERRORS[-2]
    proc = _marglik(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marglik: config error: " + message), proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_full_hydra_error_shows_the_traceback(tmp_path):
    proc = _marglik(["hyper.augmentation=off"], tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "hyper.augmentation=off" in proc.stderr


def test_help_says_what_it_does_options_and_examples(monkeypatch, capsys):
    from marglik import cli

    monkeypatch.setattr(sys, "argv", ["marglik", "--help"])
    cli.main()
    out = capsys.readouterr().out
    assert "marginal likelihood" in out and "prior precisions" in out
    assert "curvature.approx" in out and "expand, reduce" in out and "hyper.augmentation" in out
    assert out.count("\n  marglik ") == 4  # four example commands
    assert "copies_approx" in out and "curvature.backend" in out and "curvature.structure" in out
    assert "trainer.num_threads" in out and "marglik-report" in out and "Exit status" in out


def test_run_without_tuning_says_so_and_writes_no_nan(tmp_path):
    out = tmp_path / "run"
    args = ["trainer.epochs=1", "hyper.burn_in=5", "data.train_size=32", "model=mlp", "model.hidden=[8]",
            "hyper.n_samples=2", "trainer.device=cpu", "trainer.num_threads=1", "logger.mode=disabled",
            "trainer.progress=false", f"hydra.run.dir={out}"]
    proc = _marglik(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "no hyperparameter tuning will happen" in text
    assert "NaN" not in proc.stderr and "nan" not in (out / "history.csv").read_text().lower()
    raw = (out / "summary.json").read_text()
    assert "NaN" not in raw
    s = json.loads(raw)
    assert s["marglik_updates"] == 0 and s["log_marglik"] is None and s["best_epoch"] is None
    assert any("no hyperparameter tuning" in w for w in s["warnings"]) and s["rollbacks"] == 0


def test_zero_epochs_does_not_claim_curves(tmp_path):
    out = tmp_path / "run"
    proc = _marglik(["trainer.epochs=0", "data.train_size=32", "model=mlp", "model.hidden=[8]",
                     "hyper.n_samples=2", "trainer.device=cpu", "logger.mode=disabled", f"hydra.run.dir={out}"],
                    tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "curves.png").exists()
    assert "curves.png" not in proc.stderr and "wrote summary.json" in proc.stderr
