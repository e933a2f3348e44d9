"""Crafted shifts: the ten augmentation families, their folds, fixed draws, and the
crafted unlabeled stream."""

import pickle

import pytest
import torch

from dgkit.data import DomainDataModule
from dgkit.data.mnist import ColoredMNIST, RotatedMNIST
from dgkit.data.shifts import CATEGORIES, FOLDS, ShiftedDataset, resolve_categories
from dgkit.errors import ConfigError


def test_folds_partition_the_ten_categories():
    assert len(CATEGORIES) == 10 and set(FOLDS["A"]).isdisjoint(FOLDS["B"])
    assert set(FOLDS["A"]) | set(FOLDS["B"]) == set(CATEGORIES)
    assert resolve_categories(["B", "blur", "edges"], "x") == (*FOLDS["B"], "blur")
    with pytest.raises(ConfigError, match=r"'rain' is not a shift category.*geometric"):
        resolve_categories(["rain"], "data.unlabeled_shifts")


@pytest.mark.parametrize("dataset", [RotatedMNIST(), ColoredMNIST()], ids=["1ch", "2ch"])
def test_every_category_shifts_images_with_a_fixed_draw(dataset):
    domain = dataset.domain_dataset(0)
    originals = torch.stack([domain[i][0] for i in range(6)])
    for category in CATEGORIES:
        shifted = ShiftedDataset(domain, category, seed=0, cache=False)
        x = torch.stack([shifted[i][0] for i in range(6)])
        assert x.shape == originals.shape and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert (x - originals).abs().mean() > 1e-3, category  # it does change the images
        again = ShiftedDataset(domain, category, seed=0, cache=False)
        assert torch.equal(again[4][0], x[4]), category  # same draw every time, any order
        assert shifted[2][1] == domain[2][1]  # labels untouched
    reseeded = ShiftedDataset(domain, "geometric", seed=1)
    assert not torch.equal(reseeded[0][0], ShiftedDataset(domain, "geometric", seed=0)[0][0])


def test_cache_returns_what_it_drew_and_transforms_pickle_for_workers():
    domain = RotatedMNIST().domain_dataset(0)
    cached, fresh = ShiftedDataset(domain, "contrast"), ShiftedDataset(domain, "contrast", cache=False)
    first = cached[3][0]
    assert torch.equal(first, cached[3][0]) and torch.allclose(first, fresh[3][0], atol=1 / 255)
    for category in CATEGORIES:
        pickle.dumps(ShiftedDataset(domain, category).transform)


def test_crafted_unlabeled_stream_is_source_holdout_under_each_shift():
    data = DomainDataModule(ColoredMNIST(), batch_size=8, unlabeled="crafted",
                            unlabeled_shifts=["color", "B"])
    data.setup("fit")
    pool = data.train_dataloader().dataset.streams[-1].data.data.datasets  # Seeded(ImagesOnly(Concat))
    assert len(pool) == len(data.source_indices) * 6
    holdouts = [data.splits[i][1] for i in data.source_indices]
    assert all(any(p.data is h for h in holdouts) for p in pool)  # never a target image
    assert {p.category for p in pool} == {"color", *FOLDS["B"]}
    assert not data.task.transductive
    batch = next(iter(data.train_dataloader()))
    assert batch["unlabeled"].shape == (16, 2, 28, 28)
    with pytest.raises(ConfigError, match=r"data\.unlabeled_shifts"):
        DomainDataModule(ColoredMNIST(), unlabeled="target", unlabeled_shifts=["blur"])
