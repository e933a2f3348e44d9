"""Crafted distribution shifts: ten families of image augmentations (Efthymiadis et al.,
WACV 2025), built from albumentations.

Each family (category) holds several augmentation types; one type is drawn uniformly
per image, as the paper's imgaug ``OneOf`` does. Where albumentations lacks the imgaug
augmenter, a small OpenCV function stands in (``A.Lambda``), and a few stand-ins are
approximate (Voronoi cells as superpixels, snowflakes as snow): the families keep
their character, not imgaug's exact pixels.

Images are resized to a short side of 227, augmented and resized back (bicubic), as in
the reference code, so kernel sizes mean the same on 28 px digits and 224 px photos.
A shifted copy is a pure function of ``(seed, category, index)``: it is drawn once, in
effect, and never changes between epochs or runs -- a validation set that moves would
make its score noise.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dgkit.data.transforms import read_rgb
from dgkit.errors import ConfigError

WORK_SIZE = 227

FOLDS: dict[str, tuple[str, ...]] = {
    "A": ("arithmetic", "artistic", "blur", "color", "contrast"),
    "B": ("convolutional", "edges", "geometric", "segmentation", "weather"),
}
CATEGORIES: tuple[str, ...] = FOLDS["A"] + FOLDS["B"]


def _either_sign(make: Callable[[tuple[float, float]], A.BasicTransform], low: float, high: float):
    """imgaug's ``±(low-high)``: a magnitude that is never small, with a random sign."""
    return A.OneOf([make((low, high)), make((-high, -low))], p=1.0)


def _stylize(img: np.ndarray, **_) -> np.ndarray:
    # imgaug's Cartoon: edge-preserving smoothing with flat colour regions.
    return cv2.stylization(img, sigma_s=60, sigma_r=0.45)


def _bilateral(img: np.ndarray, **_) -> np.ndarray:
    return cv2.bilateralFilter(img, 9, 150, 150)


def _mean_shift(img: np.ndarray, **_) -> np.ndarray:
    return cv2.pyrMeanShiftFiltering(img, 10, 40)


def _kmeans_colors(img: np.ndarray, k: int = 4, **_) -> np.ndarray:
    pixels = img.reshape(-1, 3).astype(np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 10, 1.0)
    cv2.setRNGSeed(0)
    _, labels, centers = cv2.kmeans(pixels, k, None, criteria, 1, cv2.KMEANS_PP_CENTERS)
    return centers.astype(np.uint8)[labels.ravel()].reshape(img.shape)


def _uniform_quantize(img: np.ndarray, levels: int = 4, **_) -> np.ndarray:
    step = 256 // levels
    return (img // step * step + step // 2).astype(np.uint8)


def _lookup(img: np.ndarray, table: np.ndarray, **_) -> np.ndarray:
    return cv2.LUT(img, table)


def _curve(values: np.ndarray) -> Callable[..., np.ndarray]:
    # partial, not a closure: DataLoader workers must be able to pickle the transform.
    return functools.partial(_lookup, table=np.clip(values * 255.0, 0, 255).astype(np.uint8))


_LEVELS = np.arange(256) / 255.0
_sigmoid = _curve(1.0 / (1.0 + np.exp(-15.0 * (_LEVELS - 0.5))))
_log = _curve(np.log2(1.0 + _LEVELS))


def _convolve(img: np.ndarray, kernel: np.ndarray, **_) -> np.ndarray:
    return cv2.filter2D(img, -1, kernel)


def _filter(kernel: list[list[float]]) -> Callable[..., np.ndarray]:
    return functools.partial(_convolve, kernel=np.asarray(kernel, dtype=np.float32))


def _edge_detect(img: np.ndarray, **_) -> np.ndarray:
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    edges = cv2.convertScaleAbs(cv2.Laplacian(gray, cv2.CV_16S, ksize=3))
    return cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB)


def _directed_edges(img: np.ndarray, **_) -> np.ndarray:
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    edges = cv2.convertScaleAbs(cv2.Sobel(gray, cv2.CV_16S, 1, 1, ksize=3))
    return cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB)


def _canny(img: np.ndarray, **_) -> np.ndarray:
    gray = cv2.GaussianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), (0, 0), 2.0)
    return cv2.cvtColor(cv2.Canny(gray, 50, 150), cv2.COLOR_GRAY2RGB)


def _polar(img: np.ndarray, **_) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.warpPolar(img, (w, h), (w / 2, h / 2), min(h, w) / 2, cv2.WARP_POLAR_LINEAR)


def _mosaic(img: np.ndarray, rows: int, cols: int, **_) -> np.ndarray:
    h, w = img.shape[:2]
    small = cv2.resize(img, (cols, rows), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _fn(fn: Callable[..., np.ndarray], name: str) -> A.Lambda:
    return A.Lambda(image=fn, name=name, p=1.0)


def _types(category: str) -> list[A.BasicTransform]:
    """The augmentation types of one category, after the paper's imgaug lists."""
    if category == "arithmetic":
        return [
            _either_sign(lambda r: A.RandomBrightnessContrast(r, 0.0, p=1.0), 0.2, 0.8),
            A.GaussNoise(std_range=(0.2, 0.6), p=1.0),
            A.AdditiveNoise("laplace", "per_pixel",
                            {"mean_range": (0.0, 0.0), "scale_range": (0.2, 0.6)}, p=1.0),
            A.ShotNoise(scale_range=(0.5, 1.0), p=1.0),
            A.MultiplicativeNoise((2.0, 4.0), per_channel=True, elementwise=True, p=1.0),
            A.CoarseDropout((5, 10), (0.1, 0.2), (0.1, 0.2), fill=0, p=1.0),
            A.PixelDropout(dropout_prob=0.35, p=1.0),
            A.ChannelDropout((1, 2), p=1.0),
            A.SaltAndPepper(amount=(0.3, 0.5), p=1.0),
            A.InvertImg(p=1.0),
            A.Solarize(threshold_range=(32 / 255, 128 / 255), p=1.0),
            A.ImageCompression(quality_range=(1, 10), p=1.0),
        ]
    if category == "artistic":
        return [_fn(_stylize, "cartoon")]
    if category == "blur":
        return [
            A.GaussianBlur(blur_limit=0, sigma_limit=(5.0, 7.0), p=1.0),
            A.Blur(blur_limit=(9, 15), p=1.0),
            A.MedianBlur(blur_limit=(9, 15), p=1.0),
            _fn(_bilateral, "bilateral_blur"),
            A.MotionBlur(blur_limit=(13, 15), p=1.0),
            _fn(_mean_shift, "mean_shift_blur"),
        ]
    if category == "color":
        return [
            _either_sign(lambda r: A.HueSaturationValue(r, 0, 0, p=1.0), 50, 90),
            _either_sign(lambda r: A.HueSaturationValue(0, 0, r, p=1.0), 50, 100),
            A.HueSaturationValue(0, (-100, -60), 0, p=1.0),
            A.ToGray(p=1.0),
            A.PlanckianJitter(temperature_limit=(6000, 10000), p=1.0),
            A.Posterize(num_bits=(2, 4), p=1.0),
            _fn(_kmeans_colors, "kmeans_quantization"),
            _fn(_uniform_quantize, "uniform_quantization"),
        ]
    if category == "contrast":
        return [
            A.OneOf([A.RandomGamma((10, 30), p=1.0), A.RandomGamma((180, 200), p=1.0)], p=1.0),
            _fn(_sigmoid, "sigmoid_contrast"),
            _fn(_log, "log_contrast"),
            A.OneOf([A.RandomBrightnessContrast(0.0, (-0.9, -0.7), p=1.0),
                     A.RandomBrightnessContrast(0.0, (0.8, 1.0), p=1.0)], p=1.0),
            A.CLAHE(clip_limit=(1, 10), p=1.0),
        ]
    if category == "convolutional":
        return [
            _fn(_filter([[0, -1, 0], [-1, 4, -1], [0, -1, 0]]), "laplacian"),
            A.Sharpen(alpha=(0.8, 1.0), lightness=(0.75, 2.0), p=1.0),
            A.Emboss(alpha=(0.8, 1.0), strength=(0.5, 1.5), p=1.0),
            _fn(_edge_detect, "edge_detect"),
            _fn(_directed_edges, "directed_edge_detect"),
        ]
    if category == "edges":
        return [_fn(_canny, "canny")]
    if category == "geometric":
        return [
            A.OneOf([A.Affine(scale=(0.5, 0.75), p=1.0), A.Affine(scale=(1.25, 1.75), p=1.0)], p=1.0),
            A.Affine(translate_percent=(-0.4, 0.4), p=1.0),
            _either_sign(lambda r: A.Affine(rotate=r, p=1.0), 15, 45),
            _either_sign(lambda r: A.Affine(shear=r, p=1.0), 15, 25),
            # imgaug's PiecewiseAffine; albumentations' is ~100x slower than a grid distortion.
            A.GridDistortion(num_steps=5, distort_limit=(-0.5, 0.5), p=1.0),
            A.Perspective(scale=(0.1, 0.2), p=1.0),
            A.ElasticTransform(alpha=200, sigma=8, p=1.0),
            _fn(_polar, "polar_warping"),
            A.RandomGridShuffle(grid=(10, 10), p=1.0),
        ]
    if category == "segmentation":
        return [
            # SLIC on a 64 px copy: at 128 px it costs ~0.2 s an image.
            A.Superpixels(p_replace=(0.5, 1.0), n_segments=(16, 128), max_size=64, p=1.0),
            # Voronoi cells: irregular ones as dense superpixels, regular grids as
            # cell-mean mosaics (imgaug's Voronoi(20x40) and RegularGridVoronoi(10, 20)).
            A.Superpixels(p_replace=1.0, n_segments=(100, 500), max_size=64, p=1.0),
            _fn(functools.partial(_mosaic, rows=20, cols=40), "voronoi"),
            _fn(functools.partial(_mosaic, rows=10, cols=20), "regular_grid_voronoi"),
        ]
    if category == "weather":
        return [
            A.RandomSnow(brightness_coeff=2.5, snow_point_range=(0.5, 0.9), p=1.0),
            A.RandomFog(fog_coef_range=(0.5, 1.0), p=1.0),
            A.RandomRain(rain_type="heavy", p=1.0),
            A.RandomSnow(brightness_coeff=3.5, snow_point_range=(0.3, 0.8), method="texture", p=1.0),
        ]
    raise ConfigError("shift category", f"{category!r} is not a category", ", ".join(CATEGORIES))


def resolve_categories(names: Sequence[str], parameter: str) -> tuple[str, ...]:
    """Expand fold names (``A``, ``B``) and ``all``; reject unknown names."""
    out: list[str] = []
    for name in names:
        if name == "all":
            out += CATEGORIES
        elif name in FOLDS:
            out += FOLDS[name]
        elif name in CATEGORIES:
            out.append(name)
        else:
            raise ConfigError(parameter, f"{name!r} is not a shift category or fold",
                              ", ".join(("all", *FOLDS, *CATEGORIES)))
    return tuple(dict.fromkeys(out))


def category_transform(category: str) -> A.Compose:
    """One random type of ``category`` per call, on RGB uint8 images of any size."""
    return A.Compose([
        A.SmallestMaxSize(max_size=WORK_SIZE, interpolation=cv2.INTER_CUBIC),
        A.OneOf(_types(category), p=1.0),
    ])


def _seed(seed: int, category: str, index: int) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(category.encode()), index]).generate_state(1)[0])


def shift_image(image: np.ndarray, transform: A.Compose, seed: int) -> np.ndarray:
    """Shift an RGB uint8 ``HxWx3`` image with a fixed draw; returns the original size."""
    h, w = image.shape[:2]
    transform.set_random_seed(seed)
    out = transform(image=image)["image"]
    return cv2.resize(out, (w, h), interpolation=cv2.INTER_CUBIC)


def shift_tensor(x: torch.Tensor, transform: A.Compose, seed: int) -> torch.Tensor:
    """:func:`shift_image` for a ``CxHxW`` float tensor in [0, 1] with 1, 2 or 3 channels.

    Images are lifted to RGB for the augmenters (grey repeated; two channels padded with
    an empty blue one, like Colored MNIST's red/green) and brought back to ``C`` channels,
    so a colour shift can move intensity between channels as it would between colours.
    """
    c = x.shape[0]
    if c not in (1, 2, 3):
        raise ConfigError("shift input", f"images with {c} channels", "1, 2 or 3 channels")
    rgb = x.repeat(3, 1, 1) if c == 1 else torch.cat([x, torch.zeros_like(x[:1])]) if c == 2 else x
    image = (rgb.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    out = torch.from_numpy(shift_image(np.ascontiguousarray(image), transform, seed))
    out = out.permute(2, 0, 1).float().div_(255.0)
    return out.mean(0, keepdim=True) if c == 1 else out[:c]


class ShiftedDataset(Dataset):
    """``(x, y)`` samples of ``data`` under one crafted-shift category, each with its own
    fixed draw (a pure function of ``seed``, the category and the sample's index).

    Shifted images are kept (as uint8, a quarter of the float size) once drawn, because
    validation revisits them every epoch and some types cost tens of milliseconds.
    """

    def __init__(self, data: Dataset, category: str, seed: int = 0, cache: bool = True):
        self.data, self.category, self.seed = data, category, seed
        self.transform = category_transform(category)
        self._cache: dict[int, torch.Tensor | np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        x, *rest = self.data[index]
        if isinstance(x, str | np.ndarray):  # a file or a decoded RGB image: before any transform
            if self._cache is None or index not in self._cache:
                image = read_rgb(x) if isinstance(x, str) else x
                image = shift_image(image, self.transform, _seed(self.seed, self.category, index))
                if self._cache is None:
                    return (image, *rest)
                self._cache[index] = image
            return (self._cache[index], *rest)
        if self._cache is not None and index in self._cache:
            return (self._cache[index].float().div_(255.0), *rest)
        shifted = shift_tensor(x, self.transform, _seed(self.seed, self.category, index))
        if self._cache is not None:
            self._cache[index] = shifted.mul(255.0).round_().to(torch.uint8)
            shifted = self._cache[index].float().div_(255.0)  # the same value either way
        return (shifted, *rest)


class MixedShifts(Dataset):
    """Each access draws the original sample or its fixed draw under one of the shifts,
    uniformly (the paper's training with a fold's categories: 1/(k+1) each)."""

    def __init__(self, data: Dataset, shifted: list[ShiftedDataset]):
        self.data, self.shifted = data, shifted

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        # torch's generator: seeded per DataLoader worker, so runs repeat with the seed.
        choice = int(torch.randint(len(self.shifted) + 1, ()))
        return self.data[index] if choice == 0 else self.shifted[choice - 1][index]
