"""The training data loader alone (decode + albumentations + collate) against the model's
training step, in images per second, on the same machine.

Run by hand:  python benchmarks/loader.py [--root DIR] [--workers 0 2 4] [--backbone resnet18]

Without --root, it writes a synthetic Office-Home tree (65 classes x 4 domains of
300x300 JPEGs, real files decoded by OpenCV) into a temporary folder. The loader is
DomainDataModule's training loader with the DomainBed preset at 224 px; the step is an
ERM training step of the backbone on batches already in memory (so neither waits on
the other). If the loader's rate is below the step's, the accelerator would wait on data.
It also counts the loader's worker processes: one pool for every source domain (a worker
loads a whole step), where one loader per domain would start workers x domains.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from dgkit.data import DomainDataModule
from dgkit.data.folders import OfficeHome
from dgkit.module import DGModule, as_batch
from dgkit_algorithms import ERM


def synthetic_officehome(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for domain in OfficeHome.domains:
        for c in range(65):
            folder = root / "OfficeHomeDataset_10072016" / domain / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                image = rng.integers(0, 255, (300, 300, 3), np.uint8)
                cv2.imwrite(str(folder / f"{j}.jpg"), cv2.GaussianBlur(image, (0, 0), 3))


def loader_rate(root: str, workers: int, batch: int, batches: int) -> tuple[float, int]:
    """Images per second and the worker processes the training loader started."""
    dm = DomainDataModule(OfficeHome(root=root), batch_size=batch, num_workers=workers,
                          pin_memory=torch.cuda.is_available())
    dm.setup("fit")
    before = set(multiprocessing.active_children())
    iterator = iter(dm.train_dataloader())
    next(iterator)  # workers started, first batch out
    processes = len(set(multiprocessing.active_children()) - before)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        b = next(iterator)
        images += sum(len(x) for x, _ in b)
    return images / (time.perf_counter() - start), processes


def step_rate(root: str, backbone: str, batch: int, steps: int) -> float:
    dm = DomainDataModule(OfficeHome(root=root), batch_size=batch)
    dm.setup("fit")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # random weights: the speed is the same, and no hub download is needed
    model = DGModule(algorithm=ERM, task=dm.task, backbone=backbone, pretrained=False).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)
    b = next(iter(dm.train_dataloader()))
    batch_ = as_batch([(x.to(device), y.to(device)) for x, y in b])

    def step() -> None:
        opt.zero_grad()
        model.algorithm.training_loss(batch_).backward()
        opt.step()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * len(batch_) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="an Office-Home root (default: a synthetic one)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32, help="per domain (3 source domains)")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            # enough for the measured batches and one warm-up batch from the 80% training split
            synthetic_officehome(Path(tmp), per_class=(args.batches + 2) * args.batch_size // 52 + 1)
            root = tmp
        step = step_rate(root, args.backbone, args.batch_size, args.steps)
        print(f"ERM step, {args.backbone} at 224 px on {'cuda' if torch.cuda.is_available() else 'cpu'}: "
              f"{step:.1f} images/s")
        for workers in args.workers:
            rate, processes = loader_rate(root, workers, args.batch_size, args.batches)
            print(f"loader, {workers} workers, DomainBed augmentation at 224 px: {rate:.1f} images/s "
                  f"= {rate / step:.2f}x the step's rate; {processes} worker processes for 3 "
                  f"source domains (one loader per domain: {3 * workers})")


if __name__ == "__main__":
    main()
