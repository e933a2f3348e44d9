import pytest
import torch

from dgkit.data import DomainDataModule
from dgkit.data.datamodule import split_indices
from dgkit.data.mnist import ColoredMNIST, RotatedMNIST, load_mnist_5k
from dgkit.errors import ConfigError


def test_embedded_digits_are_real_mnist():
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [500] * 10
    assert images.float().mean() > 20  # real strokes, not blank images


def test_rotated_mnist_domains_are_disjoint_slices_of_real_digits():
    ds = RotatedMNIST()
    assert ds.domains == ("0", "15", "30", "45", "60", "75")
    sizes = [len(ds.domain_dataset(i)) for i in range(6)]
    assert sum(sizes) == 5000 and max(sizes) - min(sizes) <= 1
    x0 = ds.domain_dataset(0).tensors[0]
    x75 = ds.domain_dataset(5).tensors[0]
    assert x0.shape[1:] == (1, 28, 28) and 0 <= x0.min() and x0.max() <= 1
    # The average digit of domain 75 looks like domain 0's average turned by 75 degrees.
    from torchvision.transforms.v2 import functional as TF

    mean0, mean75 = x0.mean(0), x75.mean(0)

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    assert corr(TF.rotate(mean0, 75.0), mean75) > corr(mean0, mean75) + 0.1


def test_styled_mnist_domains_carry_their_style():
    from dgkit.data.mnist import StyledMNIST

    ds = StyledMNIST()
    assert ds.domains == ("clean", "blur", "low_contrast", "noise", "inverted")
    x = {name: ds.domain_dataset(i).tensors[0] for i, name in enumerate(ds.domains)}
    assert sum(len(v) for v in x.values()) == 5000 and all(v.shape[1:] == (1, 28, 28) for v in x.values())
    assert all(0 <= v.min() and v.max() <= 1 for v in x.values())

    def roughness(v):  # mean absolute difference of neighbouring pixels
        return (v[..., 1:] - v[..., :-1]).abs().mean().item()

    assert roughness(x["blur"]) < 0.6 * roughness(x["clean"])
    assert roughness(x["noise"]) > 2 * roughness(x["clean"])
    assert x["low_contrast"].std() < 0.35 * x["clean"].std()
    assert x["inverted"].mean() > 0.8 > 0.2 > x["clean"].mean()  # white digits become dark ones
    assert torch.equal(StyledMNIST().domain_dataset(3).tensors[0], x["noise"])  # seeded


def test_colored_mnist_has_the_domainbed_correlations():
    ds = ColoredMNIST()
    for env, (expected_color_agreement) in enumerate((0.9, 0.8, 0.1)):
        x, y = ds.domain_dataset(env).tensors
        assert x.shape[1:] == (2, 28, 28)
        red = x[:, 0].flatten(1).sum(1) > 0
        color = (~red).long()  # channel 1 kept -> colour 1
        agreement = (color == y).float().mean().item()
        assert abs(agreement - expected_color_agreement) < 0.05, (env, agreement)


def test_splits_are_disjoint_and_seeded():
    a_in, a_out = split_indices(100, 0.2, seed=3)
    assert len(a_out) == 20 and not set(a_in) & set(a_out) and len(a_in) + len(a_out) == 100
    assert split_indices(100, 0.2, seed=3) == (a_in, a_out)
    assert split_indices(100, 0.2, seed=4) != (a_in, a_out)


def _sample_ids(subset):
    # Subset indices into the domain tensor identify samples uniquely within a domain.
    return {int(i) for i in subset.indices}


def test_datamodule_train_val_test_do_not_overlap():
    dm = DomainDataModule(RotatedMNIST(), test_domains=["75", 0], batch_size=16)
    dm.setup("fit")
    assert dm.task.source_domains == ("15", "30", "45", "60")
    assert dm.task.target_domains == ("0", "75")
    for i in range(6):
        inn, out = dm.splits[i]
        assert not _sample_ids(inn) & _sample_ids(out)
        assert len(inn) + len(out) == len(dm.dataset.domain_dataset(i))
    # test loaders read only target domains' in-splits; val only sources' out (+ oracle)
    assert [len(dl.dataset) for dl in dm.test_dataloader()] == [len(dm.splits[i][0]) for i in (0, 5)]
    val = dm.val_dataloader()
    assert len(val) == 4 + 2
    assert [dl.dataset for dl in val[:4]] == [dm.splits[i][1] for i in (1, 2, 3, 4)]


def test_same_seed_same_split_other_seed_other_split():
    def ids(seed):
        dm = DomainDataModule(RotatedMNIST(), split_seed=seed)
        dm.setup("fit")
        return [sorted(_sample_ids(dm.splits[i][1])) for i in range(6)]

    assert ids(0) == ids(0)
    assert ids(0) != ids(1)


def test_one_minibatch_per_source_domain_per_step():
    dm = DomainDataModule(ColoredMNIST(), batch_size=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    iter(loader)
    batch = next(iter(loader))
    assert len(batch) == 2  # two source environments
    assert all(x.shape == (8, 2, 28, 28) and y.shape == (8,) for x, y in batch)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_domains": ["90"]}, "RotatedMNIST has no domain '90'.*allowed: '0' \\(0\\)"),
        ({"test_domains": list(range(6))}, "every domain is held out"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"holdout_fraction": 1.5}, "data.holdout_fraction"),
    ],
)
def test_bad_data_settings_name_the_parameter(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DomainDataModule(RotatedMNIST(), **kwargs)


def test_batch_larger_than_a_domain_is_reported_at_setup():
    dm = DomainDataModule(RotatedMNIST(), batch_size=5000)
    with pytest.raises(ConfigError, match=r"only .* training samples"):
        dm.setup("fit")


def test_colored_mnist_with_chosen_colour_agreement():
    ds = ColoredMNIST(color_agreement=[0.9, 0.5, 0.25])
    assert ds.domains == ("+90%", "50%", "-75%") and ds.default_test_domains == ("-75%",)
    with pytest.raises(ConfigError, match="color_agreement"):
        ColoredMNIST(color_agreement=[1.5])


def test_unlabeled_domains_are_neither_trained_nor_tested():
    ds = ColoredMNIST(color_agreement=[0.9, 0.8, 0.5, 0.1])
    dm = DomainDataModule(ds, unlabeled="domains", unlabeled_domains=["50%"])
    assert dm.task.source_domains == ("+90%", "+80%") and dm.task.target_domains == ("-90%",)
    with pytest.raises(ConfigError, match=r"data\.unlabeled_domains"):
        DomainDataModule(ds, unlabeled="domains")
    with pytest.raises(ConfigError, match="cannot be the unlabeled pool"):
        DomainDataModule(ds, unlabeled="domains", unlabeled_domains=["-90%"])
