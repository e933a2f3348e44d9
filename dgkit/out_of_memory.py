"""An out-of-memory error during fit, validate, test or predict, turned into the one line a
user reads: the batch that did not fit and three ways out."""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from dgkit.errors import DGKitError


class ExplainOutOfMemory(Callback):
    """Attaches :func:`out_of_memory_message` to the error as its cause: the command reports
    the first ``DGKitError`` in an error's chain, and raising here instead would skip
    Lightning's clean-up (loggers, strategy), which runs after this hook and re-raises."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, torch.OutOfMemoryError):
            exception.__cause__ = DGKitError(out_of_memory_message(
                exception, trainer.datamodule, trainer.strategy.root_device))


def out_of_memory_message(exc: BaseException, datamodule: Any, device: Any) -> str:
    """The one line for an out-of-memory error: the batch that did not fit and three ways out."""
    batch = getattr(datamodule, "batch_size", None)
    per_step = getattr(datamodule, "images_per_step", None) or "the batch"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
    return (f"out of memory on {device} with --data.batch_size {batch} "
            f"({per_step}): {first}. Lower --data.batch_size (and keep the effective batch with "
            "--trainer.accumulate_grad_batches), train in --trainer.precision bf16-mixed, or pick a "
            "smaller --model.backbone.")
