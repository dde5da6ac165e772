"""The tuning loop's small parts against closed forms: the random streams (the seed derivation
that keeps old runs reproducible), the learning-rate schedules, when an update is due, and the
marglik subset estimator (which examples, rescaling to N)."""

from __future__ import annotations

import math

import pytest
import torch

from marglik.tuning import Config
from marglik.tuning.estimator import MarglikSubset
from marglik.tuning.schedules import hyper_lr_factor, map_lr, marglik_update_due
from marglik.tuning.seeds import Stream, run_generators, stream_generator


@pytest.mark.parametrize("seed", [0, 3, 12345])
def test_streams_keep_the_seed_derivation(seed):
    # runs before the streams had names seeded generator k with seed * 7919 + k: keep those draws
    for k, stream in enumerate([Stream.data, Stream.aug, Stream.hyper, Stream.eval], start=1):
        expected = torch.randperm(50, generator=torch.Generator().manual_seed(seed * 7919 + k))
        assert torch.equal(torch.randperm(50, generator=stream_generator(seed, stream)), expected)
    gens = run_generators(seed)
    assert list(gens) == ["data", "aug", "hyper"]  # the checkpoint's generator keys
    draws = [torch.rand(4, generator=g) for g in gens.values()]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])  # independent


def test_map_lr_schedules():
    cfg = Config.from_dict(trainer={"epochs": 4, "lr": 0.1, "lr_min": 0.001, "schedule": "cosine"})
    t = cfg.trainer
    steps = 4 * 5
    assert map_lr(t, 0, 5) == pytest.approx(0.1)
    assert map_lr(t, steps // 2, 5) == pytest.approx(0.001 + 0.099 * 0.5)
    assert map_lr(t, steps, 5) == pytest.approx(0.001)
    assert map_lr(t, 10 * steps, 5) == pytest.approx(0.001)  # capped past the end (extended run)
    const = Config.from_dict(trainer={"epochs": 4, "lr": 0.1, "schedule": "constant"}).trainer
    assert {map_lr(const, s, 5) for s in (0, 7, steps)} == {0.1}


def test_hyper_lr_factor_and_update_epochs():
    cfg = Config.from_dict(trainer={"epochs": 10}, hyper={"burn_in": 2, "frequency": 3, "schedule": "cosine"})
    t, h = cfg.trainer, cfg.hyper
    assert hyper_lr_factor(t, h, 0) == 1.0 and hyper_lr_factor(t, h, 2) == 1.0  # burn-in: full lr
    assert hyper_lr_factor(t, h, 6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert hyper_lr_factor(t, h, 10) == pytest.approx(0.0, abs=1e-12)
    flat = Config.from_dict(hyper={"schedule": "constant"})
    assert hyper_lr_factor(flat.trainer, flat.hyper, 5) == 1.0
    due = [e for e in range(1, 11) if marglik_update_due(h, e)]
    assert due == [5, 8] and len(due) == cfg.marglik_updates()


def test_marglik_subset():
    cfg = Config.from_dict(trainer={"batch_size": 16}, hyper={"marglik_batches": 2, "marglik_batch_size": None})
    sub = MarglikSubset.from_config(cfg, 50)
    assert (sub.batch_size, sub.size) == (16, 32)
    gen = torch.Generator().manual_seed(0)
    batches = sub.index_batches(gen, torch.device("cpu"))
    idx = torch.cat(batches)
    assert [len(b) for b in batches] == [16, 16] and len(set(idx.tolist())) == 32  # without replacement
    assert torch.equal(idx, torch.randperm(50, generator=torch.Generator().manual_seed(0))[:32])
    assert not torch.equal(torch.cat(sub.index_batches(gen, torch.device("cpu"))), idx)  # fresh each fit
    assert sub.num_data(32, sharded=False) == 50  # a subset is rescaled to N
    assert "2 random batches of 16" in sub.describe() and "N=50" in sub.describe()

    whole = MarglikSubset.from_config(Config.from_dict(hyper={"marglik_batches": None, "marglik_batch_size": 20}), 50)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert torch.equal(torch.cat(whole.index_batches(gen, torch.device("cpu"))), torch.arange(50))
    assert torch.equal(gen.get_state(), state)  # the whole set draws nothing
    assert whole.num_data(50, sharded=False) is None and whole.num_data(25, sharded=True) == 50
    assert whole.describe() == "whole training set"
    big = MarglikSubset(10, 4, 8)
    assert big.size == 10  # never more than N
