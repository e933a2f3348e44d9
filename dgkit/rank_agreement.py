"""A check at the end of every multi-process fit that the ranks trained the same model."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from dgkit.distributed import rank_disagreement


class RankAgreement(Callback):
    """Warns, once, when the parameters differ across DDP ranks after training: the model
    rank 0 tests and saves is then not the one the others trained."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        found = rank_disagreement(pl_module.algorithm)
        if found is not None:
            spread, name = found
            rank_zero_warn(
                f"the parameters differ across the {trainer.world_size} DDP ranks after training "
                f"(relative difference {spread:.1e} in {name}): {type(pl_module.algorithm).__name__}'s "
                "update is not synchronized; gradients set by hand need opt.average_gradients(params)")
