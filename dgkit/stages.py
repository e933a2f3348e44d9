"""Where training stands, told to the algorithm before every step, and the stages of
multi-stage algorithms (Bonsai's rounds, D-BAT's members) ended and kept as checkpoints."""

from __future__ import annotations

import os
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from dgkit.results import ResultsContributor

CHECKPOINT_KEY = "dgkit_stages"


class Stages(Callback, ResultsContributor):
    """Updates ``algorithm.progress``; when ``algorithm.stage_name()`` changes, ends the
    stage (``end_stage``) and saves ``stage-<name>.ckpt`` beside the run's checkpoints.
    Derived from the step count, a stage survives a resume; the finished ones are in the
    resume checkpoint."""

    def __init__(self) -> None:
        self.current: str | None = None
        #: finished stages: name, step and checkpoint file
        self.finished: list[dict[str, Any]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.algorithm.progress.total_steps = int(trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        algorithm = pl_module.algorithm
        algorithm.progress.step, algorithm.progress.epoch = trainer.global_step, trainer.current_epoch
        stage = algorithm.stage_name()
        if self.current is not None and stage != self.current:
            self._finish(trainer, pl_module, self.current)
        self.current = stage

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.current is not None and not trainer.interrupted:
            self._finish(trainer, pl_module, self.current)
            self.current = None

    def _finish(self, trainer: Trainer, pl_module: LightningModule, name: str) -> None:
        algorithm = pl_module.algorithm
        note = algorithm.end_stage(name)
        if note:
            rank_zero_info(note)
        record: dict[str, Any] = {"stage": name, "step": trainer.global_step, "checkpoint": None}
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            record["checkpoint"] = os.path.join(callback.dirpath, f"stage-{name}.ckpt")
            trainer.save_checkpoint(record["checkpoint"], weights_only=False)  # atomic: AtomicCheckpointIO
        self.finished.append(record)
        kept = f", kept as {record['checkpoint']}" if record["checkpoint"] else ""
        rank_zero_info(f"{type(algorithm).__name__}: stage {name} finished at step "
                       f"{trainer.global_step}{kept}")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"current": self.current, "finished": list(self.finished)}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != "fit":  # testing the best checkpoint: the fit's stages stand
            return
        state = checkpoint.get(CHECKPOINT_KEY) or {}
        self.current, self.finished = state.get("current"), list(state.get("finished", []))

    def results_entries(self) -> dict[str, Any]:
        return {"stages": list(self.finished)} if self.finished else {}
