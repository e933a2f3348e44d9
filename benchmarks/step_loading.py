"""Loading one training step of the embedded Rotated MNIST (5 source domains), alone, in ms
per step: the sampler drawing the step's keys, the loading of those keys as ``dgkit fit``
does it (in-memory tensors gathered with one indexing per tensor), the same keys loaded
sample by sample under their seeds and collated (the path of every data set whose loading
may draw at random: files, augmentation), and bare indexing of the same rows.

    python benchmarks/step_loading.py [--batch-size 64] [--epochs 5]

Run by hand; the main process loads (the embedded data sets' default of 0 workers).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import default_collate

from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST


def per_step_ms(fn, steps: list, epochs: int) -> float:
    start = time.perf_counter()
    for _ in range(epochs):
        for step in steps:
            fn(step)
    return 1000 * (time.perf_counter() - start) / (epochs * len(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="per source domain")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    data = DomainDataModule(RotatedMNIST(), test_domains=["0"], batch_size=args.batch_size)
    data.setup("fit")
    loader = data.train_dataloader()
    streams = loader.dataset.streams
    steps = list(loader.sampler)
    tensors = [stream._in_memory for stream in streams]

    def sampler(_):
        list(loader.sampler)

    def bare(step):
        for (stored, index), keys in zip(tensors, step, strict=True):
            rows = index[torch.tensor([i for i, _ in keys])]
            [t[rows] for t in stored]

    sample_by_sample = per_step_ms(
        lambda step: [default_collate(s.__getitems__(k)) for s, k in zip(streams, step, strict=True)],
        steps, args.epochs)
    print(f"Rotated MNIST (embedded), 5 source domains x {args.batch_size} images, "
          f"{torch.get_num_threads()} threads; ms per step")
    print(f"sampler (keys of a step)  {per_step_ms(sampler, [None], args.epochs) / len(steps):.3f}")
    print(f"loading (dgkit fit)       {per_step_ms(loader.dataset.__getitem__, steps, args.epochs):.3f}")
    print(f"loading sample by sample  {sample_by_sample:.3f}")
    print(f"bare indexing             {per_step_ms(bare, steps, args.epochs):.3f}")


if __name__ == "__main__":
    main()
