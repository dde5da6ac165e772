"""scripts/bench_optimizer.py: the coordinate search (widening until the choice is interior, lossless
pruning), the ``--quick`` smoke run and the ``--from-json`` re-render (fast, CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_optimizer.py"


@pytest.fixture(scope="module")
def bo():
    if str(SCRIPT.parent) not in sys.path:  # the script imports its sibling benchlib, as when run directly
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_optimizer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_axis_widening_and_natural_ends(bo):
    lr = bo.Axis("lr", [1e-3, 2e-3, 4e-3])
    assert lr.widen("low") == 5e-4 and lr.widen("high") == 8e-3
    mom = bo.Axis("momentum", [0.8, 0.9, 0.95], transform="one_minus", lo=0.0, hi=0.99)
    assert mom.widen("low") == pytest.approx(0.6) and mom.widen("high") == pytest.approx(0.975)
    mom.grid = [0.0, 0.2, 0.6]
    assert mom.widen("low") is None and mom.status(0.0) == "natural end"
    period = bo.Axis("factor_update_every", [1, 3, 10], lo=1, integer=True)
    assert period.widen("low") is None and period.widen("high") == 33
    clip = bo.Axis("kl_clip", [1e-4, 1e-3, None])
    assert clip.widen("high") is None and clip.status(None) == "natural end"
    assert clip.widen("low") == pytest.approx(1e-5)
    clip.insert(1e-5)
    assert clip.grid == [1e-5, 1e-4, 1e-3, None] and clip.status(1e-4) == "interior"


def _fake_run(bo, best_lr, calls):
    """Reaches accuracy 0.9 after ``100 (1 + |log2(lr / best_lr)|)`` steps; honours stop_at / max_steps."""
    def run(config, seed, stop_at=None, max_steps=math.inf, max_seconds=math.inf):
        calls.append(config["lr"])
        reach = 100 * (1 + abs(math.log2(config["lr"] / best_lr)))
        r = bo.RunResult("adamw", config, seed)
        for s in range(10, 1001, 10):
            acc = 0.9 if s >= reach else 0.5 * s / reach
            r.steps.append(s)
            r.acc.append(acc)
            r.seconds.append(0.01 * s)
            r.n_steps, r.step_seconds = s, 0.01 * s
            if stop_at is not None and acc >= stop_at:
                r.stopped = "target"
                break
            if s >= max_steps:
                r.stopped = "pruned"
                break
        return r

    return run


@pytest.mark.parametrize("max_widen, status", [(3, "edge"), (4, "interior")])
def test_search_widens_until_interior_and_prunes(bo, max_widen, status):
    calls = []
    search = bo.Search(_fake_run(bo, 3.2e-2, calls), seeds=[0, 1], target=[0.85], max_widen=max_widen,
                       log=lambda msg: None)
    axis = bo.Axis("lr", [1e-3, 2e-3, 4e-3])
    cur = search.stage({"lr": 2e-3}, axis, "steps")
    assert cur["lr"] == pytest.approx(3.2e-2)
    st = search.stages[-1]
    assert st["status"] == status and st["widened"] == max_widen
    assert st["grid"][-1] == pytest.approx(3.2e-2 if max_widen == 3 else 6.4e-2)
    runs = {(r["config"]["lr"], r["seed"]): r for r in search.records()}
    assert runs[(3.2e-2, 0)]["steps_to_target"] == 100 and runs[(3.2e-2, 0)]["stopped"] == "target"
    # 1e-3 (600 steps) ran after the incumbent 2e-3 (500 steps): its second seed may use 2 x 500 - 600
    assert runs[(1e-3, 0)]["stopped"] == "target"
    assert runs[(1e-3, 1)]["stopped"] == "pruned" and runs[(1e-3, 1)]["steps_run"] == 400
    if max_widen == 4:  # 6.4e-2 needs 200 steps on its first seed: the second can no longer win
        assert runs[(6.4e-2, 0)]["steps_to_target"] == 200 and (6.4e-2, 1) not in runs
    assert calls.count(2e-3) == 2  # the start ran first, unpruned


def test_step_cost_amortises_updates(bo):
    costs = {"adamw": {"plain": 1.0}, "kfac_expand": {"plain": 1.0, "factor": 5.0, "inverse": 2.0}}
    assert bo.step_cost(costs, "adamw", {}) == 1.0
    cfg = {"factor_update_every": 10, "inverse_update_every": 20}
    assert bo.step_cost(costs, "kfac_expand", cfg) == pytest.approx(1.0 + 0.5 + 0.1)


def test_quick_run_and_rerender_from_json(bo, tmp_path):
    result = bo.main(["--quick", "--tasks", "gnn", "--out", str(tmp_path), "--out-name", "q"])
    md = (tmp_path / "q.md").read_text()
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["schema"] == bo.SCHEMA and set(data["tasks"]["gnn"]["summary"]) == set(bo.OPTIMIZERS)
    assert not Path(data["meta"]["script"]).is_absolute()
    assert data["tasks"]["gnn"]["final"]["kfac_reduce"]["step_costs"]["factor"] >= 0
    assert result["tasks"]["gnn"]["target"]["val_acc"] == data["tasks"]["gnn"]["target"]["val_acc"]
    (tmp_path / "q.md").unlink()
    (tmp_path / "q.png").unlink()
    bo.main(["--from-json", str(tmp_path / "q.json")])
    assert (tmp_path / "q.md").read_text() == md and (tmp_path / "q.png").exists()
