"""Dataset loading (digits only: never downloads), warps, and the generated graph task."""

from __future__ import annotations

import pytest
import torch

from marglik.data import (
    GraphBatch,
    collate_graphs,
    graph_loader,
    has_hub_edge,
    load_dataset,
    make_graph_dataset,
    random_affine,
)
from marglik.errors import DataSizeError, DataUnavailableError, UserError
from marglik.models import GNN


def test_digits_basic():
    train, test, info = load_dataset("digits")
    assert info["in_channels"] == 1 and info["num_classes"] == 10 and info["image_size"] == 8
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.long
    assert xtr.min() >= 0 and xtr.max() <= 1 and xtr.max() > 0.99
    assert set(ytr.tolist()) == set(range(10)) and set(yte.tolist()) == set(range(10))
    # the split is fixed, independent of seed
    train2, test2, _ = load_dataset("digits", seed=3)
    assert torch.equal(test2.tensors[0], xte) and torch.equal(train2.tensors[0], xtr)


def test_digits_subset_and_upsample():
    train, test, info = load_dataset("digits", train_size=100, upsample=16, seed=1)
    assert train.tensors[0].shape == (100, 1, 16, 16) and len(test) == 360
    assert info["image_size"] == 16 and info["train_size"] == 100
    again, _, _ = load_dataset("digits", train_size=100, upsample=16, seed=1)
    other, _, _ = load_dataset("digits", train_size=100, upsample=16, seed=2)
    assert torch.equal(again.tensors[0], train.tensors[0])
    assert not torch.equal(other.tensors[1], train.tensors[1])
    with pytest.raises(DataSizeError, match=r"data.train_size=5000: digits has 1437 training images"):
        load_dataset("digits", train_size=5000)
    assert issubclass(DataSizeError, (UserError, ValueError)) and issubclass(DataSizeError, ValueError)


def test_rotated_digits_reproducible_and_different():
    plain_tr, plain_te, _ = load_dataset("digits")
    rot_tr, rot_te, _ = load_dataset("digits", rotation=90.0, seed=0)
    rot_tr2, rot_te2, _ = load_dataset("digits", rotation=90.0, seed=0)
    rot_tr3, _, _ = load_dataset("digits", rotation=90.0, seed=1)
    assert torch.equal(rot_tr.tensors[0], rot_tr2.tensors[0]) and torch.equal(rot_te.tensors[0], rot_te2.tensors[0])
    assert not torch.allclose(rot_tr.tensors[0], rot_tr3.tensors[0])
    diff = (rot_tr.tensors[0] - plain_tr.tensors[0]).flatten(1).abs().sum(1)
    assert (diff > 1e-3).float().mean() > 0.95  # (almost) every image changed
    assert (rot_te.tensors[0] - plain_te.tensors[0]).abs().max() > 0.1
    assert torch.equal(rot_tr.tensors[1], plain_tr.tensors[1])  # labels untouched
    # a subset gets exactly the warps its images have in the full set
    sub, _, _ = load_dataset("digits", rotation=90.0, translation=1.0, seed=0, train_size=50)
    full, _, _ = load_dataset("digits", rotation=90.0, translation=1.0, seed=0)
    rows = (sub.tensors[0].flatten(1)[:, None] == full.tensors[0].flatten(1)[None]).all(-1).any(1)
    assert rows.all()


def test_translation_shifts_by_pixels():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 3] = 1.0
    gen = torch.Generator().manual_seed(0)
    out = random_affine(x, translation=2.0, generator=gen)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert abs(out.sum().item() - 1.0) < 1e-5  # pure (sub-pixel) shift inside the image keeps mass
    assert torch.allclose(random_affine(x), x, atol=1e-6)  # zero ranges: identity


def test_torchvision_missing_files_raise(tmp_path):
    for name in ("mnist", "fashion_mnist", "cifar10"):
        with pytest.raises(DataUnavailableError, match="set data.download=true") as err:
            load_dataset(name, root=str(tmp_path), download=False)
        assert isinstance(err.value, FileNotFoundError) and "\n" not in str(err.value)
        assert str(err.value).startswith(f"{name} not found under data.root={tmp_path}")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_failed_download_is_one_line_naming_the_fix(tmp_path, monkeypatch, name):
    """Offline, simulated: every URL open fails as without a network (nothing leaves the machine)."""
    import urllib.error
    import urllib.request

    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution (simulated)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataUnavailableError) as err:
        load_dataset(name, root=str(tmp_path / "data"), download=True)
    msg = str(err.value)
    assert calls, "the download was not attempted"  # positive control: the failure is the simulated one
    assert msg.startswith(f"could not download {name} into data.root=") and "\n" not in msg
    assert "data.download=false" in msg and "Traceback" not in msg
    with pytest.raises(ValueError):
        load_dataset("imagenet")


def _ground_truth(edge_index: torch.Tensor, n: int) -> bool:
    """Independent check via the dense adjacency matrix: hub^T A hub > 0."""
    adj = torch.zeros(n, n)
    adj[edge_index[0], edge_index[1]] = 1.0
    hub = (adj.sum(1) >= 3).float()
    return bool(hub @ adj @ hub > 0)


def test_graph_dataset_balanced_and_correct():
    graphs = make_graph_dataset(300, seed=0, num_features=3)
    assert len(graphs) == 300 and sum(g.y for g in graphs) == 150
    by_size = {}
    for g in graphs:
        n = g.num_nodes
        assert 6 <= n <= 14 and g.x.shape == (n, 3)
        assert torch.all(g.x[:, 0] == 1)
        ei = g.edge_index
        # undirected: both directions stored, no self loops
        assert torch.all(ei[0] != ei[1])
        assert set(map(tuple, ei.T.tolist())) == set(map(tuple, ei.flip(0).T.tolist()))
        assert g.y == int(_ground_truth(ei, n)) == int(has_hub_edge(ei, n))
        by_size.setdefault(n, [0, 0])[g.y] += 1
    assert all(abs(c0 - c1) <= 1 for c0, c1 in by_size.values())  # balanced within each size
    again = make_graph_dataset(300, seed=0, num_features=3)
    assert all(torch.equal(a.edge_index, b.edge_index) and a.y == b.y for a, b in zip(graphs, again))
    odd = make_graph_dataset(7, seed=1)
    assert len(odd) == 7 and sum(g.y for g in odd) == 3


def test_collate_and_loader():
    graphs = make_graph_dataset(10, seed=0)
    gb, y = collate_graphs(graphs[:3])
    assert isinstance(gb, GraphBatch) and gb.num_graphs == 3 and y.shape == (3,)
    sizes = [g.num_nodes for g in graphs[:3]]
    assert gb.x.shape == (sum(sizes), 1) and gb.batch.tolist() == sum(([i] * n for i, n in enumerate(sizes)), [])
    # edges stay inside their graph
    assert torch.equal(gb.batch[gb.edge_index[0]], gb.batch[gb.edge_index[1]])
    assert gb.edge_index.shape[1] == sum(g.edge_index.shape[1] for g in graphs[:3])
    model = GNN(1, 8, 2)
    batches = list(graph_loader(graphs, batch_size=4, shuffle=True, seed=0))
    assert [b[1].shape[0] for b in batches] == [4, 4, 2]
    assert model(*batches[0][0].to("cpu")).shape == (4, 2)


def test_torchvision_path_with_fake_dataset(monkeypatch):
    """The torchvision branch (NHWC uint8 -> normalised NCHW, subset, warps) on fake in-memory data."""
    import numpy as np
    import torchvision

    class FakeCIFAR:
        def __init__(self, root, train, download):
            n = 50 if train else 20
            rng = np.random.default_rng(0 if train else 1)
            self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
            self.targets = list(rng.integers(0, 10, size=n))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    train, test, info = load_dataset("cifar10", train_size=10, rotation=30.0, seed=0)
    assert train.tensors[0].shape == (10, 3, 32, 32) and test.tensors[0].shape == (20, 3, 32, 32)
    assert info == {"name": "cifar10", "in_channels": 3, "num_classes": 10, "image_size": 32,
                    "train_size": 10, "test_size": 20}
    _, plain_test, _ = load_dataset("cifar10")
    x = plain_test.tensors[0]
    raw = torch.as_tensor(FakeCIFAR("", False, False).data).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
