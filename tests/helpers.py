"""Small training harness shared by the algorithm tests."""

from __future__ import annotations

import contextlib
import functools
import os
import signal

import torch
from e2e.command import QUIET  # noqa: F401  (one list of quiet-run flags for every layer)
from lightning import Callback, Trainer, seed_everything

from dgkit.cli import main
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.module import DGModule
from dgkit.task import Task


def make_task(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
              domains: tuple[str, ...] = ("a", "b"), backbone: str = "mlp", **fields) -> Task:
    """A small task for algorithm tests that build networks without data."""
    return Task(input_shape, num_classes, domains, default_backbone=backbone, **fields)


def run_cli(argv, capsys=None) -> tuple[int, str, str]:
    """Run the command in-process; return (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code or 0
    if capsys is None:
        return code, "", ""
    out = capsys.readouterr()
    return code, out.out, out.err


def train(algorithm_cls, steps: int, *, backbone: str = "mlp", batch_size: int = 16,
          lr: float = 1e-3, data: DomainDataModule | None = None, seed: int = 0,
          precision: str = "32-true", scheduler: tuple | None = None,
          callbacks: list[Callback] | None = None, **hparams) -> DGModule:
    """Fit ``algorithm_cls`` for ``steps`` steps on Rotated MNIST (no validation, no files)."""
    seed_everything(seed)
    data = data or DomainDataModule(RotatedMNIST(), batch_size=batch_size)
    model = DGModule(algorithm=functools.partial(algorithm_cls, **hparams),
                     task=data.task, backbone=backbone,
                     optimizer=functools.partial(torch.optim.Adam, lr=lr),
                     lr_scheduler=functools.partial(scheduler[0], **scheduler[1]) if scheduler else None,
                     scheduler_interval="step")
    trainer = Trainer(max_steps=steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, precision=precision,
                      callbacks=callbacks)
    trainer.fit(model, datamodule=data)
    return model


def source_batch(data: DomainDataModule, n_per_domain: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed evaluation batch from the source domains' training splits."""
    data.setup("fit")
    xs, ys = [], []
    for i in data.source_indices:
        subset = data.splits[i][0]
        x, y = zip(*(subset[j] for j in range(min(n_per_domain, len(subset)))), strict=True)
        xs.append(torch.stack(x))
        ys.append(torch.tensor(y))
    return torch.cat(xs), torch.cat(ys)


def plain_optimization(optimizer: torch.optim.Optimizer):
    """An ``Optimization`` handle without Lightning, for single-step tests."""
    from dgkit.algorithm import Optimization

    return Optimization.standalone([optimizer])


class KillAtStep(Callback):
    """Kill the process outright (SIGKILL: no cleanup, no final checkpoint) when training
    reaches ``step``, as a preempted or crashed job would die."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def inside(folder):
    """Run in ``folder`` (the CLI writes runs/ under the working directory), then come back."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)
