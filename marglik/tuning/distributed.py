"""Data parallelism of a tuning run over ``torch.distributed`` ranks (``torchrun``).

One job over ``K`` ranks (``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` as set by ``torchrun``):

* every rank holds the whole (small) data set and draws the same permutations and augmentation
  noise (identical seeded generators); each *global* batch of ``B`` examples is split into ``K``
  contiguous shards (:meth:`DistContext.shard`), so the run sees the same batches as a
  single-process run with batch size ``B``;
* MAP steps run under :class:`torch.nn.parallel.DistributedDataParallel` (``gloo`` on CPU,
  ``nccl`` on CUDA); each rank's loss is its shard's summed NLL times ``K / B`` (plus the prior
  term), so DDP's gradient *average* is the gradient of the global batch mean even for unequal
  shards;
* the K-FAC factors, example counts and summed NLL of a Laplace fit are all-reduced
  (:meth:`marglik.KFAC.result`), so the log marginal likelihood is the global one on every rank.
  Its gradient with respect to the prior precision depends on the data only through those
  reduced sums and is therefore the same on every rank; its gradient with respect to the
  augmentation ranges ``eta`` is a sum of per-shard contributions (each rank back-propagates into
  its own shard) and is all-reduced (:meth:`DistContext.sum_`). The hyperparameters are then
  broadcast from rank 0, so they are identical on every rank;
* rank 0 alone writes the run directory, the checkpoints and W&B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor


def _env_int(name: str, default: int) -> int:
    """Integer environment variable ``name`` as set by ``torchrun``; ``default`` if unset or not an integer."""
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        return default


def env_world_size() -> int:
    """The number of processes of the job.

    Returns:
        ``WORLD_SIZE`` from the environment (1 when not launched by ``torchrun``).
    """
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """This process's rank.

    Returns:
        ``RANK`` from the environment (0 when not launched by ``torchrun``).
    """
    return _env_int("RANK", 0)


@dataclass
class DistContext:
    """Rank, world size and the collectives the tuner uses; all no-ops for one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  #: this object initialised the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """This process is rank 0 (the one that writes files and logs)."""
        return self.rank == 0

    @classmethod
    def setup(cls, device_spec: str) -> "DistContext":
        """Join the process group: an existing one (e.g. initialised by the caller), or a new one
        from ``torchrun``'s environment (``nccl`` if the run uses CUDA, else ``gloo``); a single
        process otherwise.

        Args:
            device_spec: ``trainer.device`` (``"cpu"`` forces ``gloo``).

        Returns:
            The context (``owns_group`` when it initialised the process group).
        """
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        if env_world_size() <= 1 or not dist.is_available():
            return cls()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device_spec != "cpu"
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
        return cls(dist.get_rank(), dist.get_world_size(), local, owns_group=True)

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank.

        Args:
            device: the resolved ``trainer.device``.

        Returns:
            ``cuda:<local rank>`` for an unindexed CUDA device under ``torchrun``, else ``device``.
        """
        if self.enabled and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a global batch.

        Args:
            n: the global batch size.

        Returns:
            A slice of ``n // world_size`` or one more examples (the first ``n % world_size``
            ranks get one more); ``slice(0, n)`` for one process.
        """
        if not self.enabled:
            return slice(0, n)
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return slice(lo, lo + base + (1 if self.rank < extra else 0))

    def sum_(self, t: Tensor) -> Tensor:
        """In-place all-reduce (sum) over ranks.

        Args:
            t: a tensor without autograd history.

        Returns:
            ``t``, now the sum over ranks (unchanged for one process).
        """
        if self.enabled:
            dist.all_reduce(t)
        return t

    def broadcast_(self, t: Tensor) -> Tensor:
        """In-place broadcast from rank 0.

        Args:
            t: a tensor without autograd history.

        Returns:
            ``t``, now rank 0's values.
        """
        if self.enabled:
            dist.broadcast(t, 0)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's object on every rank (pickled; for the resume state and the run directory).

        Args:
            obj: the object (only rank 0's is used).

        Returns:
            Rank 0's ``obj``.
        """
        if not self.enabled:
            return obj
        box: List[Optional[Any]] = [obj if self.is_main else None]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
