"""Image pipelines with albumentations: named presets, or any pipeline albumentations
serializes (``A.save(pipeline, "train.yaml", data_format="yaml")``), given by path.

Images are decoded with OpenCV inside DataLoader workers and returned as CHW float
tensors; a file that does not decode is reported by its path.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from dgkit.data.resumable import sample_seed
from dgkit.errors import ConfigError, DGKitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("domainbed", "resize", "none")


def preset(name: str, size: int, train: bool, parameter: str = "transform") -> A.Compose:
    """``domainbed``: DomainBed's training augmentation (random resized crop 0.7-1,
    flip, colour jitter 0.3, 10% greyscale) for training, a plain resize for evaluation;
    ``resize``: resize only, also in training; ``none``: no resize (images must already
    share one size). All normalize with ImageNet statistics."""
    if name == "domainbed" and train:
        steps = [A.RandomResizedCrop((size, size), scale=(0.7, 1.0)), A.HorizontalFlip(),
                 A.ColorJitter(0.3, 0.3, 0.3, 0.3), A.ToGray(p=0.1)]
    elif name in ("domainbed", "resize"):
        steps = [A.Resize(size, size)]
    elif name == "none":
        steps = []
    else:
        raise ConfigError(parameter, f"{name!r} is neither a preset nor an existing file",
                          f"{', '.join(PRESETS)}, or the path of an albumentations YAML/JSON pipeline")
    return A.Compose([*steps, A.Normalize(IMAGENET_MEAN, IMAGENET_STD), ToTensorV2()])


def pipeline(spec: str, size: int, train: bool, parameter: str) -> A.Compose:
    """A preset by name, or a serialized albumentations pipeline by path (``ToTensorV2``
    is appended when the file's pipeline does not end with it)."""
    path = Path(spec)
    if spec not in PRESETS and path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise ConfigError(parameter, f"no pipeline file at {spec!r}",
                              "a file written by albumentations.save(pipeline, path)")
        try:
            loaded = A.load(str(path), data_format="yaml" if path.suffix != ".json" else "json")
        except Exception as exc:
            raise ConfigError(parameter, f"{spec} is not an albumentations pipeline ({exc})",
                              "a file written by albumentations.save(pipeline, path)") from None
        if not isinstance(loaded.transforms[-1], ToTensorV2):
            loaded = A.Compose([*loaded.transforms, ToTensorV2()])
        return loaded
    return preset(spec, size, train, parameter)


JPEG_END = b"\xff\xd9"  # every complete JPEG ends with its EOI marker
PNG_END = b"IEND\xaeB`\x82"


def truncated(data: bytes) -> bool:
    """Whether an encoded JPEG or PNG stops before its end marker. OpenCV decodes such a
    file into a partly grey image and only warns on stderr, without the file's name."""
    if data[:2] == b"\xff\xd8":
        return JPEG_END not in data[-64:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return not data.rstrip(b"\x00").endswith(PNG_END)
    return False


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as an RGB uint8 array; a clear error naming the file if it does not
    decode (truncated download, not an image)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        data = b""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    cut = bool(data) and truncated(data)
    if image is None or cut:
        problem = "is truncated" if cut else "is missing, empty or corrupt"
        raise DGKitError(f"cannot decode image {path}: the file {problem}. "
                         "Re-download or remove it (--data.dataset.verify true lists every such file "
                         "before training).")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class LoadImage:
    """Path -> decoded, transformed tensor; picklable, so it runs in DataLoader workers."""

    def __init__(self, transform: A.Compose):
        self.transform = transform

    def __call__(self, image: str | np.ndarray) -> torch.Tensor:
        """A path, or an image already decoded (and shifted) as RGB uint8."""
        if isinstance(image, str):
            image = read_rgb(image)
        seed = sample_seed()
        if seed is not None:  # a training sample: its augmentation is a function of its seed
            self.transform.set_random_seed(seed % 2**32)
        return self.transform(image=image)["image"]
