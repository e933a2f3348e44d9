"""Training data order and augmentation as pure functions of (seed, epoch, pass, position),
so a run restarted from a mid-epoch checkpoint draws exactly the batches and augmentations
the uninterrupted run would have drawn.

Each training loader gets a :class:`ResumableSampler`: its order in every pass over the
data (a loader that cycles inside an epoch makes several passes) comes from its own
generator, never from the global RNG, and it yields ``(index, sample seed)`` pairs.
:class:`Seeded` loads a sample under its seed and then restores the CPU generator, so that
loading (in the main process or a worker, prefetched or not) leaves the training RNG
untouched; albumentations pipelines read the seed through :func:`sample_seed`.

Resuming needs only how many batches of the epoch were consumed: the data module stores
it in the checkpoint and hands every sampler its pass and offset.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Subset, TensorDataset

_SAMPLE_SEED: contextvars.ContextVar[int | None] = contextvars.ContextVar("sample_seed", default=None)


def sample_seed() -> int | None:
    """The seed of the training sample being loaded (None outside a seeded load)."""
    return _SAMPLE_SEED.get()


class Seeded(Dataset):
    """``data`` indexed by ``(index, seed)``: each sample loaded under its own seed."""

    def __init__(self, data: Dataset):
        self.data = data
        self._in_memory = _in_memory(data)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def gather(self, keys: list[tuple[int, int]]) -> list[torch.Tensor] | None:
        """The collated batch of ``keys`` in one indexing per tensor when ``data`` is an
        in-memory ``TensorDataset`` (through ``Subset`` views), whose loading draws nothing
        at random, so the seeds change nothing; None otherwise. Equal to
        ``default_collate(self.__getitems__(keys))``, without a Python step per sample (at
        64 images per domain that loop cost more than a small network's whole step)."""
        if self._in_memory is None:
            return None
        tensors, index = self._in_memory
        rows = torch.tensor([i for i, _ in keys], dtype=torch.long)
        if index is not None:
            rows = index[rows]
        return [t[rows] for t in tensors]

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """Each sample loaded under its own seed, the caller's generator saved and restored
        once per batch, so that loading leaves the training RNG untouched."""
        # The CPU generator alone (data loading draws on it): torch.manual_seed would also
        # visit every accelerator's, at 100x the cost.
        generator = torch.default_generator
        saved = generator.get_state()
        samples = []
        try:
            for index, seed in keys:
                token = _SAMPLE_SEED.set(seed)
                generator.manual_seed(seed)
                try:
                    samples.append(self.data[index])
                finally:
                    _SAMPLE_SEED.reset(token)
        finally:
            generator.set_state(saved)
        return samples


def _in_memory(data: Dataset) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
    """``(tensors, row of each index)`` of a ``TensorDataset`` seen through ``Subset`` views
    (None: every index is its row), or None for any other data set."""
    index: torch.Tensor | None = None
    while type(data) is Subset:
        mine = torch.as_tensor(data.indices, dtype=torch.long)
        index = mine if index is None else mine[index]
        data = data.dataset
    if type(data) is not TensorDataset:
        return None
    return data.tensors, index


class ResumableSampler(DistributedSampler):
    """Shuffled (or ordered) indices with per-sample seeds, split across DDP ranks like
    ``DistributedSampler(drop_last=True)``; the order of a pass depends only on
    ``(seed, key, epoch, pass)``.

    ``start(epoch, batches)`` positions the sampler after ``batches`` batches of ``epoch``
    (a resumed run); Lightning's ``set_epoch`` then moves it from epoch to epoch. A
    ``DistributedSampler`` by type, so that Lightning keeps it under DDP instead of
    wrapping it in one of its own.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int, key: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=True)
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.seed, self.key, self.rank, self.world_size = seed, key, rank, world_size
        self.epoch, self._next_pass, self._skip = 0, 0, 0

    @property
    def per_rank(self) -> int:
        return self.size // self.world_size

    @property
    def batches_per_pass(self) -> int:
        return self.per_rank // self.batch_size  # the loader drops the last partial batch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._next_pass, self._skip = epoch, 0, 0

    def start(self, epoch: int, batches: int) -> None:
        """Continue after ``batches`` batches of ``epoch``: the pass and offset within it."""
        per_pass = max(self.batches_per_pass, 1)
        self.epoch, self._next_pass, self._skip = epoch, batches // per_pass, batches % per_pass

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # Counted when iteration starts, not when an iterator is made, so an iterator
        # Lightning creates and drops does not shift the passes.
        current, skip = self._next_pass, self._skip
        self._next_pass, self._skip = current + 1, 0
        entropy = [self.seed % 2**63, self.key, self.epoch, current]
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1)
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(2**62, (self.size,), generator=generator)
        mine = torch.arange(self.per_rank * self.world_size)[self.rank::self.world_size]
        mine = mine[skip * self.batch_size:]
        # Python ints, converted once per pass: indexing a tensor per sample costs microseconds
        yield from zip(order[mine].tolist(), seeds[mine].tolist(), strict=True)
