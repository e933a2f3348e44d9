"""DomainBed's folder data sets: ``ROOT/<dataset folder>/<domain>/<class>/<image>``.

Office-Home, PACS, VLCS, TerraIncognita and DomainNet share this layout. Classes are the
sorted union of class folders over all domains, so a label means the same class in
every domain. Images are decoded in DataLoader workers; the training and evaluation
pipelines are albumentations presets or serialized pipelines (``dgkit.data.transforms``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

from torch.utils.data import Dataset

from dgkit.data.base import MultiDomainDataset
from dgkit.data.transforms import LoadImage, pipeline, read_rgb
from dgkit.errors import ConfigError, DGKitError
from dgkit.plugins import register

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class ImageFiles(Dataset):
    """``(path, label)`` pairs; the data module turns paths into tensors."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.samples[index]


class FolderDomains(MultiDomainDataset):
    """A data set stored as ``<folder>/<domain>/<class>/<image>`` under ``root``."""

    #: accepted names of the data set's top folder under ``root`` (the official archive's
    #: name first); ``root`` may also be that folder itself
    folders: ClassVar[tuple[str, ...]] = ()
    download_hint: ClassVar[str] = ""
    default_backbone = "resnet50"
    default_pretrained = True

    def __init__(self, root: str = "data", image_size: int = 224,
                 train_transform: str = "domainbed", eval_transform: str = "resize",
                 verify: bool = False):
        """
        Args:
            root: folder that holds the data set's folder (or that folder itself).
            image_size: side of the square images the presets produce.
            train_transform: ``domainbed`` (random resized crop, flip, colour jitter,
                greyscale), ``resize``, ``none``, or the path of a pipeline saved with
                ``albumentations.save`` (YAML/JSON).
            eval_transform: the same for validation and test (default ``resize``).
            verify: decode every image once before training and report every file
                that does not decode, instead of failing on the first one mid-run.
        """
        if image_size < 8:
            raise ConfigError("data.dataset.image_size", f"{image_size}", ">= 8")
        self.root, self.image_size = Path(root), image_size
        self.input_shape = (3, image_size, image_size)
        self._train = pipeline(train_transform, image_size, True, "data.dataset.train_transform")
        self._eval = pipeline(eval_transform, image_size, False, "data.dataset.eval_transform")
        self.directory = self._find_directory()
        self.classes = self._classes()
        if len(self.classes) != self.num_classes:
            raise DGKitError(f"{self.name}: {self.directory} has {len(self.classes)} class folders, "
                             f"expected {self.num_classes}. {self.layout()}")
        self.verify = verify
        self._listed: dict[int, ImageFiles] = {}

    # --- layout ---------------------------------------------------------------------
    @classmethod
    def layout(cls) -> str:
        domains = ", ".join(cls.domains)
        return (f"Expected layout: ROOT/{cls.folders[0]}/<domain>/<class>/<image> with domains "
                f"{domains} and {cls.num_classes} class folders in each. {cls.download_hint}")

    def _find_directory(self) -> Path:
        candidates = [self.root / f for f in self.folders] + [self.root]
        for candidate in candidates:
            if all((candidate / d).is_dir() for d in self.domains):
                return candidate
        partial = [c for c in candidates if c.is_dir() and any((c / d).is_dir() for d in self.domains)]
        if not self.root.is_dir():
            problem = f"no data root at {str(self.root)!r}"
        elif partial:
            missing = [d for d in self.domains if not (partial[0] / d).is_dir()]
            problem = f"{partial[0]} lacks the domain folder(s) {', '.join(missing)}"
        else:
            problem = f"{str(self.root)!r} does not hold {self.name}"
        raise DGKitError(f"{self.name}: {problem}. {self.layout()} "
                         f"Set it with --data.dataset.root DIR.")

    def _classes(self) -> list[str]:
        found = {d: {c.name for c in (self.directory / d).iterdir() if c.is_dir()} for d in self.domains}
        classes = sorted(set().union(*found.values()))
        # A domain without a class would silently shift what the accuracies mean.
        lacking = {d: sorted(set(classes) - names) for d, names in found.items() if set(classes) - names}
        if lacking and len(classes) == self.num_classes:
            listing = "; ".join(f"{self.directory / d} lacks {', '.join(c[:5])}"
                                + (f" and {len(c) - 5} more" if len(c) > 5 else "")
                                for d, c in lacking.items())
            raise DGKitError(f"{self.name}: every domain needs the same {self.num_classes} class "
                             f"folders: {listing}. Re-download the data set.")
        return classes

    def domain_dataset(self, index: int) -> Dataset:
        if index not in self._listed:
            self._listed[index] = self._list(index)
        return self._listed[index]

    def _list(self, index: int) -> ImageFiles:
        domain = self.directory / self.domains[index]
        samples = []
        for label, name in enumerate(self.classes):
            folder = domain / name
            if folder.is_dir():
                samples += [(str(p), label) for p in sorted(folder.iterdir())
                            if p.suffix.lower() in IMAGE_SUFFIXES]
        if not samples:
            raise DGKitError(f"{self.name}: domain folder {domain} holds no images. {self.layout()}")
        empty = [path for path, _ in samples if Path(path).stat().st_size == 0]
        if empty:
            raise DGKitError(f"{self.name}: {len(empty)} empty image file(s), e.g. {empty[0]}; "
                             "re-download the data set or remove them")
        if self.verify:
            self._verify(samples)
        return ImageFiles(samples)

    def _verify(self, samples: list[tuple[str, int]]) -> None:
        def bad(path: str) -> str | None:
            try:
                read_rgb(path)
            except DGKitError:
                return path
            return None

        with ThreadPoolExecutor() as pool:  # OpenCV decodes outside the GIL
            broken = [p for p in pool.map(bad, (p for p, _ in samples)) if p]
        if broken:
            listing = "\n  ".join(broken[:20]) + ("\n  ..." if len(broken) > 20 else "")
            raise DGKitError(f"{self.name}: {len(broken)} image(s) do not decode:\n  {listing}\n"
                             "Re-download them or remove them.")

    def transform(self, train: bool) -> Callable[[str], object]:
        return LoadImage(self._train if train else self._eval)


@register("officehome")
class OfficeHome(FolderDomains):
    """Office-Home (Venkateswara et al., 2017): 65 classes of office and home objects."""

    folders = ("OfficeHomeDataset_10072016", "office_home")
    domains = ("Art", "Clipart", "Product", "Real World")
    num_classes = 65
    default_test_domains = ("Art",)
    download_hint = "Get it with: dgkit data download officehome --root ROOT."


@register("pacs")
class PACS(FolderDomains):
    """PACS (Li et al., 2017): 7 classes in photos, art paintings, cartoons and sketches."""

    folders = ("PACS", "pacs")
    domains = ("art_painting", "cartoon", "photo", "sketch")
    num_classes = 7
    default_test_domains = ("art_painting",)
    download_hint = "Get it with: dgkit data download pacs --root ROOT."


@register("vlcs")
class VLCS(FolderDomains):
    """VLCS (Fang et al., 2013): 5 classes from four photo data sets."""

    folders = ("VLCS", "vlcs")
    domains = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
    num_classes = 5
    default_test_domains = ("Caltech101",)
    download_hint = "Get it with: dgkit data download vlcs --root ROOT."


@register("terraincognita")
class TerraIncognita(FolderDomains):
    """TerraIncognita (Beery et al., 2018) as DomainBed restructures it: 10 animal classes
    at four camera-trap locations."""

    folders = ("terra_incognita",)
    domains = ("location_100", "location_38", "location_43", "location_46")
    num_classes = 10
    default_test_domains = ("location_100",)
    download_hint = ("Build it with DomainBed's download script "
                     "(domainbed/scripts/download.py, download_terra_incognita).")


@register("domainnet")
class DomainNet(FolderDomains):
    """DomainNet (Peng et al., 2019): 345 classes in six styles."""

    folders = ("domain_net", "DomainNet")
    domains = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    num_classes = 345
    default_test_domains = ("clipart",)
    download_hint = "Get it with: dgkit data download domainnet --root ROOT."
