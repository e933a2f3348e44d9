"""Training-step time of each algorithm relative to ERM, on the same backbone and batch.

Run by hand:  python benchmarks/step_time.py [--backbone mnist_cnn] [--data rotated_mnist]
              python benchmarks/step_time.py --algos erm,erm+ema,erm+sma,erm+swad
Prints the median step time and its ratio to ERM next to the number of forward+backward
passes each algorithm needs in theory, and the peak memory: CUDA's peak allocation on a
GPU; on CPU the peak resident memory of a fresh process that trains only that algorithm
(each algorithm runs in its own process, so one's peak never hides another's). Steps are
timed by a Lightning callback, so the figures include everything the module does per step
(logging, optimizer, DDP hooks). ``ALGO+METHOD`` trains ALGO with ``--model.averaging METHOD``
(EMA and SMA update from the first step; SWAD keeps its segment's running mean every step,
its cost before and after the valley opens); the averaging columns time the update itself
(its median per step) against ERM's step: averaging's per-step cost.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import resource
import statistics
import time

import torch
from lightning import Callback, Trainer, seed_everything

from dgkit.data import DomainDataModule
from dgkit.module import DGModule
from dgkit.plugins import registry

# Theoretical cost in ERM steps (one forward + one backward); see ../shared/algorithms-1.md.
PASSES = {
    "erm": "1", "sam": "2", "asam": "2", "adanpc": "1 (the base's: ERM)",
    "udim": "~5-7 (double backward, 2B inconsistency pass)",
    "itta": "~2.5-3.5 (two two-stream forwards, three backwards, one double)",
    "drm": "~1 (one featurizer, a head per domain, a small domain discriminator)",
    "divdis": "~1 + an unlabeled batch of the same size (forward+backward)",
    "dbat": "~1 + an unlabeled batch (the model in training, plus a forward of the earlier ones)",
    "bonsai": "1 (one network trains at a time, in every stage)",
}
AVERAGING = {"ema": {"warmup": False}, "sma": {"start": 0}, "swad": {}}  # averaging from step 0
HPARAMS = {"udim": {"warmup_steps": 0}}  # time UDIM's own steps, not its SAM warm-up
UNLABELED = {"divdis": "source_holdout", "dbat": "source_holdout"}  # what they learn from


class StepTimer(Callback):
    """Wall time of every training step after the first ``skip`` (counted over the run:
    an epoch of the embedded data is about 20 steps, and ``batch_idx`` restarts each epoch)."""

    def __init__(self, skip: int):
        self.skip, self.times, self._start, self._seen = skip, [], 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self._seen >= self.skip:
            self.times.append(time.perf_counter() - self._start)
        self._seen += 1


def timed(update, times: list[float]):
    """``update`` that appends its own wall time to ``times``: averaging's cost read directly,
    not as the difference of two noisy step medians."""
    def wrapper(*a, **k):
        if torch.cuda.is_available():  # the step's queued kernels are not the update's
            torch.cuda.synchronize()
        start = time.perf_counter()
        update(*a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return wrapper


def step_time(row: str, args: argparse.Namespace) -> tuple[float, float, float | None]:
    algo, _, method = row.partition("+")
    seed_everything(0)
    dataset = registry("dataset").get(args.data).obj()
    data = DomainDataModule(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                            unlabeled=UNLABELED.get(algo, "none"))
    cls = registry("algorithm").get(algo).obj
    averaging = None
    if method:
        averaging = functools.partial(registry("averaging").get(method).obj, **AVERAGING.get(method, {}))
    model = DGModule(algorithm=functools.partial(cls, **HPARAMS.get(algo, {})),
                     task=data.task, backbone=args.backbone, averaging=averaging)
    updates: list[float] = []
    if model.averaging is not None:
        model.averaging.update = timed(model.averaging.update, updates)
    timer = StepTimer(skip=args.warmup)
    trainer = Trainer(max_steps=args.warmup + args.steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[timer], precision=args.precision,
                      accelerator=args.accelerator, devices=1)
    trainer.fit(model, datamodule=data)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # this process trained nothing else (see main)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    update = statistics.median(updates[args.warmup:]) if updates else None
    return statistics.median(timer.times), peak, update


def in_own_process(algo: str, args: argparse.Namespace) -> tuple[float, float, float | None]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(step_time, (algo, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", default="erm,sam,asam,udim,itta,adanpc,drm,divdis,dbat,bonsai")
    parser.add_argument("--data", default="rotated_mnist")
    parser.add_argument("--backbone", default="mnist_cnn")
    parser.add_argument("--batch-size", type=int, default=32, help="per source domain")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()

    algos = args.algos.split(",")
    results = {a: in_own_process(a, args) for a in algos}
    base = results.get("erm", next(iter(results.values())))[0]
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU, {torch.get_num_threads()} threads")
    print(f"\n{args.data}, {args.backbone}, {args.batch_size} per domain, {args.precision}, {device}")
    memory = "peak MiB" if torch.cuda.is_available() else "peak RSS MiB"
    print(f"{'algorithm':<10} {'step (ms)':>10} {'/ ERM':>7} {memory:>13} {'averaging (ms)':>15} "
          f"{'/ ERM':>7}  passes (F+B)")
    for row, (seconds, peak, update) in results.items():
        algo, _, method = row.partition("+")
        passes = PASSES.get(algo, "?") + (" + one parameter update" if method else "")
        cost = f"{'-':>15} {'-':>7}"
        if update is not None:
            cost = f"{1000 * update:>15.2f} {update / base:>7.3f}"
        print(f"{row:<10} {1000 * seconds:>10.1f} {seconds / base:>7.2f} {peak:13.0f} {cost}  {passes}")


if __name__ == "__main__":
    main()
