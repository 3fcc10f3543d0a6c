"""Shuffling that a resumed run repeats exactly: one permutation per (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data.dataloader import _BaseDataLoaderIter


class EpochShuffleSampler(DistributedSampler):
    """A random permutation that depends only on ``seed`` and the epoch set by Lightning.

    Unlike a sampler driven by a stateful generator, epoch ``e`` is the same permutation in a
    resumed run. Under data parallelism (``num_replicas`` ranks), rank ``r`` takes every
    ``num_replicas``-th index of that same permutation, so the ranks' batches of step ``k``
    together are exactly the one-rank batch of step ``k`` at ``num_replicas`` times the batch
    size, whatever the seed. A ``DistributedSampler``, so Lightning keeps it as it is.
    """

    def __init__(self, data_source: Dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, seed=seed)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        size = len(cast(Sized, self.dataset))  # sized: DistributedSampler's __init__ takes len()
        order = torch.randperm(size, generator=generator).tolist()
        order += order[: self.total_size - len(order)]  # equal share per rank, as Lightning's
        yield from order[self.rank : self.total_size : self.num_replicas]


class SkipOnce:
    """Where a resumed epoch starts: its number and the batches it already trained on.

    Shared by every loader the data module builds and used up by the first one iterated.
    """

    def __init__(self, epoch: int = 0, batches: int = 0):
        self.epoch, self.batches = epoch, batches

    def take(self) -> tuple[int, int] | None:
        if not self.batches:
            return None
        position, self.batches = (self.epoch, self.batches), 0
        return position


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose first iteration can resume in the middle of an epoch.

    Lightning creates the resumed epoch's iterator before it sets the sampler's epoch, so the
    loader sets the epoch itself, then skips the batches already trained on.
    """

    def __init__(self, *args: Any, resume: SkipOnce | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.resume = resume or SkipOnce()

    def __iter__(self) -> _BaseDataLoaderIter:
        position = self.resume.take()
        if position is None:
            return super().__iter__()
        epoch, skip = position
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator, None)
        return iterator
