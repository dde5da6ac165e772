"""Datasets: image classification benchmarks (optionally rotated / translated / upsampled) and a
generated graph-classification task.

Image datasets are returned as ``TensorDataset(X, y)`` with ``X`` of shape ``(N, C, H, W)``
(float32) and ``y`` of shape ``(N,)`` (int64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from .compat import check_torchvision
from .errors import DataSizeError, DataUnavailableError, one_line

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")

# per-channel mean / std used to normalise the torchvision datasets (computed on the train sets)
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_DIGITS_TRAIN = 1437  # of 1797 images; the remaining 360 form the test set
_STREAM_SPLIT, _STREAM_SUBSET, _STREAM_TRAIN_WARP, _STREAM_TEST_WARP = range(4)


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent random streams per purpose, so e.g. ``train_size`` does not change angles."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stream)


def _affine(x: Tensor, angle: Tensor, shift: Tensor, chunk: int = 4096) -> Tensor:
    """Rotate ``x (N, C, H, W)`` by ``angle (N,)`` radians and shift by ``shift (N, 2)`` pixels
    (x, y); bilinear, zero padding, ``align_corners=False``. Returns ``(N, C, H, W)``."""
    n, c, h, w = x.shape
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 2] = shift[:, 0] * 2 / w  # pixels -> normalised coordinates
    theta[:, 1, 2] = shift[:, 1] * 2 / h
    out = torch.empty_like(x)
    for i in range(0, n, chunk):
        th = theta[i : i + chunk].to(x)
        grid = F.affine_grid(th, [th.shape[0], c, h, w], align_corners=False)
        out[i : i + chunk] = F.grid_sample(x[i : i + chunk], grid, padding_mode="zeros", align_corners=False)
    return out


def random_affine(
    x: Tensor, rotation: float = 0.0, translation: float = 0.0, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Rotate / translate every image of ``x (N, C, H, W)`` by its own random amount.

    Angles are uniform in ``[-rotation, rotation]`` degrees, shifts (x and y independently)
    uniform in ``[-translation, translation]`` pixels. Returns ``(N, C, H, W)``.
    """
    n = x.shape[0]
    angle_u = torch.rand(n, generator=generator)
    shift_u = torch.rand(n, 2, generator=generator)
    return _warp_from_uniform(x, angle_u, shift_u, rotation, translation)


def _warp_from_uniform(x: Tensor, angle_u: Tensor, shift_u: Tensor, rotation: float, translation: float) -> Tensor:
    """Warp with pre-drawn ``U[0, 1]`` variables ``angle_u (N,)`` and ``shift_u (N, 2)``."""
    angle = (2 * angle_u - 1) * math.radians(rotation)
    shift = (2 * shift_u - 1) * translation
    return _affine(x, angle, shift)


def _upsample(x: Tensor, size: Optional[int]) -> Tensor:
    if size is None or size == x.shape[-1]:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _load_digits() -> Tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.long)


def _load_torchvision(name: str, root: str, train: bool, download: bool) -> Tuple[Tensor, Tensor]:
    """``(uint8 images (n, C, H, W), labels (n,))`` of a torchvision dataset.

    Raises:
        DataUnavailableError: the files are missing (and ``download`` is off), or the download failed.
        IncompatibleInstallError: torchvision does not match torch.
    """
    check_torchvision()
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        ds = cls(root=root, train=train, download=download)
    except Exception as e:  # missing files: RuntimeError; offline: URLError / OSError; a failed mirror: RuntimeError
        where = str(Path(root).expanduser().resolve())
        if not download:
            raise DataUnavailableError(
                f"{name} not found under data.root={where}: set data.download=true to fetch it (needs the network), "
                "or data.root=<a folder holding the torchvision files>"
            ) from e
        reason = one_line(str(getattr(e, "reason", "") or e).splitlines()[0] if str(e) else type(e).__name__)
        raise DataUnavailableError(
            f"could not download {name} into data.root={where} ({type(e).__name__}: {reason}): no network here? "
            "Download it on a machine with one and copy the folder to data.root, then run with data.download=false"
        ) from e
    x = torch.as_tensor(np.asarray(ds.data))  # uint8; converted to float after subsetting
    x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.unsqueeze(1)  # CIFAR: NHWC; MNIST: NHW
    return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)


def load_dataset(
    name: str,
    root: str = "data",
    download: bool = False,
    train_size: Optional[int] = None,
    rotation: float = 0.0,
    translation: float = 0.0,
    upsample: Optional[int] = None,
    seed: int = 0,
) -> Tuple[TensorDataset, TensorDataset, Dict[str, Any]]:
    """Load an image classification dataset.

    Args:
        name: ``"digits"`` (scikit-learn's 8x8 digits, 1797 images, bundled: no download),
            ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"`` (torchvision files under ``root``).
        root: folder of the torchvision files.
        download: let torchvision download missing files. Without it, missing files raise
            :class:`~marglik.errors.DataUnavailableError` (a ``FileNotFoundError``); so does a
            failed download.
        train_size: if given, a random subset (seeded by ``seed``) of this many training images.
        rotation: rotate every image (train and test) by its own fixed angle, uniform in
            ``[-rotation, rotation]`` degrees (seeded by ``seed``).
        translation: shift every image by its own fixed amount, uniform in ``[-translation,
            translation]`` pixels (of the final, upsampled resolution) along each axis.
        upsample: resize images to ``upsample x upsample`` (bilinear) before warping.
        seed: seeds the subset and the per-image warps (independent streams: the warp of an
            image does not depend on ``train_size``).

    Pixel values: ``digits`` in ``[0, 1]``; the torchvision datasets are normalised per channel
    (warps are applied before normalisation, so padding is black). The ``digits`` train / test
    split (1437 / 360) is fixed, independent of ``seed``; the torchvision test sets are complete.

    Returns:
        ``(train, test, info)``: ``TensorDataset(X (n, C, H, W), y (n,))`` each, and ``info`` with
        keys ``name, in_channels, num_classes, image_size, train_size, test_size``.

    Raises:
        DataUnavailableError: torchvision files missing (without ``download``) or not downloadable.
        DataSizeError: ``train_size`` larger than the training set.
        IncompatibleInstallError: a torchvision data set, and torchvision does not match torch.
        ValueError: an unknown ``name``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if name == "digits":
        x, y = _load_digits()
        perm = torch.randperm(len(x), generator=_generator(0, _STREAM_SPLIT))
        xtr, ytr = x[perm[:_DIGITS_TRAIN]], y[perm[:_DIGITS_TRAIN]]
        xte, yte = x[perm[_DIGITS_TRAIN:]], y[perm[_DIGITS_TRAIN:]]
    else:
        xtr, ytr = _load_torchvision(name, root, True, download)
        xte, yte = _load_torchvision(name, root, False, download)
    n_train_full = len(xtr)
    idx = torch.arange(n_train_full)
    if train_size is not None:
        if not 0 < train_size <= n_train_full:
            raise DataSizeError(f"data.train_size={train_size}: {name} has {n_train_full} training images; "
                                f"allowed: an integer in [1, {n_train_full}] or null (all)")
        idx = torch.randperm(n_train_full, generator=_generator(seed, _STREAM_SUBSET))[:train_size]
        xtr, ytr = xtr[idx], ytr[idx]

    def transform(x: Tensor, stream: int, index: Tensor, n_full: int) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = _upsample(x, upsample)
        if rotation or translation:
            # draw warps for the full split, then pick this subset's, so they don't depend on it
            gen = _generator(seed, stream)
            angle_u = torch.rand(n_full, generator=gen)[index]
            shift_u = torch.rand(n_full, 2, generator=gen)[index]
            x = _warp_from_uniform(x, angle_u, shift_u, rotation, translation)
        if name in _STATS:
            mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _STATS[name])
            x = (x - mean) / std
        return x.contiguous()

    xtr = transform(xtr, _STREAM_TRAIN_WARP, idx, n_train_full)
    xte = transform(xte, _STREAM_TEST_WARP, torch.arange(len(xte)), len(xte))
    info = {
        "name": name,
        "in_channels": xtr.shape[1],
        "num_classes": 10,
        "image_size": xtr.shape[-1],
        "train_size": len(xtr),
        "test_size": len(xte),
    }
    return TensorDataset(xtr, ytr), TensorDataset(xte, yte), info


# --------------------------------------------------------------------------------------------
# Generated graph classification
# --------------------------------------------------------------------------------------------


@dataclass
class Graph:
    """One graph: node features ``x (n, F)``, directed edges ``edge_index (2, E)`` (every undirected
    edge stored in both directions) and its label ``y``."""

    x: Tensor
    edge_index: Tensor
    y: int

    @property
    def num_nodes(self) -> int:
        """Number of nodes ``T`` of the graph."""
        return self.x.shape[0]


class GraphBatch(NamedTuple):
    """Stacked graphs: ``x (T, F)``, ``edge_index (2, E)`` (node ids offset per graph), ``batch
    (T,)`` graph id of every node and ``num_graphs`` ``N``. ``model(*graph_batch)`` calls
    :class:`marglik.models.GNN`."""

    x: Tensor
    edge_index: Tensor
    batch: Tensor
    num_graphs: int

    def to(self, device: Any) -> "GraphBatch":
        """A copy with every tensor on ``device``."""
        return GraphBatch(self.x.to(device), self.edge_index.to(device), self.batch.to(device), self.num_graphs)


def has_hub_edge(edge_index: Tensor, num_nodes: int, hub_degree: int = 3) -> bool:
    """Ground truth of the graph task: is there an edge between two *hubs* (nodes of degree
    ``>= hub_degree``)? ``edge_index (2, E)`` holds both directions of every undirected edge."""
    deg = torch.bincount(edge_index[1], minlength=num_nodes)
    hub = deg >= hub_degree
    return bool((hub[edge_index[0]] & hub[edge_index[1]]).any())


def make_graph_dataset(
    num_graphs: int,
    seed: int = 0,
    min_nodes: int = 6,
    max_nodes: int = 14,
    num_features: int = 1,
    hub_degree: int = 3,
    mean_degree: Tuple[float, float] = (1.0, 3.0),
) -> List[Graph]:
    """Random graphs labelled by :func:`has_hub_edge` (binary, exactly balanced).

    Graphs are Erdos-Renyi with ``n`` nodes (``min_nodes <= n <= max_nodes``) and edge
    probability ``d / (n - 1)``, ``d ~ U[mean_degree]``. Candidates are drawn (rejection
    sampling) until every node count ``n`` holds (as nearly as possible) the same number of graphs
    of each class, so classes are balanced overall *and* within every graph size; the list is
    then shuffled. Node features are a constant ``1`` followed by ``num_features - 1`` irrelevant
    standard-normal noise features.

    Why this is a fair test of a message-passing network: the label is a deterministic function
    of the graph structure only; the node features carry no information and, thanks to the
    per-size balancing, neither does the node count, so a model without message passing is at
    chance (50%). Edge density does correlate with the label, but seeing it already needs
    neighbour aggregation. And the label is computable by two rounds of
    1-WL colour refinement (round 1 gives every node its degree, round 2 whether a hub has a hub
    neighbour), so a GIN-style network with sum aggregation (:class:`marglik.models.GNN`) can
    represent it exactly (Xu et al. 2019), and a sum/mean readout detects whether any node fires.

    Returns a list of :class:`Graph` (a valid map-style dataset for ``DataLoader``).
    """
    if num_graphs < 2:
        raise ValueError("num_graphs must be >= 2")
    if min_nodes < 2 or max_nodes < min_nodes:
        raise ValueError("need 2 <= min_nodes <= max_nodes")
    rng = np.random.default_rng(seed)
    sizes = list(range(min_nodes, max_nodes + 1))
    # quota[k][c]: graphs of class c with sizes[k] nodes, spread as evenly as possible
    quota = np.zeros((len(sizes), 2), dtype=np.int64)
    for c, total in enumerate((num_graphs - num_graphs // 2, num_graphs // 2)):
        quota[:, c] = total // len(sizes)
        quota[: total % len(sizes), c] += 1
    graphs: List[Graph] = []
    while quota.sum() > 0:
        k = int(rng.choice(np.flatnonzero(quota.sum(1) > 0)))
        n = sizes[k]
        p = rng.uniform(*mean_degree) / (n - 1)
        src, dst = np.nonzero(np.triu(rng.random((n, n)) < p, k=1))
        ei = torch.as_tensor(np.stack([np.concatenate([src, dst]), np.concatenate([dst, src])]), dtype=torch.long)
        y = int(has_hub_edge(ei, n, hub_degree))
        if quota[k, y] == 0:
            continue
        quota[k, y] -= 1
        x = torch.ones(n, num_features)
        if num_features > 1:
            x[:, 1:] = torch.as_tensor(rng.standard_normal((n, num_features - 1)), dtype=torch.float32)
        graphs.append(Graph(x, ei, y))
    order = rng.permutation(len(graphs))
    return [graphs[i] for i in order]


def collate_graphs(graphs: Sequence[Graph]) -> Tuple[GraphBatch, Tensor]:
    """Stack graphs into ``(GraphBatch(x (T, F), edge_index (2, E), batch (T,), N), y (N,))``;
    usable as ``DataLoader(..., collate_fn=collate_graphs)``."""
    sizes = torch.tensor([g.num_nodes for g in graphs])
    offsets = torch.cumsum(sizes, 0) - sizes
    x = torch.cat([g.x for g in graphs])
    edge_index = torch.cat([g.edge_index + int(o) for g, o in zip(graphs, offsets)], dim=1)
    batch = torch.repeat_interleave(torch.arange(len(graphs)), sizes)
    y = torch.tensor([g.y for g in graphs], dtype=torch.long)
    return GraphBatch(x, edge_index, batch, len(graphs)), y


def graph_loader(graphs: Sequence[Graph], batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A ``DataLoader`` yielding ``(GraphBatch, y)`` batches (seeded shuffling)."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(list(graphs), batch_size=batch_size, shuffle=shuffle, collate_fn=collate_graphs, generator=gen)
