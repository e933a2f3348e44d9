"""WILDS image benchmarks through the ``wilds`` package: its official splits, domains from
its metadata groupers, and its official evaluators as test (and validation) metrics.

Unlike the leave-domains-out data sets, a WILDS benchmark fixes its splits: training
(many domains, drawn as one shuffled stream whose samples carry their domain index, as
WILDS' own ERM does), ``id_val`` (in-distribution validation), ``val`` (OOD validation,
the default for model selection) and ``test`` (plus ``id_test`` where it exists).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dgkit.data.base import MultiDomainDataset
from dgkit.data.transforms import LoadImage, pipeline
from dgkit.errors import ConfigError, DGKitError
from dgkit.plugins import register


def import_wilds() -> Any:
    """``import wilds`` made safe offline.

    wilds starts a thread at import that asks PyPI for a newer version with no timeout;
    hiding the ``outdated`` package makes it skip the check. Its group averages need
    ``torch_scatter``, which it does not declare (a long compile); without it they are
    computed with ``index_add_``, the same numbers.
    """
    if "wilds" not in sys.modules:
        hide = "outdated" not in sys.modules
        if hide:
            sys.modules["outdated"] = None  # type: ignore[assignment]  # import fails: no check
        try:
            import wilds
        finally:
            if hide:
                del sys.modules["outdated"]
    import wilds

    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        import wilds.common.metrics.all_metrics as all_metrics
        import wilds.common.metrics.loss as loss
        import wilds.common.metrics.metric as metric
        import wilds.common.utils as utils

        for module in (utils, metric, all_metrics, loss):
            module.avg_over_groups = avg_over_groups
    return wilds


def avg_over_groups(v: Tensor, g: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Mean of ``v`` per group and the group counts (wilds' function, without torch_scatter)."""
    counts = torch.zeros(n_groups, device=g.device).index_add_(0, g, torch.ones_like(g, dtype=torch.float))
    sums = torch.zeros(n_groups, device=v.device, dtype=torch.float).index_add_(0, g, v.float())
    return sums / counts.clamp_min(1), counts


class WildsStream(Dataset):
    """Samples of one WILDS split as ``(image, y, metadata)``, or ``(image, y, domain)``
    for training, with images as RGB uint8 arrays for the dgkit pipelines."""

    def __init__(self, subset: Any, domains: Tensor | None = None):
        self.subset, self.domains = subset, domains

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, index: int):
        try:
            x, y, metadata = self.subset[index]
        except (OSError, ValueError) as exc:  # PIL: truncated or not an image
            name = self.subset.dataset._input_array[self.subset.indices[index]]
            raise DGKitError(f"cannot read image {name} under {self.subset.dataset.data_dir}: {exc}. "
                             "Re-download the data set or remove the file.") from None
        image = np.asarray(x.convert("RGB"))
        return (image, y, metadata if self.domains is None else self.domains[index])


class WildsDomains(MultiDomainDataset):
    """A WILDS image-classification benchmark."""

    wilds_name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    #: metadata fields whose combinations are the domains (WILDS' training grouper)
    domain_fields: ClassVar[tuple[str, ...]] = ()
    #: the official model-selection metric (a ``<stage>/<metric>`` key)
    selection_metric: ClassVar[str] = "ood_val/accuracy"
    official_streams: ClassVar[dict[str, tuple[str, ...]]] = {
        "val": ("id_val",), "ood_val": ("val",), "test": ("test",)}
    default_backbone = "resnet50"
    default_pretrained = True

    def __init__(self, root: str = "data", image_size: int = 224,
                 train_transform: str = "domainbed", eval_transform: str = "resize",
                 download: bool = False):
        """
        Args:
            root: folder that holds ``<name>_v<version>/`` (WILDS' ``root_dir``).
            image_size: side of the square images the presets produce.
            train_transform: preset (``domainbed``, ``resize``, ``none``) or the path of an
                albumentations pipeline saved as YAML/JSON.
            eval_transform: the same for evaluation.
            download: let wilds download the data set if it is missing.
        """
        self.root, self.image_size = Path(root), image_size
        self.input_shape = (3, image_size, image_size)
        self._train = pipeline(train_transform, image_size, True, "data.dataset.train_transform")
        self._eval = pipeline(eval_transform, image_size, False, "data.dataset.eval_transform")
        folder = self.root / f"{self.wilds_name}_v{self.version}"
        if not download and not (folder / f"RELEASE_v{self.version}.txt").is_file():
            raise DGKitError(
                f"{self.name}: no WILDS data at {folder}. Expected {folder}/RELEASE_v{self.version}.txt, "
                f"metadata.csv and the image files as the WILDS archive unpacks them. Download with "
                f"--data.dataset.download true (needs a network), or from https://wilds.stanford.edu/"
                f"downloads into --data.dataset.root.")
        wilds = import_wilds()
        from wilds.common.grouper import CombinatorialGrouper

        try:
            self.wilds = wilds.get_dataset(dataset=self.wilds_name, version=self.version,
                                           root_dir=str(self.root), download=download)
        except (FileNotFoundError, KeyError, ValueError, AssertionError) as exc:
            raise DGKitError(f"{self.name}: {folder} is not a readable WILDS {self.wilds_name} "
                             f"v{self.version} ({type(exc).__name__}: {exc}). Check metadata.csv "
                             "against the official release.") from None
        self.grouper = CombinatorialGrouper(self.wilds, list(self.domain_fields))
        groups = self.grouper.metadata_to_group(self.wilds.metadata_array)
        train = torch.from_numpy(self.wilds.split_array == self.wilds.split_dict["train"])
        self._train_groups = sorted(torch.unique(groups[train]).tolist())
        self._groups = groups
        self.domains = tuple(self.grouper.group_str(g) for g in self._train_groups)
        self.num_classes = int(self.wilds.n_classes)
        self.streams = {stage: tuple(s for s in names if s in self.wilds.split_dict)
                        for stage, names in self.official_streams.items()}

    def domain_dataset(self, index: int) -> Dataset:
        raise DGKitError(f"{self.name} has official splits, not leave-one-domain-out domains")

    def official_splits(self) -> tuple[Dataset, dict[str, list[Dataset]]]:
        """The training stream (with domain indices) and every evaluation stream by stage."""
        train = self.wilds.get_subset("train")
        index = {g: i for i, g in enumerate(self._train_groups)}
        domains = torch.tensor([index[int(g)] for g in self._groups[train.indices]])
        streams = {stage: [WildsStream(self.wilds.get_subset(split)) for split in names]
                   for stage, names in self.streams.items()}
        return WildsStream(train, domains), streams

    def evaluator(self) -> Callable[[Tensor, Tensor, Tensor], dict[str, float]]:
        """WILDS' official evaluation of a whole split."""
        return _Evaluate(self.wilds)

    def transform(self, train: bool) -> Callable:
        return LoadImage(self._train if train else self._eval)


class _Evaluate:
    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __call__(self, y_pred: Tensor, y_true: Tensor, metadata: Tensor) -> dict[str, float]:
        results, _ = self.dataset.eval(y_pred, y_true, metadata)
        return results


@register("camelyon17")
class Camelyon17(WildsDomains):
    """Camelyon17-WILDS: tumour patches from five hospitals; trained on three, OOD
    validation on hospital 1, test on hospital 2; official metric: accuracy."""

    wilds_name, version = "camelyon17", "1.0"
    domain_fields = ("hospital",)
    selection_metric = "ood_val/acc_avg"
    headline_metrics = ("acc_avg", "acc_wg")


@register("iwildcam")
class IWildCam(WildsDomains):
    """iWildCam2020-WILDS: camera-trap species; domains are camera locations; official
    metric: macro F1 (WILDS selects on OOD validation macro F1)."""

    wilds_name, version = "iwildcam", "2.0"
    domain_fields = ("location",)
    selection_metric = "ood_val/F1-macro_all"
    headline_metrics = ("F1-macro_all", "acc_avg")
    official_streams: ClassVar[dict[str, tuple[str, ...]]] = {
        "val": ("id_val",), "ood_val": ("val",), "test": ("test", "id_test")}


@register("fmow")
class FMoW(WildsDomains):
    """FMoW-WILDS: satellite images by region and year; official metric: worst-region
    accuracy on the OOD test years."""

    wilds_name, version = "fmow", "1.1"
    domain_fields = ("region",)
    selection_metric = "ood_val/acc_worst_region"
    headline_metrics = ("acc_worst_region", "acc_avg")
    official_streams: ClassVar[dict[str, tuple[str, ...]]] = {
        "val": ("id_val",), "ood_val": ("val",), "test": ("test", "id_test")}


def check_no_domain_options(test_domains: Any, unlabeled: str, name: str) -> None:
    if test_domains is not None:
        raise ConfigError("data.test_domains", f"{name} has official splits; its test domains "
                          "are fixed by WILDS", "no test_domains")
    if unlabeled != "none":
        raise ConfigError("data.unlabeled", f"unlabeled streams are not available for {name} yet",
                          "none")
