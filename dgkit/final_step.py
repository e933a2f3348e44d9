"""Validate the last training step too.

Lightning validates at epoch ends (or every ``val_check_interval``); a run of
``max_steps`` that ends mid-epoch would never validate its last steps, and the checkpoint
tested would be chosen among the earlier ones only. DomainBed always evaluates the final
step. Asking the trainer to stop at ``max_steps`` (the public ``should_stop``, as early
stopping does) makes Lightning run the validation loop before it stops.
"""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer


class ValidateFinalStep(Callback):
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step and trainer.enable_validation:
            trainer.should_stop = True
