"""The sampler that splits held-out blocks across ranks: each block to exactly one rank.

Its own module so that any evaluation can shard the same way without importing
``evaluate`` (and its Lightning set-up). Pure: reads the rank from
``torch.distributed`` only when iteration starts.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ShardSampler"]


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
