"""The single training loader: the batches of one loader per stream, from one worker pool."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Subset, TensorDataset

from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.data.resumable import ResumableSampler, Seeded
from dgkit.data.steps import StepData, StepSampler


def _streams():
    # Three streams of different lengths, so the short ones cycle within the epoch; each
    # sample is its own index plus a number drawn under its seed (augmentation's stand-in).
    class Drawn(TensorDataset):
        def __getitem__(self, i):
            (x,) = super().__getitem__(i)
            return x, torch.rand(())

    return [Drawn(torch.arange(n) + 1000 * k) for k, n in enumerate((23, 50, 9))], (4, 6, 3)


def _samplers(sizes, batch_sizes, rank=0, world=1):
    return [ResumableSampler(n, b, shuffle=True, seed=7, key=k, rank=rank, world_size=world)
            for k, (n, b) in enumerate(zip(sizes, batch_sizes, strict=True))]


def _per_stream_loader(data, batch_sizes, rank=0, world=1):
    """What the training loader was before: one DataLoader per stream, combined by Lightning."""
    samplers = _samplers([len(d) for d in data], batch_sizes, rank, world)
    loaders = [DataLoader(Seeded(d), batch_size=b, sampler=s, drop_last=True)
               for d, b, s in zip(data, batch_sizes, samplers, strict=True)]
    return CombinedLoader(loaders, mode="max_size_cycle"), samplers


def _flat(batches):
    return [[(x.tolist(), r.tolist()) for x, r in step] for step in batches]


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
def test_steps_are_those_of_one_loader_per_stream(rank, world):
    data, batch_sizes = _streams()
    combined, reference_samplers = _per_stream_loader(data, batch_sizes, rank, world)
    sampler = StepSampler(_samplers([len(d) for d in data], batch_sizes, rank, world))
    loader = DataLoader(StepData([Seeded(d) for d in data], "sources"), batch_size=None, sampler=sampler)

    for epoch in range(2):  # the second epoch reshuffles every stream
        for s in reference_samplers:
            s.set_epoch(epoch)
        sampler.set_epoch(epoch)
        expected = _flat(batch for batch, _, _ in combined)
        assert len(loader) == len(expected) == max(s.batches_per_pass for s in reference_samplers)
        assert _flat(loader) == expected


def test_in_memory_streams_are_gathered_as_the_per_sample_loader_collates_them():
    # Tensors seen through two Subset views (a domain's training split of an embedded data
    # set), and a bare TensorDataset: one indexing per tensor instead of a loop per sample.
    base = TensorDataset(torch.randn(60, 2, 3), torch.arange(60))
    data = [Subset(Subset(base, list(range(5, 55))), list(range(40, 0, -1))),
            TensorDataset(torch.randn(23, 4), torch.arange(23) * 2)]
    assert all(Seeded(d).gather([(0, 0)]) is not None for d in data)
    assert Seeded(_streams()[0][0]).gather([(0, 0)]) is None  # its loading draws: per sample
    batch_sizes = (4, 6)
    combined, reference_samplers = _per_stream_loader(data, batch_sizes)
    sampler = StepSampler(_samplers([len(d) for d in data], batch_sizes))
    loader = DataLoader(StepData([Seeded(d) for d in data], "sources"), batch_size=None, sampler=sampler)
    for s in [*reference_samplers, sampler]:
        s.set_epoch(1)
    expected = [batch for batch, _, _ in combined]
    steps = list(loader)
    assert len(steps) == len(expected) == 10
    for step, reference in zip(steps, expected, strict=True):
        for (x, y), (x_ref, y_ref) in zip(step, reference, strict=True):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref) and y.dtype == y_ref.dtype


def test_resumed_steps_continue_where_the_run_stopped():
    data, batch_sizes = _streams()
    make = lambda: DataLoader(StepData([Seeded(d) for d in data], "sources"), batch_size=None,  # noqa: E731
                              sampler=StepSampler(_samplers([len(d) for d in data], batch_sizes)))
    whole = make()
    whole.sampler.set_epoch(1)
    steps = _flat(whole)
    resumed = make()
    resumed.sampler.start(1, 5)  # after five steps: the short streams are in their second pass
    # Lightning ends the resumed epoch at its length, as it did with one loader per stream
    assert _flat(resumed)[:len(steps) - 5] == steps[5:]


def test_the_unlabeled_pool_rides_in_the_same_step():
    data, batch_sizes = _streams()
    sampler = StepSampler(_samplers([len(d) for d in data], batch_sizes))
    step = next(iter(DataLoader(StepData([Seeded(d) for d in data], "sources+unlabeled"),
                                batch_size=None, sampler=sampler)))
    assert [x.shape[0] for x, _ in step["sources"]] == [4, 6]
    assert step["unlabeled"][0].shape[0] == 3


def test_workers_do_not_grow_with_the_number_of_domains():
    before = set(multiprocessing.active_children())
    dm = DomainDataModule(RotatedMNIST(), batch_size=8, num_workers=2, test_domains=["75"])
    dm.setup("fit")
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert len(batch) == 5  # a batch from each of the five source domains ...
    started = set(multiprocessing.active_children()) - before
    assert len(started) == 2  # ... loaded by one pool of two workers, not two per domain
    del loader, batch
