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
from dgkit.module import DGModule, task_dict
from dgkit.plugins import registry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algo", default="erm")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="per domain and device")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hparams", default="{}", help="algorithm hyperparameters as a dict")
    parser.add_argument("--out", required=True)
    parser.add_argument("--test", action="store_true", help="also test; save the metrics")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="per device")
    args = parser.parse_args()

    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=args.batch_size, shuffle=False,
                            eval_batch_size=args.eval_batch_size)
    algorithm = registry("algorithm").get(args.algo).obj
    model = DGModule(algorithm=functools.partial(algorithm, **eval(args.hparams)),
                     task=task_dict(data.task), backbone="mlp",
                     optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = Trainer(accelerator="cpu", devices=args.devices,
                      strategy="ddp" if args.devices > 1 else "auto", max_steps=args.steps,
                      limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    torch.save({k: v for k, v in model.algorithm.state_dict().items() if torch.is_tensor(v)},
               f"{args.out}.rank{trainer.global_rank}")
    if args.test:
        (metrics,) = trainer.test(model, datamodule=data, verbose=False)
        if trainer.is_global_zero:
            torch.save({k: float(v) for k, v in metrics.items()}, f"{args.out}.test")


if __name__ == "__main__":
    main()
