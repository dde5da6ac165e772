"""The loop in parts: a checkpoint is the parts' states (format version 2; version-1 files from
before the split still resume, exactly), and the documented Python-API example (docs/howto/own_model.md) -- a user's own
model, data and Laplace factory, no config sections for them -- runs as written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_tuning import _strip, tiny

from marglik.tuning import MarglikTuner
from marglik.tuning import checkpoint as ckpt
from marglik.tuning import checkpoint_format as fmt

DATA = Path(__file__).resolve().parent / "data"
OWN_MODEL_PAGE = Path(__file__).resolve().parents[1] / "docs" / "howto" / "own_model.md"
#: last.ckpt after epoch 2 of ``tiny(trainer={"epochs": 4})``, written by the loop before the split
#: (format version 1, commit 1b69669), and that code's summary of the uninterrupted 4-epoch run
V1_CKPT = DATA / "v1_run_epoch2.pt"
V1_REFERENCE = DATA / "v1_run_summary.json"
TIMING = {"seconds", "seconds_this_segment", "seconds_per_marglik_step", "seconds_per_cached_hyperstep",
          "seconds_per_selection", "segments"}


def _close(a, b, path=""):
    """Nested summaries equal: strings, ints and structure exactly, floats to rel 1e-4."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), path
    else:
        assert a == b, path


def _same(a, b):
    """Equal states: tensors exactly, nan equal to nan."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def test_checkpoint_is_the_parts_states(tmp_path):
    t = MarglikTuner(tiny(trainer={"epochs": 2}), tmp_path)  # one marglik update, at epoch 2
    t.fit()
    state = ckpt.load(tmp_path / "checkpoints" / ckpt.LAST)
    assert state["version"] == fmt.VERSION == 2 and state["epoch"] == 2
    assert set(state["parts"]) == {"run", *t.parts.stateful()}
    assert fmt.upgrade(state) is state  # the current format passes unchanged
    # every part takes back its own state: a fresh tuner restored from it has the same state
    other = MarglikTuner(tiny(trainer={"epochs": 2, "resume": "never"}), tmp_path / "other")
    other.load_state_dict(state)
    again = other.state_dict()
    assert state["parts"]["selection"]["best"]["epoch"] == 2  # the state holds the best update
    for name in ("run", "model", "prior", "augmentation", "map_step", "hyper_step", "selection", "streams"):
        assert _same(state["parts"][name], again["parts"][name]), name
    with pytest.raises(ckpt.CheckpointError, match="lacks the state of the parts \\['selection'\\]"):
        fmt.check_parts({**state, "parts": {k: v for k, v in state["parts"].items() if k != "selection"}},
                        ["run", "selection"])


def test_upgrade_rejects_what_it_cannot_read():
    v1 = ckpt.load(V1_CKPT)
    assert "version" not in v1 or v1["version"] == 1
    up = fmt.upgrade(v1)
    assert up["version"] == 2 and up["parts"]["map_step"]["global_step"] == v1["global_step"]
    assert torch.equal(up["parts"]["prior"]["log_prior"], v1["log_prior"])
    with pytest.raises(ckpt.CheckpointError, match="version-1 run checkpoint without 'hyper_opt'"):
        fmt.upgrade({k: v for k, v in v1.items() if k != "hyper_opt"})
    with pytest.raises(ckpt.CheckpointError, match="format version 99"):
        fmt.upgrade({**up, "version": 99})
    with pytest.raises(ckpt.CheckpointError, match="format version 1, expected 2"):
        fmt.check_parts(v1, ["run"])


def test_a_version_1_checkpoint_resumes_the_same_run(tmp_path):
    """Epochs 1-2 by the code before the split (the file), 3-4 by the parts: the same run as the
    parts' uninterrupted one, and the same numbers as the old code's own uninterrupted run."""
    cfg = tiny(trainer={"epochs": 4})
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(V1_CKPT, run / "checkpoints" / ckpt.LAST)
    resumed = MarglikTuner(cfg, run)
    assert resumed.resumed_from == run / "checkpoints" / ckpt.LAST and resumed.epoch == 2
    summary = resumed.fit()
    assert ckpt.load(run / "checkpoints" / ckpt.LAST)["version"] == 2  # written back in the new format
    ref = MarglikTuner(cfg, tmp_path / "ref")
    ref_summary = ref.fit()
    # Epochs 1-2 of ``resumed`` were computed where the file was written; another CPU's kernels may
    # round differently, so the comparison is to float32 rounding carried over two epochs, not bits
    # (``test_tuning.test_resume_equals_uninterrupted`` checks a same-machine resume for exact equality).
    # ``log_prior_change_argmax`` came after format version 1: the file's epochs lack it, the resumed
    # epochs name the same tensors as the uninterrupted run
    new_col = "log_prior_change_argmax"
    assert [new_col in r for r in resumed.history] == [False, False, True, True]
    assert [r[new_col] for r in resumed.history[2:]] == [r[new_col] for r in ref.history[2:]]
    _close([{k: v for k, v in r.items() if k != new_col} for r in _strip(ref.history)],
           [{k: v for k, v in r.items() if k != new_col} for r in _strip(resumed.history)], "history")
    for (n, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=n)
    old = json.loads(V1_REFERENCE.read_text())
    old = {k: v for k, v in old.items() if k not in TIMING}
    # the same machine reproduces the old code exactly; another CPU may round differently
    _close(old, json.loads(json.dumps({k: v for k, v in summary.items() if k in old})), "resumed")
    _close(old, json.loads(json.dumps({k: v for k, v in ref_summary.items() if k in old})), "uninterrupted")


def _readme_example() -> str:
    section = OWN_MODEL_PAGE.read_text().split("# Your own model and data", 1)[1]
    return re.search(r"^```python\n(.*?)^```", section, flags=re.S | re.M).group(1)


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ns = {"__name__": "__main__"}
    exec(compile(_readme_example(), "docs/howto/own_model.md Python API example", "exec"), ns)
    s = ns["summary"]
    assert s["epochs"] == 2 and s["data"] == "digits-flat" and s["model"] == "Sequential"
    assert s["train_size"] == 200 and s["test_size"] == 297 and s["marglik_updates"] == 1
    assert list(s["prior_precision_by_name"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert s["log_marglik"] is not None and 0 <= s["test_accuracy"] <= 1
    assert (tmp_path / "runs" / "own_model" / "summary.json").is_file()
    assert ckpt.load(tmp_path / "runs" / "own_model" / "checkpoints" / ckpt.LAST)["epoch"] == 2


def test_own_flat_data_with_learned_augmentation_is_a_config_error():
    from torch import nn

    from marglik.tuning import Config, ConfigError, TensorData, build_parts

    X, y = torch.randn(8, 64), torch.arange(8) % 2
    cfg = Config.from_dict(trainer={"device": "cpu"}, logger={"mode": "disabled"})  # augmentation on
    with pytest.raises(ConfigError, match="hyper.augmentation=true: the learned affine augmentation needs images"):
        build_parts(cfg, model=nn.Linear(64, 2), data=TensorData(X, y, X, y))
