"""Evaluation streams from one pool of workers: each stream's batches those of its own loader."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dgkit.data.evaluation import EvaluationPool


def _streams():
    return [TensorDataset(torch.arange(n) + 1000 * k, torch.full((n,), k)) for k, n in enumerate((23, 7, 40))]


def _flat(loader):
    return [(x.tolist(), y.tolist()) for x, y in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_stream_reads_as_its_own_loader(workers):
    streams = _streams()
    pool = EvaluationPool(streams, 8, num_workers=workers, pin_memory=False)
    expected = [_flat(DataLoader(s, batch_size=8)) for s in streams]
    assert [len(loader) for loader in pool.loaders] == [len(e) for e in expected] == [3, 1, 5]
    next(iter(pool.loaders[2]))  # a stream left half-read (a limited validation) ...
    for _ in range(2):  # ... and two validations after it
        assert [_flat(loader) for loader in pool.loaders] == expected
    assert pool.loaders[1].dataset is streams[1]


def test_a_ddp_rank_reads_the_share_lightnings_sampler_gives_it():
    streams = _streams()
    pool = EvaluationPool(streams, 4, num_workers=0, pin_memory=False, rank=1, world=3)
    for stream, loader in zip(streams, pool.loaders, strict=True):
        sampler = DistributedSampler(stream, num_replicas=3, rank=1, shuffle=False)
        expected = _flat(DataLoader(stream, batch_size=4, sampler=sampler))
        assert len(loader) == len(expected) and _flat(loader) == expected


def test_one_pool_of_workers_for_every_stream_and_validation():
    before = set(multiprocessing.active_children())
    pool = EvaluationPool(_streams(), 8, num_workers=2, pin_memory=False)
    for _ in range(3):  # three validations over three streams
        for loader in pool.loaders:
            for _batch in loader:
                pass
    assert len(set(multiprocessing.active_children()) - before) == 2  # not 2 per stream and time
