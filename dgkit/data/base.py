"""The interface of a multi-domain data set."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from torch.utils.data import Dataset

from dgkit.task import DEFAULT_SELECTION


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
    #: start the default backbone from ImageNet weights (natural images, as the papers do)
    default_pretrained: ClassVar[bool] = False
    #: the metrics the results table shows (the rest go to the files); () shows all
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    default_test_domains: ClassVar[tuple[str, ...]] = ()
    #: the logged key that selects the checkpoint (a benchmark's official protocol)
    selection_metric: ClassVar[str] = DEFAULT_SELECTION

    def domain_dataset(self, index: int) -> Dataset:
        """All samples of domain ``self.domains[index]``."""
        raise NotImplementedError

    def transform(self, train: bool) -> Callable | None:
        """What turns a stored input into a model input, for training samples (``train``)
        or evaluation ones; the data module applies it after splitting, so a domain's
        training split is augmented and its held-out split is not. None: the domain
        datasets already yield tensors (the embedded MNIST domains)."""
        return None

    def evaluator(self) -> Callable[..., dict[str, float]] | None:
        """A benchmark's own evaluator of a whole stream, ``(preds, target, metadata) ->
        {name: value}``, reported beside the per-stream metrics; None: no such evaluator."""
        return None

    @property
    def name(self) -> str:
        return type(self).__name__
