"""AdaNPC's test-time lookup against a plain forward pass, for memories of 10k and 100k.

Run by hand:  python benchmarks/adanpc_lookup.py [--backbone mnist_cnn] [--batch-size 256]
The memory is filled with random unit vectors of the featurizer's width (the lookup cost
depends only on its size and width), then a batch is predicted with the base model's head
(plain forward) and with AdaNPC (forward + similarities + top-k + vote + insertion).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dgkit.networks import Backbone
from dgkit.task import Task
from dgkit_algorithms import AdaNPC


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mnist_cnn")
    parser.add_argument("--input", default="1,28,28")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = tuple(int(s) for s in args.input.split(","))
    task = Task(shape, 10, ("a",), default_backbone=args.backbone)
    algo = AdaNPC(task, Backbone(), k=args.k, beta=1.1).to(device).eval()  # beta>1: fixed size
    x = torch.rand(args.batch_size, *shape, device=device)
    width = algo.base.featurizer.n_outputs
    with torch.no_grad():
        plain = timed(lambda: algo(x), args.repeats)
        print(f"{args.backbone}, {width}-d features, batch {args.batch_size}, k {args.k}, {device}")
        print(f"plain forward: {1000 * plain:.1f} ms")
        print(f"{'memory':>8} {'lookup ms':>10} {'/ forward':>10} {'bank MiB':>9} {'sims MiB':>9}")
        for size in (int(s) for s in args.sizes.split(",")):
            algo.memory = F.normalize(torch.randn(size, width, device=device), dim=1)
            algo.memory_labels = torch.randint(0, 10, (size,), device=device)
            algo.base_size = size
            adapted = timed(lambda: algo.adapt(x), args.repeats)
            bank = size * width * 4 / 2**20
            sims = args.batch_size * size * 4 / 2**20
            print(f"{size:>8} {1000 * adapted:>10.1f} {adapted / plain:>10.2f} {bank:>9.1f} {sims:>9.1f}")


if __name__ == "__main__":
    main()
