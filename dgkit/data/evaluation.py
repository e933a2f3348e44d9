"""One worker pool for every evaluation stream.

A run validates on one stream per source domain (and per target domain for the oracle, and
per crafted shift). A ``DataLoader`` per stream starts its own workers at every validation:
eight streams at 8 workers are 64 processes started and stopped each time. Lightning reads
evaluation loaders one after another, so the streams can share one loader whose workers
persist: each stream's :class:`StreamLoader` points the shared batch sampler at its stream
and iterates the pool. A stream's batches are those of a plain ``DataLoader`` over it (in
order, ``batch_size``, the last batch partial); under DDP each rank takes the share that
Lightning's ``DistributedSampler(shuffle=False)`` would have given it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler


def _share(size: int, rank: int, world: int) -> list[int]:
    """Rank's indices of ``range(size)``, as Lightning's evaluation sampler gives them."""
    return list(DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=False))


class StreamBatches(Sampler[list[int]]):
    """Batches of the current stream's samples, as indices into the streams' concatenation."""

    def __init__(self, sizes: Sequence[int], batch_size: int, rank: int = 0, world: int = 1):
        self.sizes, self.batch_size, self.rank, self.world = list(sizes), batch_size, rank, world
        self.offsets = [0, *itertools.accumulate(self.sizes)][:-1]
        self.stream = 0

    def batches(self, stream: int) -> int:
        return -(-len(_share(self.sizes[stream], self.rank, self.world)) // self.batch_size)

    def __len__(self) -> int:
        return self.batches(self.stream)

    def __iter__(self) -> Iterator[list[int]]:
        offset, indices = self.offsets[self.stream], _share(self.sizes[self.stream], self.rank, self.world)
        for start in range(0, len(indices), self.batch_size):
            yield [offset + i for i in indices[start:start + self.batch_size]]


class StreamLoader:
    """One evaluation stream of a :class:`EvaluationPool`, iterated as a ``DataLoader`` is."""

    def __init__(self, pool: EvaluationPool, index: int):
        self.pool, self.index = pool, index

    @property
    def dataset(self) -> Dataset:
        return self.pool.streams[self.index]

    def __len__(self) -> int:
        return self.pool.sampler.batches(self.index)

    def __iter__(self) -> Iterator[Any]:
        # Lightning (and head or test-time selection) reads one stream to its end, or stops
        # early, before starting the next; a new iterator of the pool takes the stream
        # chosen here, and persistent workers drop what they had prefetched of the last one.
        self.pool.sampler.stream = self.index
        return iter(self.pool.loader)


class EvaluationPool:
    """One ``DataLoader`` over all ``streams``; ``loaders`` gives one :class:`StreamLoader` each."""

    def __init__(self, streams: Sequence[Dataset], batch_size: int, *, num_workers: int,
                 pin_memory: bool, rank: int = 0, world: int = 1):
        self.streams = list(streams)
        sizes = [len(s) for s in self.streams]  # type: ignore[arg-type]
        self.sampler = StreamBatches(sizes, batch_size, rank, world)
        # Its own generator: making an iterator draws a worker seed, which would otherwise
        # come from the global RNG and shift dropout and the like by when evaluations ran.
        self.loader = DataLoader(ConcatDataset(self.streams), batch_sampler=self.sampler,
                                 num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=num_workers > 0,
                                 generator=torch.Generator().manual_seed(0))
        self.loaders = [StreamLoader(self, i) for i in range(len(self.streams))]
