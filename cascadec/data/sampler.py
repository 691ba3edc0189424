"""Deterministic, resumable, rank-sharded batches for the training loaders.

A checkpoint can only record *where* a run is in its data if the order of the data is a
pure function of something small. Here the order of an epoch is a function of
``(seed, phase, epoch)`` alone, so a resumed run skips the batches it already consumed
without loading them, and the same object shards each global batch across the ranks of a
distributed run (``DistributedSampler`` semantics, but batch-aligned so ranks stay in
lock-step and a global batch means the same images whatever the number of processes).

``data.batch_size`` is the *global* batch: with ``world_size`` processes each rank gets
``batch_size // world_size`` images of every batch, so a recipe trains the same way (same
learning rate, same number of steps) on one GPU or eight.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from cascadec.errors import UserError

__all__ = ["EpochBatchSampler", "position"]

# Distinct training phases draw distinct orders even at the same epoch number.
PHASES = {"teacher": 1, "importance": 2, "joint": 3, "student": 4, "heads": 5, "qat": 6}


class EpochBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch of one epoch, from ``start_batch`` on."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise UserError(
                f"data.batch_size {batch_size} must be divisible by the number of processes ({world_size}): "
                "it is the global batch, split evenly across ranks"
            )
        if batch_size // world_size < 1:
            raise UserError(f"data.batch_size {batch_size} is smaller than the number of processes ({world_size})")
        self.size, self.batch_size, self.seed, self.shuffle, self.drop_last = size, batch_size, seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.epoch, self.phase, self.start_batch = 0, 0, 0

    def set_epoch(self, epoch: int, phase: str = "joint", start_batch: int = 0) -> None:
        """Select the epoch's order; iteration starts at global batch ``start_batch``."""
        self.epoch, self.phase, self.start_batch = epoch, PHASES[phase], start_batch

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        # a fixed mixing of the three integers: same numbers, same permutation, on any machine
        seed = (self.seed * 1_000_003 + self.phase * 10_007 + self.epoch) % (2**63 - 1)
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        """Global batches per epoch (independent of ``start_batch``, so schedules can count steps)."""
        if self.drop_last:
            return self.size // self.batch_size
        return -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for batch in range(self.start_batch, len(self)):
            chunk = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            if len(chunk) < self.batch_size:
                # the last, short batch (drop_last off): ranks take equal slices, wrapping round
                chunk = torch.cat([chunk, order[: self.batch_size - len(chunk)]])
            yield chunk[self.rank * self.local_batch : (self.rank + 1) * self.local_batch].tolist()


def position(loader: DataLoader, epoch: int, phase: str, start_batch: int = 0) -> int:
    """Point ``loader`` at ``(phase, epoch)`` from ``start_batch``; returns the index of the
    first batch it will yield. Loaders built elsewhere (plain ``DataLoader``) keep their own
    order and cannot skip, so they always start at 0."""
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, EpochBatchSampler):
        sampler.set_epoch(epoch, phase, start_batch)
        return start_batch
    if start_batch:
        raise UserError("resuming mid-epoch needs the loaders built by cascadec.stages.make_loaders")
    return 0
