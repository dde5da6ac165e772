"""Resume continues the same run: the same run directory, history.csv without lost or duplicated
epochs, the same W&B run with every step, after a real ``kill -9`` of the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_tuning import _interrupt_after, _strip, tiny

from marglik.tuning import Config, MarglikTuner
from marglik.tuning.cost import TIMING_COLUMNS
from marglik.tuning.reporting import read_history

REPO = Path(__file__).resolve().parents[1]
TIMING = TIMING_COLUMNS

# a run of ~0.1-0.3 s per epoch, long enough to be killed in flight
OVERRIDES = [
    "data.train_size=64", "data.rotation=30", "model=mlp", "model.hidden=[16]", "trainer.epochs=6",
    "trainer.batch_size=32", "hyper.burn_in=1", "hyper.n_samples=2", "hyper.marglik_batches=null",
    "trainer.device=cpu", "trainer.num_threads=1", "trainer.progress=false", "logger.mode=disabled",
]


def _env():
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _rows(path):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_history(path)]


def test_kill_9_then_resume_continues_the_same_run_dir(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "marglik", *OVERRIDES]
    proc = subprocess.Popen([*cmd, f"hydra.run.dir={run}"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hist = run / "history.csv"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if hist.is_file() and len(hist.read_text().splitlines()) >= 2:  # header + 1 epoch
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = len(read_history(hist))
    assert 1 <= killed_at < 6 and not (run / "summary.json").exists()

    # resume by naming the run directory; no hydra.run.dir: the run continues *there*
    res = subprocess.run([*cmd, f"trainer.resume={run}"], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr + res.stdout
    assert not (tmp_path / "outputs").exists()  # no second run directory
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 6
    rows = _rows(hist)
    assert [r["epoch"] for r in rows] == list(range(1, 7))  # no lost, no duplicated epoch

    # and the resumed run is the uninterrupted run, bit for bit
    with initialize_config_module(config_module="marglik.conf", version_base="1.3"):
        cfg = Config.from_dict(OmegaConf.to_container(compose("config", overrides=OVERRIDES), resolve=True))
    ref = MarglikTuner(cfg, tmp_path / "ref")
    ref.fit()
    assert rows == _rows(tmp_path / "ref" / "history.csv")


def test_extend_a_finished_run(tmp_path, caplog):
    cfg = tiny(trainer={"epochs": 2, "schedule": "constant"})
    MarglikTuner(cfg, tmp_path).fit()
    longer = cfg.replace(trainer={"epochs": 4})
    t = MarglikTuner(longer, tmp_path)
    assert t.epoch == 2 and t.resumed_from is not None
    assert "extending the run by 2 epochs" in caplog.text
    s = t.fit()
    assert s["epochs"] == 4
    assert s["segments"] == 2 and 0 < s["seconds_this_segment"] < s["seconds"]  # the total spans both segments
    assert [r["epoch"] for r in read_history(tmp_path / "history.csv")] == [1, 2, 3, 4]
    # with a constant lr schedule, extending equals running 4 epochs from the start
    ref = MarglikTuner(longer, tmp_path / "ref")
    ref.fit()
    assert _strip(ref.history) == _strip(t.history)


class _FakeWandb(types.ModuleType):
    """Records wandb.init arguments and every logged step, per run id; can die mid-log."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.steps, self.die_at_step = [], {}, None
        self.Settings = lambda **kw: kw
        self.Image = lambda path: path

    def init(self, **kw):
        self.inits.append(kw)
        fake, run_id = self, kw["id"]

        class Run:
            id = run_id
            summary = {}

            def log(self, metrics, step=None):
                if fake.die_at_step is not None and step == fake.die_at_step:
                    fake.die_at_step = None
                    raise KeyboardInterrupt  # killed after the checkpoint, before W&B got the epoch
                fake.steps.setdefault(run_id, []).append(step)

            def finish(self):
                pass

        return Run()


def test_wandb_run_resumed_with_every_step_and_unique_names(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny(trainer={"epochs": 4}, logger={"mode": "offline"})
    fake.die_at_step = 2
    with pytest.raises(KeyboardInterrupt):
        MarglikTuner(cfg, tmp_path / "a").fit()
    assert fake.steps[fake.inits[0]["id"]] == [1]  # epoch 2 is checkpointed but not in W&B
    MarglikTuner(cfg, tmp_path / "a").fit()
    first, resumed = fake.inits
    assert resumed["id"] == first["id"] and resumed["resume"] == "allow" and resumed["name"] == first["name"]
    assert sorted({s for s in fake.steps[first["id"]] if s is not None}) == [1, 2, 3, 4]  # every step present
    MarglikTuner(cfg, tmp_path / "b").fit()  # same config, another run: another id and name
    other = fake.inits[-1]
    assert other["id"] != first["id"] and other["name"] != first["name"]
    assert first["name"].startswith("marglik-reduce-reduce-s0-")


def test_interrupt_message_names_an_existing_checkpoint(tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        MarglikTuner(tiny(trainer={"epochs": 3}), tmp_path, callbacks=[_interrupt_after(2)]).fit()
    ck = tmp_path / "checkpoints" / "last.ckpt"
    assert ck.is_file() and f"the checkpoint {ck} holds epoch 2/3" in caplog.text
    assert f"trainer.resume={tmp_path}" in caplog.text


def test_launch_overrides(tmp_path, monkeypatch):
    from marglik.launch import prepare_overrides

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    # resuming a run directory, or a checkpoint inside it, continues in that directory
    assert prepare_overrides([f"trainer.resume={run}"])[-1] == f"hydra.run.dir={run}"
    assert prepare_overrides([f"trainer.resume={run}/checkpoints/last.ckpt"])[-1] == f"hydra.run.dir={run}"
    # an explicit hydra.run.dir wins; auto / never leave Hydra's default
    assert prepare_overrides([f"hydra.run.dir={tmp_path}/x", f"trainer.resume={run}"]) == [
        f"hydra.run.dir={tmp_path}/x", f"trainer.resume={run}"]
    monkeypatch.chdir(tmp_path)
    assert prepare_overrides(["trainer.resume=never"]) == ["trainer.resume=never"]
    with pytest.raises(SystemExit) as e:
        prepare_overrides([f"trainer.resume={tmp_path}/missing"])
    assert e.value.code == 2 and not (tmp_path / "missing").exists()
    assert prepare_overrides(["--help"]) == ["--help"]
    # torchrun: ranks other than 0 get a scratch run directory, no .hydra folder, no log file
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = prepare_overrides([f"hydra.run.dir={run}"])
    assert f"hydra.run.dir={run}" not in out and "hydra.output_subdir=null" in out
    assert "hydra/job_logging=disabled" in out
