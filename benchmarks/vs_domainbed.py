"""dgkit's training step against DomainBed's, side by side in one process: the same network
(DomainBed's MNIST CNN, which dgkit's ``mnist_cnn`` rebuilds), the same data (dgkit's
embedded Rotated MNIST domains, 0 degrees held out), batch (per domain, 5 domains) and
optimizer (Adam, lr 1e-3, no weight decay).

Run by hand:

    git clone https://github.com/facebookresearch/DomainBed /tmp/DomainBed
    python benchmarks/vs_domainbed.py --domainbed /tmp/DomainBed [--swad /tmp/swad]

DomainBed is not a dependency of dgkit; the script imports it from the checkout given.
DomainBed has no SAM; ``--swad`` points at a checkout of a DomainBed-derived code base
whose ``domainbed.algorithms.SAM`` is the reference SAM step for DG (SWAD, khanrc/swad,
which UDIM's code also carries) to time SAM against.

Each side runs its own training loop, timed the way DomainBed's ``train.py`` times
``step_time``: the next minibatches (DomainBed's ``InfiniteDataLoader``, 0 workers) plus
``update()``, against dgkit's Lightning loop timed from one batch start to the next
(fetching, hooks, logging and optimizer all included). Median over ``--steps`` steps
after ``--warmup``; the two sides alternate ``--rounds`` times and the median of the
rounds is reported, because this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning import Callback, Trainer, seed_everything

from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.module import DGModule
from dgkit.plugins import registry


class BatchToBatch(Callback):
    """Seconds from one batch start to the next: the whole loop, as train.py's step_time."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())


def dgkit_steps(algo: str, args: argparse.Namespace) -> list[float]:
    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), test_domains=["0"], batch_size=args.batch_size)
    model = DGModule(algorithm=functools.partial(registry("algorithm").get(algo).obj, **(
                         {"rho": args.rho} if algo == "sam" else {})),
                     task=data.task, backbone="mnist_cnn",
                     optimizer=functools.partial(torch.optim.Adam, lr=1e-3, weight_decay=0.0))
    timer = BatchToBatch()
    trainer = Trainer(max_steps=args.warmup + args.steps + 1, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[timer], accelerator=args.accelerator,
                      devices=1, precision=args.precision)
    trainer.fit(model, datamodule=data)
    gaps = [b - a for a, b in zip(timer.starts, timer.starts[1:], strict=False)]
    return gaps[args.warmup:]


def domainbed_steps(algo: str, args: argparse.Namespace, root: Path) -> list[float]:
    for module in [m for m in sys.modules if m == "domainbed" or m.startswith("domainbed.")]:
        del sys.modules[module]  # DomainBed and SWAD both call their package domainbed
    sys.path.insert(0, str(root))
    try:
        from domainbed import algorithms, hparams_registry
        from domainbed.lib.fast_data_loader import InfiniteDataLoader
    finally:
        sys.path.remove(str(root))
    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), test_domains=["0"], batch_size=args.batch_size)
    data.setup("fit")
    envs = [data.splits[i][0] for i in data.source_indices]  # the training splits dgkit uses
    name = {"erm": "ERM", "sam": "SAM"}[algo]
    hparams = hparams_registry.default_hparams(name, "RotatedMNIST")
    hparams.update({"lr": 1e-3, "weight_decay": 0.0, "batch_size": args.batch_size,
                    "nonlinear_classifier": False, "rho": args.rho, "optimizer": "adam"})
    device = "cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu"
    algorithm = _build(algorithms, name, hparams, len(envs)).to(device)
    loaders = [InfiniteDataLoader(dataset=env, weights=None, batch_size=args.batch_size, num_workers=0)
               for env in envs]
    minibatches = zip(*loaders, strict=False)  # infinite loaders
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = [(x.to(device), y.to(device)) for x, y in next(minibatches)]
        if name == "SAM":  # the SWAD-style signature: update(x, y)
            algorithm.update([x for x, _ in batch], [y for _, y in batch])
        else:
            algorithm.update(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def _build(algorithms, name: str, hparams: dict, domains: int):
    cls = getattr(algorithms, name)
    try:
        return cls((1, 28, 28), 10, domains, hparams)
    except TypeError:  # SWAD's constructor also takes the run's args
        return cls((1, 28, 28), 10, domains, hparams, argparse.Namespace())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domainbed", required=True, type=Path, help="a DomainBed checkout")
    parser.add_argument("--swad", type=Path, help="a SWAD checkout (its SAM), to time SAM too")
    parser.add_argument("--batch-size", type=int, default=64, help="per domain (DomainBed's default)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    for path in filter(None, (args.domainbed, args.swad)):
        if not any((path / "domainbed" / name).exists() for name in ("algorithms", "algorithms.py")):
            parser.error(f"{path} has no domainbed/algorithms: pass the root of a checkout")

    sides = {"erm": args.domainbed, **({"sam": args.swad} if args.swad else {})}
    rows = []
    for algo, root in sides.items():
        ours, theirs = [], []
        for _ in range(args.rounds):  # alternate, so drifts of the machine hit both sides
            ours.append(statistics.median(dgkit_steps(algo, args)))
            theirs.append(statistics.median(domainbed_steps(algo, args, root)))
        rows.append((algo, statistics.median(ours), statistics.median(theirs)))
    device = (torch.cuda.get_device_name() if torch.cuda.is_available() and args.accelerator != "cpu"
              else f"CPU, {torch.get_num_threads()} threads")
    print(f"\nRotated MNIST, MNIST CNN, {args.batch_size} per domain x 5 domains, {device}, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'algorithm':<10} {'dgkit (ms)':>11} {'DomainBed (ms)':>15} {'dgkit / DomainBed':>18}")
    for algo, ours, theirs in rows:
        print(f"{algo:<10} {1000 * ours:>11.1f} {1000 * theirs:>15.1f} {ours / theirs:>18.3f}")


if __name__ == "__main__":
    main()
