"""The split of held-out blocks across ranks: each block to exactly one rank, batched once per run.

Its own module so that any evaluation can shard the same way without importing
``evaluate`` (and its Lightning set-up). Pure: reads the rank from
``torch.distributed`` only when iteration starts.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["ShardSampler", "StagedBatches"]


class ShardSampler(Sampler[int]):
    """Gives every block to exactly one rank; pads ranks with masked indices to equal length.

    The rank and world size are read when iteration starts, from
    ``torch.distributed`` if it is initialised, so one sampler serves a
    ``Trainer`` whose process group appears only inside ``validate``.
    """

    def __init__(self, n: int) -> None:
        self.n = n

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[int]:
        rank, world = self._rank_world()
        per_rank = -(-self.n // world)
        return iter(range(rank, per_rank * world, world))

    def __len__(self) -> int:
        _, world = self._rank_world()
        return -(-self.n // world)


class StagedBatches(Dataset):
    """This rank's batches of ``blocks``, built once on the evaluation device and reused by every trial.

    The blocks do not change between trials, so there is nothing to collate or
    copy to the device per batch: batch ``j`` is ``(ids, valid)``, exactly what a
    ``DataLoader(..., batch_size, sampler=ShardSampler(n))`` over per-block
    ``(block, 1)`` items (padding: ``(blocks[0], 0)``) would give, already on
    ``device()`` (Lightning's transfer of a tensor already there is a no-op). They
    are built at the first iteration, when the rank is known, and again only if
    the rank, world size or device change. Use with ``batch_size=None``.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, device: Callable[[], torch.device]) -> None:
        self.blocks, self.batch_size, self.device = blocks, batch_size, device
        self._key: tuple | None = None
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = ShardSampler._rank_world()
        dev = torch.device(self.device())
        if self._key != (rank, world, dev):
            n = self.blocks.shape[0]
            idx = torch.tensor(list(ShardSampler(n)), dtype=torch.int64)
            out = []
            for a in range(0, idx.numel(), self.batch_size):
                i = idx[a:a + self.batch_size]
                valid = (i < n).to(torch.int64)
                ids = self.blocks[torch.where(i < n, i, 0)]
                out.append((ids.to(dev), valid.to(dev)))
            self._batches, self._key = out, (rank, world, dev)
        return self._batches

    def __len__(self) -> int:
        return len(self.batches())

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches()[j]
