"""The paper's recipe, ``marglik +experiment=cifar10_wrn16_4``, end to end on the CPU with a tiny slice.

No network and no CIFAR-10 files here: the test writes a miniature data set in the exact on-disk format
that ``torchvision.datasets.CIFAR10`` reads (``cifar-10-batches-py/data_batch_{1..5}``, ``test_batch``,
``batches.meta``: pickled dicts, images as rows of 3 x 32 x 32 uint8 in CHW order). torchvision checks
the official files' MD5 sums, which generated files cannot have, so that check alone is patched out;
everything else runs as on the real data: the experiment's config (Fixup WRN-16-4, SGD + cosine,
layerwise prior, learned augmentation, marglik on batches of a subset) with only the sizes shrunk.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from hydra_config import compose_config

from marglik.cli import run_from_config

torchvision = pytest.importorskip("torchvision")


def _write_fake_cifar10(root, n_per_batch: int = 8, n_test: int = 20, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n):
        labels = rng.integers(0, 10, size=n)
        # a class-dependent mean colour, so the network has something to learn
        data = np.clip(rng.normal(100, 40, size=(n, 3 * 32 * 32)) + 10 * labels[:, None], 0, 255).astype(np.uint8)
        return {"data": data, "labels": labels.tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def test_cifar10_wrn16_4_recipe_runs_end_to_end_on_a_tiny_slice(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    _write_fake_cifar10(tmp_path / "data")
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # MD5 of the official files only
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    cfg = compose_config([
        "+experiment=cifar10_wrn16_4", f"data.root={tmp_path / 'data'}", "data.train_size=16",
        "trainer.epochs=2", "trainer.batch_size=16", "trainer.eval_every=1", "trainer.eval_batch_size=20",
        "hyper.burn_in=1", "hyper.frequency=1", "hyper.steps=1", "hyper.n_samples=2",
        "hyper.marglik_batches=2", "hyper.marglik_batch_size=4", "trainer.device=cpu",
        "trainer.progress=false", "logger.mode=disabled", "trainer.num_threads=1",
    ])
    run = tmp_path / "run"
    s = run_from_config(cfg, str(run))
    saved = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    # the experiment's choices reached the run, not the defaults
    assert saved["model"] == "wrn16_4" and saved["data"] == "cifar10" and saved["num_params"] > 2.7e6
    assert config["model"]["kwargs"]["norm"] == "fixup" and config["trainer"]["optimizer"] == "sgd"
    assert config["hyper"]["batchwise"] is True  # the fit's gradient one batch at a time (memory)
    assert saved["prior_structure"] == "layerwise" and saved["augmentation_learned"]
    assert saved["epochs"] == 2 and saved["train_size"] == 16 and saved["test_size"] == 20
    assert s["test_accuracy"] == saved["test_accuracy"] and saved["n_hypersteps"] == 1
    # one hyperstep ran (epoch 2, after one burn-in epoch) and moved the layerwise prior and the ranges
    hist = (run / "history.csv").read_text().splitlines()
    assert len(hist) == 3  # header + two epochs
    prec = saved["prior_precision_by_name"]
    assert len(prec) > 10 and all(np.isfinite(v) and v > 0 for v in prec.values())
    assert len(set(round(v, 12) for v in prec.values())) > 1  # layerwise: not one shared value
    assert np.isfinite(saved["log_marglik"]) and 0.0 <= saved["test_accuracy"] <= 1.0
    assert any(v != pytest.approx(0.0) for v in saved["augmentation"].values())
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_the_published_recipe_is_pinned_and_the_lean_one_uses_the_default_protocol():
    """``cifar10_wrn16_4`` keeps the papers' protocol whatever the shipped defaults are;
    ``cifar10_wrn16_4_lean`` is the same setting under the default job's protocol (issue #28)."""
    from omegaconf import OmegaConf

    from marglik.tuning import Config

    def cfg(name):
        return Config.from_dict(OmegaConf.to_container(compose_config([f"+experiment={name}"]), resolve=True))

    pub, lean, default = cfg("cifar10_wrn16_4"), cfg("cifar10_wrn16_4_lean"), Config()
    assert (pub.hyper.train_samples, pub.hyper.selection, pub.hyper.selection_every, pub.hyper.schedule) == \
        (None, "full", 1, "constant")
    assert (pub.curvature.fisher_type, pub.hyper.steps, pub.hyper.n_samples, pub.hyper.batchwise) == \
        ("type-2", 20, 16, True)
    for c in (pub, lean):  # the same network, data and MAP training
        assert (c.model.name, c.data.name, c.trainer.epochs, c.trainer.optimizer, c.trainer.lr) == \
            ("wrn16_4", "cifar10", 100, "sgd", 0.1)
    for key in ("train_samples", "steps", "frequency", "schedule", "selection", "selection_every", "n_samples",
                "aug_lr"):
        assert getattr(lean.hyper, key) == getattr(default.hyper, key), key
    assert lean.curvature.fisher_type == default.curvature.fisher_type == "mc-root" and not lean.hyper.batchwise
