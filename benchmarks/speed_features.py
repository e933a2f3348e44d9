"""What each speed option does to an ERM (and SAM) training step, measured in one run.

Run by hand:  python benchmarks/speed_features.py [--backbone resnet18] [--accelerator gpu]

Every row trains the same model on the same data for the same number of steps and
reports the median step time, images per second and the ratio to the plain fp32 row:
``--trainer.precision bf16-mixed`` (and ``16-mixed`` on a GPU), ``--model.channels_last``,
``--model.compile``, and gradient accumulation (``--trainer.accumulate_grad_batches 2``
with half the batch: the same images per optimizer step, half the activation memory).
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from lightning import Trainer, seed_everything
from step_time import StepTimer

from dgkit.data import DomainDataModule
from dgkit.module import DGModule
from dgkit.plugins import registry

VARIANTS = {  # name -> (module options, trainer options, batch divisor)
    "fp32": ({}, {}, 1),
    "bf16-mixed": ({}, {"precision": "bf16-mixed"}, 1),
    "16-mixed (GPU)": ({}, {"precision": "16-mixed"}, 1),
    "channels_last": ({"channels_last": True}, {}, 1),
    "channels_last + bf16": ({"channels_last": True}, {"precision": "bf16-mixed"}, 1),
    "compile": ({"compile": True}, {}, 1),
    "accumulate 2 x half batch": ({}, {"accumulate_grad_batches": 2}, 2),
}


def run(algo: str, variant: str, args: argparse.Namespace) -> float | None:
    module_options, trainer_options, divisor = VARIANTS[variant]
    if "16-mixed" in trainer_options.get("precision", "") and "bf16" not in trainer_options["precision"] \
            and not torch.cuda.is_available():
        return None
    if divisor > 1 and algo != "erm":
        return None  # Lightning accumulates only under automatic optimization
    seed_everything(0)
    dataset = registry("dataset").get(args.data).obj()
    data = DomainDataModule(dataset, batch_size=args.batch_size // divisor)
    model = DGModule(algorithm=registry("algorithm").get(algo).obj, task=data.task,
                     backbone=args.backbone, optimizer=functools.partial(torch.optim.SGD, lr=0.01),
                     **module_options)
    timer = StepTimer(skip=args.warmup * divisor)
    trainer = Trainer(max_steps=args.warmup + args.steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[timer], accelerator=args.accelerator,
                      devices=1, **trainer_options)
    trainer.fit(model, datamodule=data)
    # Batches, not optimizer steps, are timed: an accumulated step is `divisor` batches.
    return statistics.median(timer.times) * divisor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", default="erm,sam")
    parser.add_argument("--data", default="rotated_mnist")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32, help="per source domain")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {torch.get_num_threads()} threads"
    images = args.batch_size * (len(registry("dataset").get(args.data).obj().domains) - 1)
    print(f"\n{args.data}, {args.backbone}, {images} images per step, {device}")
    print(f"{'algorithm':<6} {'variant':<26} {'step (ms)':>10} {'images/s':>9} {'/ fp32':>7}")
    for algo in args.algos.split(","):
        base = None
        for variant in args.variants.split(","):
            seconds = run(algo, variant, args)
            if seconds is None:
                continue
            base = base or seconds
            print(f"{algo:<6} {variant:<26} {1000 * seconds:>10.1f} {images / seconds:>9.1f} "
                  f"{seconds / base:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
