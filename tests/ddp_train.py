"""Train with one or several CPU processes and save every rank's parameters.

Run by the DDP tests as a script, because Lightning's ``ddp`` strategy re-launches the
command it was started with once per device, as it does for users.
"""

import argparse
import functools

import torch
from lightning import Trainer, seed_everything

from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.module import DGModule
from dgkit.plugins import registry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algo", default="erm", help="one alias, or several: a,b,c (one fit each)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="per domain and device")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hparams", default="{}", help="algorithm hyperparameters as a dict")
    parser.add_argument("--out", required=True)
    parser.add_argument("--test", action="store_true", help="also test; save the metrics")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="per device")
    parser.add_argument("--limit-test-batches", type=int, help="test batches per stream")
    args = parser.parse_args()

    for alias in args.algo.split(","):
        # The same process group serves every fit: Lightning launches the ranks once.
        fit(alias, args, f"{args.out}.{alias}" if "," in args.algo else args.out)


# What some algorithms need on top of the command's settings, to train at all in a few steps.
NEEDS = {"divdis": {"unlabeled": "source_holdout"}, "dbat": {"unlabeled": "source_holdout"},
         "bonsai": {"hparams": {"rounds": 1, "stage_steps": [2, 2]}}, "itta": {"backbone": "mnist_cnn"}}


def fit(alias: str, args: argparse.Namespace, out: str) -> None:
    needs = NEEDS.get(alias, {})
    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=args.batch_size, shuffle=False,
                            eval_batch_size=args.eval_batch_size,
                            unlabeled=needs.get("unlabeled", "none"))
    algorithm = registry("algorithm").get(alias).obj
    hparams = {**needs.get("hparams", {}), **eval(args.hparams)}
    model = DGModule(algorithm=functools.partial(algorithm, **hparams),
                     task=data.task, backbone=needs.get("backbone", "mlp"),
                     optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = Trainer(accelerator="cpu", devices=args.devices,
                      strategy="ddp" if args.devices > 1 else "auto", max_steps=args.steps,
                      limit_val_batches=0, limit_test_batches=args.limit_test_batches or 1.0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    torch.save({k: v for k, v in model.algorithm.state_dict().items() if torch.is_tensor(v)},
               f"{out}.rank{trainer.global_rank}")
    if args.test:
        (metrics,) = trainer.test(model, datamodule=data, verbose=False)
        if trainer.is_global_zero:
            torch.save({k: float(v) for k, v in metrics.items()}, f"{out}.test")


if __name__ == "__main__":
    main()
