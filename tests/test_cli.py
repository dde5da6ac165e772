"""The Hydra CLI: config groups, the fixed override paths, and a real ``python -m marglik`` run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from marglik.cli import run_from_config
from marglik.tuning import Config

REPO = Path(__file__).resolve().parents[1]


def _compose(overrides=()):
    with initialize_config_module(config_module="marglik.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_matches_dataclass_defaults():
    cfg = Config.from_dict(OmegaConf.to_container(_compose(), resolve=True))
    ref = Config()
    for section in ("data", "curvature", "hyper", "trainer", "logger"):
        assert asdict(getattr(cfg, section)) == asdict(getattr(ref, section)), section
    assert cfg.model.name == "cnn" and cfg.curvature.approx == "reduce" and cfg.hyper.augmentation
    assert cfg.curvature.copies_approx == "reduce"
    assert cfg.logger.mode == "offline"


def test_fixed_override_paths():
    cfg = _compose([
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
    with initialize_config_module(config_module="marglik.conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
    assert run_dir.endswith("_${data.name}_${curvature.approx}-${curvature.copies_approx}")


@pytest.mark.parametrize("data", ["cifar10", "mnist", "fashion_mnist"])
def test_other_datasets_and_models_compose(data):
    c = Config.from_dict(OmegaConf.to_container(_compose([f"data={data}", "model=wrn16_4"]), resolve=True))
    assert c.data.name == data and c.model.name == "wrn16_4" and c.model.kwargs["norm"] == "fixup"


def test_paper_experiment_is_one_override_away():
    c = Config.from_dict(OmegaConf.to_container(_compose(["+experiment=cifar10_wrn16_4"]), resolve=True))
    assert c.data.name == "cifar10" and c.model.name == "wrn16_4" and c.trainer.optimizer == "sgd"


def test_unknown_group_option_fails():
    with pytest.raises(Exception):
        _compose(["model=resnet1000"])


def test_run_in_process(tmp_path):
    cfg = _compose([
        "data.train_size=32", "data.rotation=45", "model.width=4", "model.hidden=8", "trainer.epochs=2",
        "trainer.batch_size=16", "hyper.burn_in=1", "hyper.n_samples=2", "trainer.progress=false",
        "logger.mode=disabled", "trainer.num_threads=1",
    ])
    n = torch.get_num_threads()
    try:
        s = run_from_config(cfg, str(tmp_path))
    finally:
        torch.set_num_threads(n)
    assert {"test_accuracy", "log_marglik", "augmentation"} <= set(s)
    assert (tmp_path / "history.csv").is_file() and (tmp_path / "curves.png").is_file()


def test_python_m_marglik_from_another_directory(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "marglik", "trainer.epochs=1", "data.train_size=32", "model=mlp",
           "model.hidden=[16]", "hyper.burn_in=0", "hyper.n_samples=2", "curvature.approx=expand",
           "trainer.device=cpu", "trainer.seed=1", "trainer.num_threads=1", "logger.mode=disabled",
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["approx"] == "expand" and s["copies_approx"] == "reduce" and s["epochs"] == 1 and s["seed"] == 1
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "curves.png").is_file()
    assert "summary.json" in proc.stderr
    # re-running into the same directory resumes (here: nothing left to do) instead of starting over
    proc2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "resumed from" in proc2.stdout + proc2.stderr
