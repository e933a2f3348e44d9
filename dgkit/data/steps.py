"""One training loader for every stream of a step (each source domain, the unlabeled pool).

DomainBed draws one minibatch per source domain per step. Doing that with one
``DataLoader`` per domain gives every domain its own worker processes, so the pool grows
with the number of domains (DomainNet's five sources at 8 workers: 40 per device). Here a
single loader's sampler yields, per step, every stream's batch of sample keys, and the
worker that loads a step collates each stream's batch on its own: one pool, any number of
domains, and the batches (order, per-sample seeds, cycling, resumption) are exactly those
of one ``ResumableSampler`` per stream combined as Lightning's
``CombinedLoader(mode="max_size_cycle")`` combines loaders.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

from torch.utils.data import Dataset, DistributedSampler, default_collate

from dgkit.data.resumable import ResumableSampler, Seeded

Layout = Literal["sources", "sources+unlabeled", "mixed"]
Key = tuple[int, int]  # (sample index, sample seed)


def _batches(sampler: ResumableSampler) -> Iterator[list[Key]]:
    """The sampler's pass in batches, the last partial one dropped (as ``drop_last``)."""
    batch: list[Key] = []
    for key in sampler:  # a pass is counted when its first key is drawn, as in a DataLoader
        batch.append(key)
        if len(batch) == sampler.batch_size:
            yield batch
            batch = []


class StepSampler(DistributedSampler):
    """Per step, one batch of ``(index, seed)`` keys from each stream's sampler; a stream
    that runs out starts its next pass until every stream has finished one (the epoch is
    the longest stream's pass). A ``DistributedSampler`` by type, so that Lightning keeps
    it under DDP; each stream's sampler already takes this rank's share."""

    def __init__(self, samplers: Sequence[ResumableSampler]):
        first = samplers[0]
        super().__init__(range(first.world_size), num_replicas=first.world_size, rank=first.rank,
                         shuffle=False, drop_last=True)
        self.samplers = list(samplers)

    def __len__(self) -> int:
        return max(s.batches_per_pass for s in self.samplers)

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    def start(self, epoch: int, batches: int) -> None:
        """Continue after ``batches`` steps of ``epoch`` (a resumed run)."""
        for sampler in self.samplers:
            sampler.start(epoch, batches)

    def __iter__(self) -> Iterator[list[list[Key]]]:
        streams = [_batches(s) for s in self.samplers]
        finished = [False] * len(streams)
        while True:
            step = []
            for i, sampler in enumerate(self.samplers):
                batch = next(streams[i], None)
                if batch is None:
                    finished[i] = True
                    if all(finished):
                        return
                    streams[i] = _batches(sampler)
                    batch = next(streams[i], None)
                    if batch is None:  # fewer samples on this rank than one batch
                        return
                step.append(batch)
            yield step


class StepData(Dataset):
    """A step's samples from the keys :class:`StepSampler` drew: each stream (a
    :class:`~dgkit.data.resumable.Seeded` dataset) loads and collates its batch on its
    own, arranged as the model reads a training step (``as_batch``): ``[domain batch,
    ...]``, ``{"sources": [...], "unlabeled": images}`` or ``{"mixed": batch}``."""

    def __init__(self, streams: Sequence[Seeded], layout: Layout):
        self.streams, self.layout = list(streams), layout

    def __len__(self) -> int:
        return sum(len(s) for s in self.streams)  # type: ignore[arg-type]

    def __getitem__(self, step: list[list[Key]]) -> Any:
        batches = [_collated(stream, keys) for stream, keys in zip(self.streams, step, strict=True)]
        if self.layout == "mixed":
            return {"mixed": batches[0]}
        if self.layout == "sources+unlabeled":
            return {"sources": batches[:-1], "unlabeled": batches[-1]}
        return batches


def _collated(stream: Seeded, keys: list[Key]) -> Any:
    gathered = stream.gather(keys)  # in-memory tensors: one indexing, no loop per sample
    return gathered if gathered is not None else default_collate(stream.__getitems__(keys))
