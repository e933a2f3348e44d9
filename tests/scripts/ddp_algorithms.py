"""Fit each named algorithm for a few steps on two CPU processes (DDP over gloo) and test it,
all in one pair of processes (Lightning's launcher starts the second with this same command
line), and print per algorithm the step reached, whether the two ranks hold the same
parameters, and the test accuracy on the held-out domain.

    python tests/scripts/ddp_algorithms.py ALIAS[:key=value,...] ...

``backbone=NAME`` among the settings picks the backbone (default: mlp).
An ALIAS with a dot is a class path (``module.Class``) instead.
"""

from __future__ import annotations

import ast
import functools
import importlib
import sys

import torch.distributed as dist
from lightning import Trainer, seed_everything

from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.distributed import rank_disagreement
from dgkit.module import DGModule
from dgkit.noise import quiet_dependencies
from dgkit.plugins import registry


def parse(spec: str) -> tuple[str, dict]:
    alias, _, settings = spec.partition(":")
    hparams = {}
    for item in filter(None, settings.split(",")):
        key, value = item.split("=")
        try:
            hparams[key] = ast.literal_eval(value)  # numbers and booleans
        except (ValueError, SyntaxError):
            hparams[key] = value
    return alias, hparams


def main() -> None:
    quiet_dependencies()
    for spec in sys.argv[1:]:
        alias, hparams = parse(spec)
        backbone = hparams.pop("backbone", "mlp")
        seed_everything(0)
        data = DomainDataModule(RotatedMNIST(), batch_size=8)
        if "." in alias:
            module, _, name = alias.rpartition(".")
            cls = getattr(importlib.import_module(module), name)
        else:
            cls = registry("algorithm").get(alias).obj
        algorithm = functools.partial(cls, **hparams)
        model = DGModule(algorithm=algorithm, task=data.task, backbone=backbone)
        trainer = Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=4, limit_val_batches=0,
                          limit_test_batches=2, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=data)
        found = rank_disagreement(model.algorithm)
        tested = trainer.test(model, datamodule=data, verbose=False)[0]
        accuracy = next(v for k, v in tested.items() if k.endswith("/accuracy"))
        if trainer.global_rank == 0:
            verdict = "ranks agree" if found is None else f"ranks differ ({found[0]:.1e} in {found[1]})"
            print(f"{alias}: step {trainer.global_step}, {verdict}, test accuracy {accuracy:.3f}", flush=True)
    # Left to interpreter exit, gloo's threads can be torn down mid-flight on a loaded machine
    # ("terminate called without an active exception", SIGABRT): the pair exits cleanly instead.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
