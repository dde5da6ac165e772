"""Data-parallel tuning: ``torchrun --nproc_per_node=2 -m marglik`` (gloo, CPU) is one job that
matches the single-process run with the same global batch and seed.

Tolerance: every number in history.csv and summary.json agrees within a relative 1e-4 or an
absolute 1e-5 (float32; the ranks sum gradients, factors and NLLs in another order, and those
rounding differences propagate through 2 epochs of Adam). In a similar 3-epoch run (marglik on
all 96 examples) the largest differences were 6e-8 relative on the log marginal likelihood
(1.5e-5 absolute) and 1e-7 absolute on the augmentation ranges.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from marglik.tuning import Config, MarglikTuner
from marglik.tuning.cost import TIMING_COLUMNS
from marglik.tuning.reporting import read_history

REPO = Path(__file__).resolve().parents[1]
TIMING = TIMING_COLUMNS
OVERRIDES = [
    "data.train_size=96", "data.rotation=30", "model.width=4", "model.hidden=16", "trainer.epochs=2",
    "trainer.batch_size=32", "hyper.burn_in=1", "hyper.n_samples=2", "hyper.marglik_batches=2",
    "hyper.marglik_batch_size=32", "hyper.selection=subset", "hyper.selection_size=50", "trainer.device=cpu", "trainer.num_threads=1", "trainer.progress=false",
    # the type-2 GGN: deterministic given the data, so 2 ranks equal 1 process (an MC Fisher samples each
    # rank's labels from that rank's generator: the same distribution, not the same draw)
    "curvature.fisher_type=type-2",
    # two hypersteps: after one Adam step every log prior moved by the same lr, and the argmax of the change
    # (history.log_prior_change_argmax) would be a tie broken by round-off
    "hyper.steps=2",
    "logger.mode=disabled",
]
REL, ABS = 1e-4, 1e-5


def _close(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=REL, abs_tol=ABS), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_gloo_ranks_match_one_process(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "marglik", *OVERRIDES, f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("marglik: wrote summary.json") == 1  # rank 0 alone reports and writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert not (run / ".marglik.lock").exists()  # rank 0 held the run directory and let go
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2

    with initialize_config_module(config_module="marglik.conf", version_base="1.3"):
        cfg = Config.from_dict(OmegaConf.to_container(compose("config", overrides=OVERRIDES), resolve=True))
    n = torch.get_num_threads()
    try:
        ref = MarglikTuner(cfg, tmp_path / "single").fit()
    finally:
        torch.set_num_threads(n)
    assert ref["world_size"] == 1
    skip = {"seconds", "seconds_this_segment", "seconds_per_marglik_step", "seconds_per_cached_hyperstep",
            "seconds_per_selection", "cost",  # timings (the cost split is timings throughout)
            "world_size"}
    _close({k: v for k, v in summary.items() if k not in skip},
           json.loads(json.dumps({k: v for k, v in ref.items() if k not in skip})), "summary")
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in read_history(run / "history.csv")]
    ref_rows = [{k: v for k, v in r.items() if k not in TIMING}
                for r in read_history(tmp_path / "single" / "history.csv")]
    assert [r["epoch"] for r in rows] == [1, 2]
    _close(rows, ref_rows, "history")
    assert rows[-1]["aug_rotation"] > 0 and rows[-1]["log_marglik"] is not None  # eta and the marglik moved
    assert summary["selection_estimator"].startswith("subset: fixed 50 of N=96")  # sharded like the hyperstep


def _rollback_worker(rank, init_file, out_dir):
    import torch.distributed as dist_
    from test_tuning import tiny

    dist_.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    t = MarglikTuner(tiny(trainer={"epochs": 3}), f"{out_dir}/rank{rank}")  # the tuner joins this group
    orig, calls = t.parts.map_step.loss, {"n": 0}

    def flaky(x, y, n_global=None):
        calls["n"] += 1
        loss, nll, out = orig(x, y, n_global=n_global)
        if calls["n"] == 5 and rank == 0:  # a non-finite loss on one rank only
            loss = loss * float("nan")
        return loss, nll, out

    t.parts.map_step.loss = flaky
    s = t.fit()
    torch.save({"rollbacks": s["rollbacks"], "rollback_events": s["rollback_events"], "log_prior": t.log_prior.detach(),
                "eta": t.aug.eta.detach(),
                "world_size": s["world_size"]}, f"{out_dir}/rank{rank}.pt")
    if dist_.is_initialized():
        dist_.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_rollback_on_one_rank_is_taken_by_all(tmp_path):
    """A non-finite loss on rank 0 only: both ranks roll back together (no hang, no divergence)."""
    import torch.multiprocessing as mp

    mp.spawn(_rollback_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["rollbacks"] == r1["rollbacks"] == 1
    assert len(r0["rollback_events"]) == len(r1["rollback_events"]) == 1
    assert r0["rollback_events"][0]["where"] == "MAP step, batch 2/3"
    assert torch.equal(r0["log_prior"], r1["log_prior"]) and torch.equal(r0["eta"], r1["eta"])
    assert not (tmp_path / "rank1").exists()  # rank 1 writes nothing
