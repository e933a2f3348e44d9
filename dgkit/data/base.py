"""The interface of a multi-domain data set."""

from __future__ import annotations

from typing import ClassVar

from torch.utils.data import Dataset


class MultiDomainDataset:
    """A data set made of named domains, each a ``torch`` Dataset of ``(x, y)``.

    Subclasses set the class attributes (cheap metadata, read before any data is loaded,
    so the model can be built first) and implement ``domain_dataset``. Their
    ``__init__`` arguments are exposed as ``--data.dataset.<name>``.
    """

    domains: ClassVar[tuple[str, ...]] = ()
    num_classes: ClassVar[int] = 0
    input_shape: ClassVar[tuple[int, ...]] = ()
    default_backbone: ClassVar[str] = "resnet50"
    default_test_domains: ClassVar[tuple[str, ...]] = ()

    def domain_dataset(self, index: int) -> Dataset:
        """All samples of domain ``self.domains[index]``."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__
